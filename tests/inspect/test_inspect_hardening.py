"""Hardening of `fit` / `calibrate` / `predict` and the detector file (issue #18): every bad input or fault is
one line (exit 2) or a documented behaviour, never a traceback or a silently wrong result.

One tiny detector (random CLIP at 56 px, layers 1 2, no LFE; thresholds set with --max_fpr) is built per module.
"""
from __future__ import annotations

import csv
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fdsl_test_utils import small_calibrated_part
from PIL import Image

CLS = "carpet_syn"


def read_rows(path: Path) -> list:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _cli(*args) -> int:
    from fdsl.cli.inspection import main

    return main([str(a) for a in args])


def _error(capsys) -> str:
    """The one error line of the last command (and that there is exactly one, last, without a traceback)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-4:]
    assert not any("Traceback" in line for line in lines)
    return errors[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    return small_calibrated_part(tmp_path_factory.mktemp("harden"), CLS)


def _predict(env, images, out, *extra) -> int:
    return _cli("predict", "--detector", env.path, "--images", *images, "--out", out, "--device", "cpu",
                "--precision", "fp32", *extra)


def _rewrite(env, tmp_path, name="x.fdsl", tensors=None, **changes) -> Path:
    """A copy of the detector file with metadata fields changed (dotted keys reach into records)."""
    from safetensors.torch import save_file

    info = json.loads(json.dumps(env.det.info))
    for key, value in changes.items():
        *head, last = key.split("__")
        d = info
        for h in head:
            d = d[h]
        d[last] = value
    path = tmp_path / name
    save_file(tensors if tensors is not None else env.det.tensors(), str(path),
              metadata={"fdsl_detector": json.dumps(info)})
    return path


def _load(path, **kw):
    from fdsl.inspect.detector import Detector

    return Detector.load(path, runtime="cpu", **kw)


# --------------------------------------------------------------------------- silent wrong results


def test_replaced_input_is_scored_again_and_unreadable_is_reported(env, tmp_path):
    """#1: resume keys on the input's identity: a file copied over an input gets a new verdict."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    shutil.copy(env.good[0], incoming / "latest.png")
    shutil.copy(env.good[1], incoming / "other.png")
    out = tmp_path / "v"
    assert _predict(env, [incoming], out) == 0
    first = {Path(r["path"]).name: r for r in read_rows(out / "scores.csv")}
    shutil.copy(env.bad[0], incoming / "latest.png")  # a camera rewrites latest.png
    assert _predict(env, [incoming], out) == 0
    again = {Path(r["path"]).name: r for r in read_rows(out / "scores.csv")}
    expect = env.det.predict(incoming / "latest.png")[0].score
    assert float(again["latest.png"]["score"]) == pytest.approx(expect, abs=1e-6)
    assert again["latest.png"]["score"] != first["latest.png"]["score"]
    assert again["other.png"] == first["other.png"]
    assert json.loads((out / "summary.json").read_text())["n_skipped_done"] == 1
    (incoming / "latest.png").write_bytes(b"\x89PNG\r\n\x1a\n broken now")
    assert _predict(env, [incoming], out) == 0
    rows = read_rows(out / "scores.csv")
    assert [Path(r["path"]).name for r in rows] == ["other.png"]
    assert [Path(e["path"]).name for e in read_rows(out / "errors.csv")] == ["latest.png"]
    assert not (out / "overlays" / "latest.png").exists()


def test_out_that_is_the_input_folder_is_refused(env, tmp_path, capsys):
    """#2: --out equal to --images (its overlays would be scored as parts on the next run)."""
    folder = tmp_path / "parts"
    folder.mkdir()
    shutil.copy(env.good[0], folder / "a.png")
    capsys.readouterr()
    assert _predict(env, [folder], folder) == 2
    assert "is or holds the input folder" in _error(capsys)
    inside = folder / "verdicts"  # an --out inside the input folder is skipped when listing
    for _ in range(2):
        assert _predict(env, [folder], inside) == 0
        assert [Path(r["path"]).name for r in read_rows(inside / "scores.csv")] == ["a.png"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_threshold_is_refused(env, tmp_path, capsys, value):
    """#3."""
    capsys.readouterr()
    assert _predict(env, [env.good[0]], tmp_path / "v", f"--threshold={value}") == 2
    assert "--threshold must be a finite number" in _error(capsys)
    with pytest.raises(Exception, match="finite"):
        env.det.predict(env.good[0], threshold=float(value))


@pytest.mark.parametrize("option", [("--use_nam", "0"), ("--image_size", "112")])
def test_fit_refuses_overrides_the_checkpoint_contradicts(env, tmp_path, capsys, option):
    """#4: the same reconciliation as test.py."""
    capsys.readouterr()
    assert _cli("fit", "--checkpoint", env.ck, "--normal", env.root / CLS / "train" / "good", "--out",
                tmp_path / "x.fdsl", "--device", "cpu", *option) == 2
    line = _error(capsys)
    assert f"was trained with {option[0]}" in line and not (tmp_path / "x.fdsl").exists()


def test_second_run_into_one_out_is_refused_and_earlier_rows_are_kept(env, tmp_path, capsys, caplog):
    """#6: a lock on --out (a dead owner's lock is taken over); earlier runs' rows kept; no shared overlays."""
    import socket

    out = tmp_path / "v"
    out.mkdir()
    lock = out / ".predict.lock"

    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "earlier"}))
    capsys.readouterr()
    assert _predict(env, [env.good[0]], out) == 2
    assert f"in use by another predict run (pid {os.getpid()}" in _error(capsys)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    lock.write_text(json.dumps({"pid": int(gone), "host": socket.gethostname(), "started": "earlier"}))
    a, b = tmp_path / "a", tmp_path / "b"
    for d, src in ((a, env.good[0]), (b, env.bad[0])):
        d.mkdir()
        shutil.copy(src, d / "000.png")
    with caplog.at_level(logging.WARNING):
        assert _predict(env, [a], out) == 0
    assert "taking over the lock" in caplog.text and not lock.exists()
    assert _predict(env, [b], out) == 0
    rows = read_rows(out / "scores.csv")
    assert sorted(r["path"] for r in rows) == sorted([str(a / "000.png"), str(b / "000.png")])
    overlays = sorted(p.name for p in (out / "overlays").glob("*.png"))
    assert len(overlays) == 2, overlays  # a/000.png and b/000.png do not share overlays/000.png


def test_nan_thresholds_and_nan_banks_are_refused(env, tmp_path):
    """#7, #8: a detector file whose thresholds or banks hold NaN/inf is refused on load, naming the field."""
    from fdsl.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"'thresholds.image' must be a finite number"):
        _load(_rewrite(env, tmp_path, "t.fdsl", thresholds__image=float("nan")))
    with pytest.raises(CheckpointError, match=r"'thresholds.pixel' must be a finite number"):
        _load(_rewrite(env, tmp_path, "p.fdsl", thresholds__pixel=float("inf")))
    for bad in (float("nan"), float("inf")):
        tensors = env.det.tensors()
        key = next(k for k in tensors if k.startswith("memory.global_bank.tokens_"))
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0, 0] = bad
        with pytest.raises(CheckpointError, match=rf"{key}.*NaN or infinite"):
            _load(_rewrite(env, tmp_path, "b.fdsl", tensors=tensors))
    tensors = dict(env.det.tensors())
    key = next(k for k in tensors if k.startswith("memory.global_bank.tokens_"))
    tensors[key] = tensors[key].to(torch.int32)
    with pytest.raises(CheckpointError, match="dtype torch.int32"):
        _load(_rewrite(env, tmp_path, "d.fdsl", tensors=tensors))


def test_bank_shapes_are_checked_on_load(env, tmp_path):
    """#9: banks whose layers or image embeddings do not fit the model are refused, not a later traceback."""
    from fdsl.errors import CheckpointError

    tensors = env.det.tensors()
    emb = tensors["memory.global_bank.image_embeds"]
    tensors["memory.global_bank.image_embeds"] = torch.zeros(emb.shape[0], emb.shape[1] + 3)
    with pytest.raises(CheckpointError, match="image embeddings have shape"):
        _load(_rewrite(env, tmp_path, tensors=tensors))
    tensors = env.det.tensors()
    t1 = tensors["memory.global_bank.tokens_1"]
    tensors["memory.global_bank.tokens_1"] = t1[:, : t1.shape[1] // 2].contiguous()
    with pytest.raises(CheckpointError, match=r"layers of \(N, C\).*does not fit"):
        _load(_rewrite(env, tmp_path, "l.fdsl", tensors=tensors))


# --------------------------------------------------------------------------- tracebacks


@pytest.mark.parametrize("change, field", [
    ({"model_config": "ViT-B-16"}, "'model_config' must be a JSON object"),
    ({"model_config__image_size": "112"}, "'model_config.image_size' must be an integer"),
    ({"backbone": ["FDSL-Tiny-ViT"]}, "'backbone' must be a JSON object"),
    ({"thresholds__image": "0.5"}, "'thresholds.image' must be a finite number"),
    ({"thresholds": [0.1, 0.2]}, "'thresholds' must be a JSON object"),
    ({"cal_image_size": "abc"}, "'cal_image_size' must be an integer >= 1"),
    ({"cal_image_size": 0}, "'cal_image_size' must be an integer >= 1"),
    ({"cal_image_size": -5}, "'cal_image_size' must be an integer >= 1"),
    ({"format_version": "1"}, "'format_version' must be an integer >= 1"),
    ({"format_version": 0}, "'format_version' must be an integer >= 1"),
    ({"surprise": 1}, "unknown field 'surprise'"),
    ({"model_config__winmode": "sideways"}, "'model_config.winmode' must be one of"),
])
def test_metadata_schema_names_the_field(env, tmp_path, change, field):
    """#9: wrong JSON types, ranges, unknown keys: one CheckpointError naming the field."""
    from fdsl.errors import CheckpointError

    with pytest.raises(CheckpointError, match=field.replace("(", r"\(").replace("[", r"\[")):
        _load(_rewrite(env, tmp_path, **change))


def test_metadata_that_is_a_list_is_refused(env, tmp_path):
    from safetensors.torch import save_file

    from fdsl.errors import CheckpointError

    path = tmp_path / "list.fdsl"
    save_file(env.det.tensors(), str(path), metadata={"fdsl_detector": json.dumps([1, 2])})
    with pytest.raises(CheckpointError, match="metadata must be a JSON object"):
        _load(path)


@pytest.mark.parametrize("value", ["-3", "0"])
def test_predict_cal_image_size_must_be_positive(env, tmp_path, capsys, value):
    """#10 (0 used to mean "the default" silently)."""
    capsys.readouterr()
    assert _predict(env, [env.good[0]], tmp_path / "v", "--cal_image_size", value) == 2
    assert "--cal_image_size must be positive" in _error(capsys)


def _readonly(monkeypatch, folder: Path) -> None:
    """Make `folder` behave as a read-only mount (root ignores permission bits, so the failure is injected)."""
    import tempfile

    real_tf, real_mk = tempfile.TemporaryFile, tempfile.mkstemp

    def refuse(dir=None):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))

    def tf(*a, **k):
        refuse(k.get("dir"))
        return real_tf(*a, **k)

    def mk(*a, **k):
        refuse(k.get("dir"))
        return real_mk(*a, **k)

    monkeypatch.setattr(tempfile, "TemporaryFile", tf)
    monkeypatch.setattr(tempfile, "mkstemp", mk)


def test_unwritable_outputs_are_one_line(env, tmp_path, capsys, monkeypatch):
    """#11: a path component that is a file; read-only folders for fit, predict and calibrate."""
    a_file = tmp_path / "a.txt"
    a_file.write_text("x")
    normal = env.root / CLS / "train" / "good"
    capsys.readouterr()
    assert _cli("fit", "--checkpoint", env.ck, "--normal", normal, "--out", a_file / "x.fdsl", "--device", "cpu") == 2
    assert "cannot be written" in _error(capsys)
    ro = tmp_path / "ro"
    ro.mkdir()
    det = ro / "part.fdsl"
    shutil.copy(env.path, det)
    before = det.read_bytes()
    _readonly(monkeypatch, ro)
    assert _cli("fit", "--checkpoint", env.ck, "--normal", normal, "--out", ro / "y.fdsl", "--device", "cpu") == 2
    assert "Read-only file system" in _error(capsys)
    assert _predict(env, [env.good[0]], ro) == 2
    assert "Read-only file system" in _error(capsys)
    assert _cli("calibrate", "--detector", det, "--normal", *env.good, "--max_fpr", "0.5", "--device", "cpu") == 2
    line = _error(capsys)
    assert "cannot be rewritten" in line and "copy the detector to a writable folder" in line
    assert det.read_bytes() == before


def test_calibrate_that_cannot_save_writes_elsewhere(env, tmp_path, capsys, monkeypatch):
    """#11: the folder was writable, the rewrite failed (disk full): the calibration is written elsewhere."""
    import fdsl.inspect.detector as detector_module

    det = tmp_path / "d" / "part.fdsl"
    det.parent.mkdir()
    shutil.copy(env.path, det)
    real = detector_module.write_detector_file

    def full(path, tensors, info):
        if Path(path).resolve() == det.resolve():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, tensors, info)

    monkeypatch.setattr(detector_module, "write_detector_file", full)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert _cli("calibrate", "--detector", det, "--normal", *env.good, "--max_fpr", "0.0", "--device", "cpu") == 2
    line = _error(capsys)
    alt = tmp_path / "part.calibrated.fdsl"
    assert f"written to {alt} instead" in line and alt.is_file()
    assert _load(alt).info["thresholds"]["image_method"] == "max_fpr=0.0"


def _full_after(monkeypatch, n_ok: int) -> None:
    """Disk full: every atomic write after the first `n_ok` fails in fsync with ENOSPC."""
    import fdsl.io as io_module

    calls = {"n": 0}
    real = os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(io_module.os, "fsync", fsync)


def test_disk_full_during_predict_keeps_finished_work(env, tmp_path, capsys, monkeypatch):
    """#12: one line, no temporary or half-written file; the batches finished before are kept."""
    out = tmp_path / "v"
    images = [*env.good, *env.bad]
    # state + scores + errors (3 writes) up front, then per image a mask (anomalous) or not + overlay, then 3
    _full_after(monkeypatch, 3 + 2 + 2 + 3 + 1)
    capsys.readouterr()
    assert _predict(env, images, out, "--batch_size", "1") == 2
    assert "No space left on device" in _error(capsys)
    assert not list(out.rglob("*.tmp"))
    rows = read_rows(out / "scores.csv")
    assert 1 <= len(rows) < len(images)
    monkeypatch.undo()
    assert _predict(env, images, out, "--batch_size", "1") == 0  # resume finishes the rest
    assert len(read_rows(out / "scores.csv")) == len(images)


def test_disk_full_during_fit_and_test_py(env, tmp_path, capsys, monkeypatch):
    """#12: fit (safetensors reports ENOSPC as its own error) and test.py --save_images."""
    import safetensors.torch
    from fdsl_test_utils import tiny_test_argv

    from fdsl.cli.jobs import test_main

    def full(*a, **k):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", full)
        capsys.readouterr()
        assert _cli("fit", "--checkpoint", env.ck, "--normal", env.root / CLS / "train" / "good", "--out",
                    tmp_path / "x.fdsl", "--device", "cpu") == 2
        assert "No space left on device" in _error(capsys)
    assert not list(tmp_path.glob("*x.fdsl*"))
    _full_after(monkeypatch, 4)
    save = tmp_path / "eval"
    assert test_main(tiny_test_argv(env.root, env.ck, save, "--save_images", "1")) == 2
    assert "No space left on device" in _error(capsys)
    assert not list(save.rglob("*.tmp"))


def test_folder_named_like_a_file_output_does_not_collide(env, tmp_path):
    """#13: x.png/ (a folder) beside x.jpg: distinct outputs, by construction."""
    from fdsl.outputs.writers import output_names

    incoming = tmp_path / "in"
    (incoming / "x.png").mkdir(parents=True)
    Image.open(env.good[0]).convert("RGB").save(incoming / "x.jpg")
    shutil.copy(env.good[1], incoming / "x.png" / "y.png")
    out = tmp_path / "v"
    assert _predict(env, [incoming], out) == 0
    assert len(read_rows(out / "scores.csv")) == 2
    assert len(list((out / "overlays").rglob("*.png"))) == 2
    names = output_names(["x.jpg", "x.png/y.png", "x.png", "a.b/c.png", "a_b.png"])
    files = {n + ".png" for n in names}
    folders = {"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 1)}
    assert len(set(names)) == len(names) and not files & folders


def test_predict_takes_arrays_and_says_what_it_takes(env):
    """#14: HWC uint8 arrays are accepted (same score as the PIL image); bytes are a TypeError saying what works."""
    im = Image.open(env.bad[0]).convert("RGB")
    arr = np.asarray(im)
    by_pil = env.det.predict(im)[0].score
    assert env.det.predict(arr)[0].score == pytest.approx(by_pil, abs=1e-6)
    assert env.det.predict(np.stack([arr, arr]))[1].score == pytest.approx(by_pil, abs=1e-6)
    with pytest.raises(TypeError, match="uint8 numpy arrays"):
        env.det.predict(env.bad[0].read_bytes())
    with pytest.raises(TypeError, match="dtype float64"):
        env.det.predict(arr.astype(np.float64))


# --------------------------------------------------------------------------- smaller


def test_detector_given_as_checkpoint_says_so(env, tmp_path, capsys):
    capsys.readouterr()
    assert _cli("fit", "--checkpoint", env.path, "--normal", env.root / CLS / "train" / "good", "--out",
                tmp_path / "x.fdsl", "--device", "cpu") == 2
    line = _error(capsys)
    assert "FDSL detector" in line and "weights_only=False" not in line and "`False`" not in line


def test_detector_file_cannot_name_unpinned_files(env, tmp_path):
    """A weights file or model config named by a detector without a sha256 is not loaded unasked."""
    from fdsl.errors import CheckpointError

    with pytest.raises(CheckpointError, match="without a sha256.*--pretrained"):
        _load(_rewrite(env, tmp_path, model_config__pretrained=str(env.ck), backbone__pretrained=str(env.ck)))
    with pytest.raises(CheckpointError, match="extra model config"):
        _load(_rewrite(env, tmp_path, "m.fdsl", model_config__model_config=str(tmp_path)))


def test_head_mismatch_names_the_keys(env, tmp_path):
    from fdsl.errors import CheckpointError

    tensors = env.det.tensors()
    key = next(k for k in tensors if k.startswith("head.") and tensors[k].ndim == 2)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    with pytest.raises(CheckpointError, match=rf"shape mismatch at \['{key[len('head.'):]}'\]"):
        _load(_rewrite(env, tmp_path, tensors=tensors))


def test_calibrate_warns_on_an_image_given_as_normal_and_anomalous(env, caplog):
    from fdsl.inspect.detector import Detector

    det = Detector(env.det.model, env.det.memory, json.loads(json.dumps(env.det.info)))
    with caplog.at_level(logging.WARNING):
        det.calibrate([env.good[0], env.good[1]], [env.good[0], env.bad[0]])
    assert "both normal and anomalous" in caplog.text


def test_test_py_takes_pretrained_from_the_checkpoint():
    from fdsl.config import TestConfig
    from fdsl.core.checkpoint_io import reconcile_model_config

    cfg = TestConfig(checkpoint_path="x.pth")
    taken = reconcile_model_config(cfg, {"pretrained": "none"}, explicit=set(), source="x.pth")
    assert cfg.pretrained == "none" and taken["pretrained"] == "none"
    cfg = TestConfig(checkpoint_path="x.pth", pretrained="/weights/here.pt")
    reconcile_model_config(cfg, {"pretrained": "none"}, explicit={"pretrained"}, source="x.pth")
    assert cfg.pretrained == "/weights/here.pt"  # an explicit choice is kept, not an error


def test_duplicate_k_shot_is_a_warning_that_reaches_log_txt(tmp_path, caplog):
    from fdsl_test_utils import drop_fdsl_log_handlers

    from fdsl.config import TestConfig, config_warnings, parse_config
    from fdsl.io import setup_logging

    with caplog.at_level(logging.WARNING):
        cfg = parse_config(TestConfig, ["--checkpoint_path", "x.pth", "--k_shot", "1", "2", "2", "--seeds", "3", "3"])
    assert cfg.k_shot == [1, 2] and cfg.seeds == [3]
    assert "--k_shot lists [2] more than once" in caplog.text
    try:
        setup_logging(tmp_path / "log.txt", replay=config_warnings(cfg))
    finally:
        drop_fdsl_log_handlers()
    text = (tmp_path / "log.txt").read_text()
    assert "--k_shot lists [2]" in text and "--seeds lists [3]" in text


def test_single_run_into_a_protocol_folder_is_refused(tmp_path):
    from fdsl.engine.evaluation import check_not_protocol_run
    from fdsl.errors import ConfigError

    (tmp_path / "summary.json").write_text("{}")
    check_not_protocol_run(tmp_path, 4)  # the protocol itself may rerun there
    with pytest.raises(ConfigError, match="holds a protocol run"):
        check_not_protocol_run(tmp_path, 1)


def test_decompression_bomb_is_too_large_not_corrupt(tmp_path, monkeypatch):
    from fdsl.data.images import load_rgb
    from fdsl.errors import DataError

    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match=r"too large.*MAX_IMAGE_PIXELS = 1000") as exc:
        load_rgb(path)
    assert "corrupt" not in str(exc.value)


def test_exif_orientation_is_applied(tmp_path):
    from fdsl.data.images import load_rgb

    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    img.save(tmp_path / "cam.jpg", exif=exif, quality=95)
    out = load_rgb(tmp_path / "cam.jpg")
    assert out.size == (20, 40)
    top = np.asarray(out)[:5].mean(axis=(0, 1))
    assert top[2] > 200 and top[0] < 60  # the blue edge is on top, as viewers show it


def test_mask_size_wording(tmp_path):
    from fdsl.data.images import load_mask
    from fdsl.errors import DataError

    Image.new("L", (10, 10)).save(tmp_path / "m.png")
    with pytest.raises(DataError) as exc:
        load_mask(tmp_path / "m.png", (12, 10), image_path="img.png")
    msg = str(exc.value)
    assert "its image 'img.png' is 12x10" in msg and "image of image" not in msg
