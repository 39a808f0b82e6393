"""Progress lines: one log line at most every `every_s` seconds, only where no bar is drawn."""
from __future__ import annotations

import logging

from fdsl import progress


def test_lines_come_at_most_every_interval(monkeypatch, caplog):
    clock = iter(float(t) for t in [0, 4, 11, 12, 25, 26, 40])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="fdsl.progress"):
        got = list(progress.progress_lines(range(6), 6, "epoch 1/2", every_s=10, enabled=True))
    assert got == list(range(6))  # items pass through unchanged
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["epoch 1/2: 2/6 batches, 11 s", "epoch 1/2: 4/6 batches, 25 s"]  # none at the end


def test_no_lines_when_a_bar_is_shown(monkeypatch, caplog):
    monkeypatch.setattr(progress, "bars_shown", lambda: True)
    monkeypatch.setattr(progress.time, "monotonic", iter(range(0, 1000, 50)).__next__)
    with caplog.at_level(logging.INFO, logger="fdsl.progress"):
        assert list(progress.progress_lines(range(5), 5, "x")) == list(range(5))
    assert not caplog.records
    monkeypatch.setattr(progress, "bars_shown", lambda: False)
    with caplog.at_level(logging.INFO, logger="fdsl.progress"):
        list(progress.progress_lines(range(5), 5, "x"))
    assert len(caplog.records) == 4


def test_busy_machine_note(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (18.0, 17.0, 15.0))
    note = progress.busy_machine_note(2)
    assert note and "load average 18.0 on 2 cores" in note and "OMP_NUM_THREADS=1" in note
    assert progress.busy_machine_note(1) is None  # one thread: nothing to wait on
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    assert progress.busy_machine_note(2) is None
    monkeypatch.setattr(os, "getloadavg", lambda: (18.0, 17.0, 15.0))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert progress.busy_machine_note(2) is None  # the user chose
