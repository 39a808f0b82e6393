"""Shared entry-point wrapper: parse a config, run, and turn FDSL errors into one clear line."""
from __future__ import annotations

import importlib
import logging
import sys
from typing import Callable, Optional, Sequence, Union

from .config import parse_config
from .errors import FDSLError, user_message

INTERRUPTED = "interrupted; rerun the same command to resume (finished classes and checkpoints are kept)"


def main(cls: type, job: Union[Callable, str], argv: Optional[Sequence[str]] = None, description: str = "") -> int:
    """Parse `argv` into `cls`, run `job(cfg)`. Bad input exits with status 2 and a one-line message.

    `job` may be given as ``"module:function"``; it is then imported here, so that a Ctrl-C during the
    (slow) import of torch also ends with the one-line message and exit status 130.
    """
    try:
        cfg = parse_config(cls, argv, description)
        if isinstance(job, str):
            module, _, name = job.partition(":")
            job = getattr(importlib.import_module(module), name)
        job(cfg)
    except FDSLError as exc:
        logging.getLogger("fdsl").debug("error details", exc_info=True)
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    return 0
