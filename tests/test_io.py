"""Tests for fdsl.utils: device and precision resolution, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fdsl.core.runtime import resolve_align_precision, resolve_device, resolve_precision
from fdsl.errors import ConfigError
from fdsl.io import atomic_open, atomic_torch_save, atomic_write_json


@pytest.fixture
def no_cuda(monkeypatch):
    """Make the machine look CPU-only, whatever it really has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


# ---------------------------------------------------------------------------- devices
@pytest.mark.parametrize("spec", ["cpu", "CPU", " cpu ", torch.device("cpu")])
def test_cpu(spec) -> None:
    assert resolve_device(spec) == torch.device("cpu")


def test_auto_on_cpu_machine(no_cuda) -> None:
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_with_cuda_picks_cuda0(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda:0")


@pytest.mark.parametrize("spec", ["0", "cuda:0", "cuda", 1, "cuda:1"])
def test_cuda_without_cuda_is_an_error(no_cuda, spec) -> None:
    with pytest.raises(ConfigError) as exc:
        resolve_device(spec)
    msg = str(exc.value)
    assert repr(str(spec)) in msg or str(spec) in msg  # names the requested device
    assert "cpu" in msg  # and says what to do instead


def test_cuda_index_beyond_count_is_an_error(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("0") == torch.device("cuda:0")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match="cuda:3"):
        resolve_device("cuda:3")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "-1", "", "mps0", "cuda:0:1", "0.5"])
def test_garbage_device_is_an_error(no_cuda, spec) -> None:
    with pytest.raises(ConfigError):
        resolve_device(spec)


# ---------------------------------------------------------------------------- precision
def test_precision_auto_is_fp32_on_cpu() -> None:
    assert resolve_precision("auto", torch.device("cpu")) is torch.float32


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_precision_explicit_on_cpu(name, dtype) -> None:
    assert resolve_precision(name, torch.device("cpu")) is dtype


def test_precision_garbage() -> None:
    with pytest.raises(ConfigError, match="fp64"):
        resolve_precision("fp64", torch.device("cpu"))


def test_precision_auto_is_fp32_on_cuda_too() -> None:
    """Faithful by default on every device: auto never picks a reduced dtype (docs/method.md §6b)."""
    assert resolve_precision("auto", torch.device("cuda:0")) is torch.float32


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_align_precision_on_cpu(name, dtype) -> None:
    assert resolve_align_precision(name, torch.device("cpu")) is dtype


def test_align_precision_garbage() -> None:
    with pytest.raises(ConfigError, match="--align_precision 'auto'"):
        resolve_align_precision("auto", torch.device("cpu"))


@pytest.mark.parametrize("fn, flag", [(resolve_precision, "--precision"),
                                      (resolve_align_precision, "--align_precision")])
def test_bf16_on_cuda_without_bf16_is_an_error(monkeypatch, fn, flag) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Old GPU")
    with pytest.raises(ConfigError, match=f"{flag} bf16 is not supported by Old GPU"):
        fn("bf16", torch.device("cuda:0"))
    assert fn("fp16", torch.device("cuda:0")) is torch.float16


# ---------------------------------------------------------------------------- atomic writes
def test_atomic_write_json_roundtrip_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "result.json"  # parent created on demand
    obj = {"auroc": 0.5, "classes": ["a", "b"], "nested": {"k": [1, 2]}}
    atomic_write_json(target, obj)
    assert json.loads(target.read_text()) == obj
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]
    # overwrite
    atomic_write_json(target, {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]


def test_exception_mid_write_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    atomic_write_json(target, {"old": True})
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(target, "w", encoding="utf-8") as fh:
            fh.write('{"new": tr')  # half a document
            fh.flush()
            raise RuntimeError("boom")
    assert target.read_bytes() == before
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # temp file cleaned up


def test_exception_mid_write_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "never.json"
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(target) as fh:
            fh.write("partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_torch_save_roundtrip(tmp_path: Path) -> None:
    target = tmp_path / "t.pth"
    t = torch.arange(6.0).reshape(2, 3)
    atomic_torch_save({"t": t}, target)
    assert torch.equal(torch.load(target, weights_only=True)["t"], t)
    assert [p.name for p in tmp_path.iterdir()] == ["t.pth"]


# ---------------------------------------------------------------------------- hardening (issue 8)
def test_atomic_write_json_writes_null_for_undefined_numbers(tmp_path):
    import json as _json
    import math as _math

    from fdsl.io import atomic_write_json

    atomic_write_json(tmp_path / "r.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 0.5}})
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert _json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": 0.5}}
    assert not _math.isnan(0.5)


def test_prepare_run_dir_cleans_only_our_stale_temp_files(tmp_path):
    from fdsl.io import atomic_write_text, prepare_run_dir

    run = tmp_path / "run"
    (run / "per_class").mkdir(parents=True)
    stale = [run / ".epoch_2.pth.a1b2c3d4.tmp", run / "per_class" / ".bottle.json.zz_9yy8x.tmp"]
    for p in stale:
        p.write_bytes(b"")
    keep = [run / ".notes.tmp", run / "epoch_2.pth.a1b2c3d4.tmp", run / ".x.toolong123.tmp"]
    for p in keep:
        p.write_text("user file")
    assert prepare_run_dir(run) == run
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)
    atomic_write_text(run / "a.txt", "x")  # the naming atomic_open really uses is matched
    import fdsl.io as u
    assert u._TEMP_NAME.fullmatch(".a.txt.abcd_123.tmp")


def test_prepare_run_dir_one_line_errors(tmp_path, monkeypatch):
    import tempfile as _tempfile

    from fdsl.io import prepare_run_dir

    afile = tmp_path / "f"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=r"--save_path .*/f is an existing file"):
        prepare_run_dir(afile)
    with pytest.raises(ConfigError, match=r"cannot be created or written"):
        prepare_run_dir(afile / "sub")

    def denied(*a, **k):  # root ignores chmod, so simulate a read-only folder
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(_tempfile, "TemporaryFile", denied)
    with pytest.raises(ConfigError, match=r"--save_path .*ro cannot be created or written \(Permission denied\)"):
        prepare_run_dir(tmp_path / "ro")


def test_hold_sigint_defers_the_interrupt_to_the_end_of_the_block():
    import os as _os
    import signal as _signal

    from fdsl.engine.signals import hold_sigint

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with hold_sigint():
            _os.kill(_os.getpid(), _signal.SIGINT)
            reached.append("after kill")
    assert reached == ["after kill"]
    assert _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler
    with pytest.raises(ValueError):  # the block's own error wins; the held interrupt is dropped
        with hold_sigint():
            _os.kill(_os.getpid(), _signal.SIGINT)
            raise ValueError("x")
    with hold_sigint(reraise=False):
        _os.kill(_os.getpid(), _signal.SIGINT)
