"""Shared entry-point wrapper: parse a config, run, and turn FDSL errors into one clear line.

Nothing here imports torch at module level: the job is imported inside the guarded call, so a Ctrl-C
during the (slow) import of torch also ends with the one-line message and exit status 130.
"""
from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from fdsl.config import parse_config
from fdsl.errors import FDSLError, user_message

log = logging.getLogger(__name__)
INTERRUPTED = "interrupted; rerun the same command to resume (finished classes and checkpoints are kept)"


def run_command(job: Callable[[], Any], explain: Callable[[FDSLError], str] | None = None,
            interrupted: str = INTERRUPTED) -> int:
    """Run `job()` as a command and return its exit status: the one place that turns errors into exit codes.

    0 on success; bad input (an `FDSLError`, from parsing, validation or the work) exits 2 with one line
    ``error: ...`` (under torchrun printed once); argparse's ``--help`` exits 0 and its usage errors 2; Ctrl-C
    exits 130 with the line `interrupted`. `explain` may turn an error into a longer, actionable message (the
    demo's offline hint).
    """
    try:
        job()
    except FDSLError as exc:
        return _fail(exc, explain(exc) if explain else f"error: {user_message(exc)}")
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, read-only folder, ... while writing results: one line, not a traceback
        from fdsl.io import write_failure

        line = write_failure(exc)
        if line is None:
            raise
        return _fail(exc, f"error: {line}")
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, its message already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return 0


def _fail(exc: BaseException, line: str) -> int:
    """Print the one error line (under torchrun once, by the rank that knows it) and return exit status 2."""
    log.debug("error details", exc_info=True)  # noqa: LOG014  (called from the except blocks of run_command)
    distributed = sys.modules.get("fdsl.engine.distributed")  # loaded (with torch) when a job ran
    if distributed is not None:
        line = distributed.error_line(exc, line)
    if line:
        print(line, file=sys.stderr)
    return 2


def _resolve(job: Callable | str) -> Callable:
    """`job` itself, or the function named by ``"module:function"`` (imported now)."""
    if isinstance(job, str):
        module, _, name = job.partition(":")
        return getattr(importlib.import_module(module), name)
    return job


def main(cls: type, job: Callable | str, argv: Sequence[str] | None = None, description: str = "") -> int:
    """Parse `argv` into `cls`, run `job(cfg)`. Bad input exits with status 2 and a one-line message.

    `job` may be given as ``"module:function"``; it is then imported inside the guarded call. Under
    torchrun, every rank runs `job(cfg)` inside the job's process group (`fdsl.engine.distributed`).
    """
    def go() -> Any:
        cfg = parse_config(cls, argv, description)
        fn = _resolve(job)
        from fdsl.engine import distributed

        with distributed.session(cfg.device):
            from fdsl.config import config_to_dict

            distributed.check_same_settings(config_to_dict(cfg))  # torchrun: every rank runs the same job
            return fn(cfg)

    return run_command(go)


def train_main(argv: Sequence[str] | None = None) -> int:
    """`fdsl-train` / `python train.py`: train the scorers and NAM."""
    from fdsl.config import TrainConfig

    return main(TrainConfig, "fdsl.engine.training:train", argv)


def test_main(argv: Sequence[str] | None = None) -> int:
    """`fdsl-test` / `python test.py`: k-shot evaluation of a checkpoint."""
    from fdsl.config import TestConfig

    return main(TestConfig, "fdsl.engine.evaluation:evaluate", argv)
