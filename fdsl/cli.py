"""Shared entry-point wrapper: parse a config, run, and turn FDSL errors into one clear line."""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Optional, Sequence

from . import distributed
from .config import parse_config
from .errors import FDSLError


def run_job(job: Callable[[], Any], explain: Optional[Callable[[FDSLError], str]] = None) -> int:
    """Run `job()` as a command: 0 on success; bad input exits 2 with a one-line message, Ctrl-C exits 130.

    `explain` may turn an error into a longer, actionable message (the demo's offline hint).
    """
    try:
        job()
    except FDSLError as exc:
        logging.getLogger("fdsl").debug("error details", exc_info=True)
        line = distributed.error_line(exc, explain(exc) if explain else f"error: {exc}")  # torchrun: once
        if line:
            print(line, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished classes and checkpoints are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0


def main(cls: type, job: Callable, argv: Optional[Sequence[str]] = None, description: str = "") -> int:
    """Parse `argv` into `cls`, run `job(cfg)`. Bad input exits with status 2 and a one-line message.

    Under torchrun, every rank runs `job(cfg)` inside the job's process group (`fdsl.distributed`).
    """
    def go() -> Any:
        cfg = parse_config(cls, argv, description)
        with distributed.session(cfg.device):
            return job(cfg)

    return run_job(go)


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """`fdsl-train` / `python train.py`: train the scorers and NAM."""
    from .config import TrainConfig
    from .training import train

    return main(TrainConfig, train, argv)


def test_main(argv: Optional[Sequence[str]] = None) -> int:
    """`fdsl-test` / `python test.py`: k-shot evaluation of a checkpoint."""
    from .config import TestConfig
    from .evaluation import evaluate

    return main(TestConfig, evaluate, argv)
