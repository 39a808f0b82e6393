"""Shared entry-point wrapper: parse a config, run, and turn FDSL errors into one clear line."""
from __future__ import annotations

import logging
import sys
from typing import Callable, Optional, Sequence

from .config import parse_config
from .errors import FDSLError


def main(cls: type, job: Callable, argv: Optional[Sequence[str]] = None, description: str = "") -> int:
    """Parse `argv` into `cls`, run `job(cfg)`. Bad input exits with status 2 and a one-line message."""
    try:
        cfg = parse_config(cls, argv, description)
        job(cfg)
    except FDSLError as exc:
        logging.getLogger("fdsl").debug("error details", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished classes and checkpoints are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0
