"""Progress lines for long loops when no progress bar is shown (stderr is not a terminal: a log file, CI, a pipe).

On a terminal tqdm draws its bar; elsewhere the bar is off and a loop of minutes would print nothing, so
`progress_lines` logs one line every `every_s` seconds: what, how far (items of total), elapsed seconds.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
EVERY_S = 10.0


def bars_shown() -> bool:
    """Whether tqdm shows a bar (stderr is a terminal); progress lines are logged otherwise."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress_lines(items: Iterable[T], total: int, what: str, unit: str = "batches",
                   every_s: float = EVERY_S, enabled: bool | None = None) -> Iterator[T]:
    """Yield `items` unchanged; without a bar, log ``"<what>: i/total <unit>, s s"`` at most every `every_s` s.

    `enabled` forces the lines on or off (default: on when `bars_shown()` is false).
    """
    on = (not bars_shown()) if enabled is None else enabled
    start = last = time.monotonic()
    for i, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if on and now - last >= every_s and i < total:
            log.info("%s: %d/%d %s, %.0f s", what, i, total, unit, now - start)
            last = now


def busy_machine_note(threads: int) -> str | None:
    """A warning when the CPU is oversubscribed and PyTorch runs several threads (`threads`), else None.

    With more runnable processes than cores, PyTorch's threads wait on each other at every parallel region:
    measured on 2 shared cores (load average ~18), one training epoch of the tiny demo took ~15 s with one
    thread and over 5 minutes with two. OMP_NUM_THREADS set by the user silences the note.
    """
    import os

    if threads <= 1 or os.environ.get("OMP_NUM_THREADS"):
        return None
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load <= cores:
        return None
    return (f"the machine is busy (load average {load:.1f} on {cores} cores) and PyTorch runs {threads} threads, "
            "which then wait on each other: OMP_NUM_THREADS=1 can be several times faster here")
