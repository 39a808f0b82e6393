"""Ctrl-C handling: hold SIGINT while workers start, make data loaders interruptible."""
from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)


@contextlib.contextmanager
def hold_sigint(reraise: bool = True) -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) for the duration of the block, then act on it.

    Inside, SIGINT is blocked on the calling (main) thread, so worker processes forked in the block start
    with it blocked (see `worker_ignore_sigint`), and a SIGINT that reaches the process is recorded instead
    of raising in the middle of worker start-up or shut-down. On leaving, a recorded interrupt is raised as
    KeyboardInterrupt, unless `reraise` is False (an exception is already on its way out) or the block
    itself raised.
    """
    held = []

    def record(signum, frame):
        held.append(signum)

    try:
        previous = signal.signal(signal.SIGINT, record)
    except ValueError:  # not the main thread: nothing to hold
        yield
        return
    _sigmask(signal.SIG_BLOCK)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        _sigmask(signal.SIG_UNBLOCK)  # a pending SIGINT runs `record` now
        signal.signal(signal.SIGINT, previous)
        if held and reraise and not failed:
            raise KeyboardInterrupt



def worker_ignore_sigint(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: workers ignore Ctrl-C (the main process acts on it and stops them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _sigmask(signal.SIG_UNBLOCK)



def _sigmask(how: int) -> None:
    """Block or unblock SIGINT for the calling thread (POSIX; a no-op where there is no pthread_sigmask)."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(how, {signal.SIGINT})



def interruptible(loader: Iterable) -> Iterator[Any]:
    """Iterate a DataLoader so that Ctrl-C always ends in a plain KeyboardInterrupt in the main process.

    Worker start-up and shut-down run under `hold_sigint`; build the loader with
    ``worker_init_fn=worker_ignore_sigint``.
    """
    with hold_sigint():
        it = iter(loader)
    try:
        yield from it
    except BaseException:  # KeyboardInterrupt, a data error, or GeneratorExit: already on its way out
        with hold_sigint(reraise=False):
            _shutdown(it)
        raise
    with hold_sigint():
        _shutdown(it)



def _shutdown(it: Any) -> None:
    """Stop a DataLoader iterator's workers now (rather than whenever it is garbage-collected)."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
