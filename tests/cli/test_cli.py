"""Tests for the command-line entry points (fdsl.cli.jobs): one-line errors, exit codes, Ctrl-C with workers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fdsl_test_utils import (
    TINY_MODEL_ARGS,
    drop_fdsl_log_handlers,
    save_tiny_checkpoint,
    tiny_data,
    tiny_test_argv,
)

from fdsl.cli.jobs import INTERRUPTED, main
from fdsl.config import TestConfig as EvalConfig  # noqa: I001  (aliased: pytest would collect a class named Test*)
from fdsl.config import TrainConfig
from fdsl.errors import DataError, user_message

ROOT = Path(__file__).resolve().parents[2]
CLASSES = tuple(f"c{i}_syn" for i in range(8))


@pytest.fixture(autouse=True)
def _no_stale_log_handlers():
    yield
    drop_fdsl_log_handlers()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    data = tiny_data(base / "data", classes=CLASSES, n_train=1, n_test_good=2, n_test_bad=2)
    ck = save_tiny_checkpoint(base / "ck" / "epoch_1.pth")
    return base, data, ck


def _error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_user_message_recovers_the_worker_exception_message():
    wrapped = DataError("Caught DataError in DataLoader worker process 1.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 3, in f\n    raise DataError(msg)\n"
                        "fdsl.errors.DataError: Cannot decode image 'a.png' (broken).\n")
    assert user_message(wrapped) == "Cannot decode image 'a.png' (broken)."
    assert user_message(DataError("plain  message\nsecond")) == "plain message second"


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_save_path_that_is_a_file_is_one_line(setup, tmp_path, capsys, where):
    _, data, ck = setup
    afile = tmp_path / "taken"
    afile.write_text("x")
    target = afile if where == "file" else afile / "run"
    assert main(EvalConfig, "fdsl.engine.evaluation:evaluate", tiny_test_argv(data, ck, target)) == 2
    assert "--save_path" in _error_line(capsys.readouterr().err)
    argv = [*TINY_MODEL_ARGS, "--train_data_path", str(data), "--save_path", str(target), "--k_shot", "1"]
    assert main(TrainConfig, "fdsl.engine.training:train", argv) == 2
    assert "--save_path" in _error_line(capsys.readouterr().err)


def test_unwritable_save_path_is_one_line(setup, tmp_path, capsys, monkeypatch):
    import tempfile

    _, data, ck = setup

    def denied(*a, **k):  # tests run as root, which ignores chmod: simulate the read-only folder
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    assert main(EvalConfig, "fdsl.engine.evaluation:evaluate", tiny_test_argv(data, ck, tmp_path / "ro")) == 2
    assert "Permission denied" in _error_line(capsys.readouterr().err)


def test_train_worker_data_error_is_one_line(setup, tmp_path, capsys):
    import json
    import shutil

    _, data, _ = setup
    root = tmp_path / "data"
    shutil.copytree(data, root)
    meta = json.loads((root / "meta.json").read_text())
    bad = root / meta["test"][CLASSES[0]][-1]["mask_path"]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    argv = [*TINY_MODEL_ARGS, "--train_data_path", str(root), "--save_path", str(tmp_path / "run"), "--k_shot",
            "1", "--classes", CLASSES[0], "--epoch", "1", "--batch_size", "2", "--num_workers", "2"]
    assert main(TrainConfig, "fdsl.engine.training:train", argv) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("error: Cannot decode mask") and str(bad) in line


# ---------------------------------------------------------------------------- Ctrl-C (item 11)
def _interrupt_once(data: Path, ck: Path, out: Path, delay: float, nth_class: int) -> tuple[int, str]:
    """Run test.py with 2 workers; send SIGINT to its process group `delay` s after the `nth_class`-th
    class's dataset is built (its DataLoader workers start right then). Returns (exit code, stderr)."""
    argv = tiny_test_argv(data, ck, out, "--num_workers", 2)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "test.py"), *argv], cwd=out.parent, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen, lines = 0, []
    try:
        while True:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "INFO fdsl.data.datasets: AnomalyDataset" in line:
                seen += 1
                if seen == nth_class:
                    time.sleep(delay)
                    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: main process and workers
                    break
        rest = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(lines) + rest


def _assert_interrupted(rc: int, err: str) -> None:
    assert rc == 130, err[-3000:]
    assert err.rstrip().splitlines()[-1] == INTERRUPTED
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]


def test_ctrl_c_in_test_py_while_class_workers_start(setup, tmp_path):
    _, data, ck = setup
    _assert_interrupted(*_interrupt_once(data, ck, tmp_path / "out", 0.005, nth_class=2))
    assert "rerun the same command to resume" in INTERRUPTED


def test_ctrl_c_at_many_moments_of_worker_start_up(setup, tmp_path):
    """The same job as test.py, interrupted at several delays after a class's loader starts (torch imported once)."""
    import json

    _, data, ck = setup
    delays = [0.0, 0.002, 0.005, 0.01, 0.03, 0.06]
    argv = tiny_test_argv(data, ck, tmp_path / "out", "--num_workers", 2)
    # `-m` from tests/: the probe imports the installed fdsl (no sys.path insert)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "tests"),
                                                                     os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "interrupt_probe", ",".join(map(str, delays)), "2", "--", *argv],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [t["delay"] for t in trials] == delays
    for t in trials:
        _assert_interrupted(t["rc"], t["stderr"])
