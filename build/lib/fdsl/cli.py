"""Shared entry-point wrapper: parse a config, run, and turn FDSL errors into one clear line."""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Optional, Sequence

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
        print(explain(exc) if explain else f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished classes and checkpoints are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0


def main(cls: type, job: Callable, argv: Optional[Sequence[str]] = None, description: str = "") -> int:
    """Parse `argv` into `cls`, run `job(cfg)`. Bad input exits with status 2 and a one-line message."""
    return run_job(lambda: job(parse_config(cls, argv, description)))


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
