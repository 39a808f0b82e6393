"""Tests for fdsl.engine.evaluation: reconciling settings with the checkpoint, resume on changed data, strict JSON,
refusing a training folder, one-line data errors (also from DataLoader workers), non-binary mask warnings."""
from __future__ import annotations

import json
import logging
import os
import shlex
from pathlib import Path

import pytest
from fdsl_test_utils import (
    drop_fdsl_log_handlers,
    save_tiny_checkpoint,
    tiny_data,
    tiny_test_argv,
)
from PIL import Image

from fdsl.cli.jobs import main
from fdsl.config import TestConfig as EvalConfig  # noqa: I001  (aliased: pytest would collect a class named Test*)
from fdsl.config import parse_config
from fdsl.data.indexers import build_mvtec_meta, write_meta
from fdsl.engine.evaluation import Evaluator
from fdsl.errors import CheckpointError

JOB = "fdsl.engine.evaluation:evaluate"


@pytest.fixture(autouse=True)
def _no_stale_log_handlers():
    yield
    drop_fdsl_log_handlers()


def _error_line(err: str) -> str:
    """The one `error:` line main() printed (log records go to stderr too); no traceback anywhere."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("evaluation")
    data = tiny_data(base / "data")
    ck = save_tiny_checkpoint(base / "ck" / "epoch_1.pth")
    ck_nonam = save_tiny_checkpoint(base / "ck_nonam" / "epoch_1.pth", use_nam=False)
    return base, data, ck, ck_nonam


def _fresh_data(tmp_path: Path) -> Path:
    return tiny_data(tmp_path / "data")


# ---------------------------------------------------------------------------- item 1: checkpoint settings
def test_checkpoint_settings_are_taken_when_not_given(setup, tmp_path, caplog):
    _, data, _, ck_nonam = setup
    cfg = parse_config(EvalConfig, tiny_test_argv(data, ck_nonam, tmp_path / "out"))
    assert cfg.use_nam is True  # the default
    with caplog.at_level(logging.INFO):
        ev = Evaluator(cfg)
    assert cfg.use_nam is False and ev.model.head.use_nam is False
    assert "using its --use_nam 0" in caplog.text


def test_checkpoint_settings_conflict_is_an_error(setup, tmp_path):
    _, data, _, ck_nonam = setup
    cfg = parse_config(EvalConfig, tiny_test_argv(data, ck_nonam, tmp_path / "out", "--use_nam", "1"))
    with pytest.raises(CheckpointError, match=r"--use_nam 0 but this run sets --use_nam 1"):
        Evaluator(cfg)


def test_checkpoint_layers_are_taken_with_few_shot_features(setup, tmp_path):
    _, data, ck, _ = setup
    argv = [a for a in tiny_test_argv(data, ck, tmp_path / "out")]
    i = argv.index("--features_list")
    del argv[i:i + 3]
    i = argv.index("--few_shot_features")
    del argv[i:i + 3]
    cfg = parse_config(EvalConfig, argv)
    assert cfg.features_list == [6, 12, 18, 24]
    Evaluator(cfg)
    assert cfg.features_list == [1, 2] and cfg.few_shot_features == [1, 2]


# ---------------------------------------------------------------------------- item 2: resume after data changed
def test_finished_class_is_recomputed_when_its_data_changed(setup, tmp_path, caplog):
    _, _, ck, _ = setup
    data = _fresh_data(tmp_path)
    out = tmp_path / "out"
    argv = tiny_test_argv(data, ck, out)
    assert main(EvalConfig, JOB, argv) == 0
    first = json.loads((out / "results.json").read_text())
    with caplog.at_level(logging.INFO):
        assert main(EvalConfig, JOB, argv) == 0
    assert "already finished" in caplog.text and "recomputing" not in caplog.text
    # Delete a test image and rebuild meta.json: the saved class must not be reused.
    meta = json.loads((data / "meta.json").read_text())
    victim = meta["test"]["carpet_syn"][0]["img_path"]
    os.unlink(data / victim)
    write_meta(data, build_mvtec_meta(data))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(EvalConfig, JOB, argv) == 0
    assert "recomputing the class" in caplog.text
    rows = (out / "scores.csv").read_text().splitlines()
    assert len(rows) == 1 + len(meta["test"]["carpet_syn"]) - 1
    assert victim not in "".join(rows)
    assert json.loads((out / "results.json").read_text()) != first


def test_replaced_file_with_same_list_is_recomputed(setup, tmp_path, caplog):
    _, _, ck, _ = setup
    data = _fresh_data(tmp_path)
    argv = tiny_test_argv(data, ck, tmp_path / "out")
    assert main(EvalConfig, JOB, argv) == 0
    meta = json.loads((data / "meta.json").read_text())
    mask = data / next(it["mask_path"] for it in meta["test"]["carpet_syn"] if it["mask_path"])
    Image.open(mask).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mask)
    os.utime(mask, ns=(1, 1))  # a different mtime even on coarse-clock file systems
    with caplog.at_level(logging.INFO):
        assert main(EvalConfig, JOB, argv) == 0
    assert "recomputing the class" in caplog.text


# ---------------------------------------------------------------------------- strict JSON
def test_undefined_metrics_are_null_in_results_json(setup, tmp_path):
    _, data, ck, _ = setup
    out = tmp_path / "out"
    assert main(EvalConfig, JOB, tiny_test_argv(data, ck, out, "--aupro", "0")) == 0
    text = (out / "results.json").read_text()
    assert "NaN" not in text
    res = json.loads(text)
    assert res["classes"]["carpet_syn"]["aupro"] is None and res["mean"]["aupro"] is None
    # A rerun reuses the class (null read back as undefined) and writes the same strict file.
    assert main(EvalConfig, JOB, tiny_test_argv(data, ck, out, "--aupro", "0")) == 0
    assert json.loads((out / "results.json").read_text())["mean"]["aupro"] is None


# ---------------------------------------------------------------------------- training folder, empty class
def test_refuses_a_save_path_holding_a_training_run(setup, tmp_path, capsys):
    _, data, ck, _ = setup
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    (train_dir / "config.json").write_text('{"k": 1}')
    (train_dir / "epoch_3.pth").write_bytes(b"x")
    assert main(EvalConfig, JOB, tiny_test_argv(data, ck, train_dir)) == 2
    err = _error_line(capsys.readouterr().err)
    assert "holds a training run (epoch_3.pth)" in err
    assert (train_dir / "config.json").read_text() == '{"k": 1}'
    assert not (train_dir / "log.txt").exists()


def test_class_without_test_images_is_one_line_error(setup, tmp_path, capsys):
    _, _, ck, _ = setup
    data = _fresh_data(tmp_path)
    meta = json.loads((data / "meta.json").read_text())
    meta["test"]["carpet_syn"] = []
    (data / "meta.json").write_text(json.dumps(meta))
    assert main(EvalConfig, JOB, tiny_test_argv(data, ck, tmp_path / "out")) == 2
    err = _error_line(capsys.readouterr().err)
    assert "['carpet_syn'] have no test images" in err


# ---------------------------------------------------------------------------- item 7: errors in workers
@pytest.mark.parametrize("workers", [0, 2])
def test_data_error_in_workers_is_one_line(setup, tmp_path, capsys, workers):
    _, _, ck, _ = setup
    data = _fresh_data(tmp_path)
    meta = json.loads((data / "meta.json").read_text())
    bad = data / meta["test"]["carpet_syn"][1]["img_path"]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG: decoded in a worker
    argv = tiny_test_argv(data, ck, tmp_path / "out", "--num_workers", workers)
    assert main(EvalConfig, JOB, argv) == 2
    err = _error_line(capsys.readouterr().err)
    assert err.startswith("error: Cannot decode image") and str(bad) in err
    assert "DataLoader worker" not in err and "Caught" not in err


# ---------------------------------------------------------------------------- item 6: non-binary masks
def test_non_binary_masks_warn_once_per_class(setup, tmp_path, caplog):
    _, _, ck, _ = setup
    data = _fresh_data(tmp_path)
    meta = json.loads((data / "meta.json").read_text())
    for it in meta["test"]["carpet_syn"]:
        if it["mask_path"]:
            m = Image.open(data / it["mask_path"]).convert("L")
            m.point(lambda v: 128 if v else 0).save(data / it["mask_path"])  # still binary: 0 and 128
    cfg = parse_config(EvalConfig, tiny_test_argv(data, ck, tmp_path / "out0"))
    with caplog.at_level(logging.WARNING):
        Evaluator(cfg).run()
    assert "other than 0 and its maximum" not in caplog.text
    for it in meta["test"]["carpet_syn"]:
        if it["mask_path"]:
            m = Image.open(data / it["mask_path"]).convert("L")
            m.point(lambda v: 255 if v > 0 else 0).resize((32, 32)).resize(m.size, Image.BILINEAR).save(
                data / it["mask_path"])  # soft edges: values between 0 and 255
    caplog.clear()
    cfg = parse_config(EvalConfig, tiny_test_argv(data, ck, tmp_path / "out1", "--batch_size", "1"))
    with caplog.at_level(logging.WARNING):
        Evaluator(cfg).run()
    assert caplog.text.count("other than 0 and its maximum") == 1
    assert "class carpet_syn" in caplog.text


def test_fingerprint_covers_the_resolved_dtypes_not_only_the_precision_flag(setup, tmp_path) -> None:
    """A record computed under other dtypes (e.g. an old CUDA run where `auto` meant fp16) is never reused."""
    import torch

    from fdsl.core.runtime import Runtime
    from fdsl.engine.evaluation import _fingerprint

    _, data, ck, _ = setup
    cfg = parse_config(EvalConfig, tiny_test_argv(data, ck, tmp_path / "out"))
    fp32 = _fingerprint(cfg, Runtime())
    assert fp32 == _fingerprint(cfg, Runtime())
    assert fp32 != _fingerprint(cfg, Runtime(compute_dtype=torch.float16))
    assert fp32 != _fingerprint(cfg, Runtime(window_align_dtype=torch.float16))
    assert fp32 == _fingerprint(cfg, Runtime(win_batch=3, align_chunk_mb=7))  # memory bounds change no number


# ---------------------------------------------------------------------------- rerunning a saved run
def test_checkpoint_path_alone_gives_the_model_settings(setup, tmp_path):
    """No --model, --pretrained, --image_size or --features_list: the checkpoint's are used, same scores."""
    _, data, ck, _ = setup
    full = tiny_test_argv(data, ck, tmp_path / "full")
    assert main(EvalConfig, JOB, full) == 0
    bare = ["--data_path", str(data), "--checkpoint_path", str(ck), "--save_path", str(tmp_path / "bare"),
            "--batch_size", "2", "--num_workers", "0", "--cal_image_size", "32", "--device", "cpu"]
    assert main(EvalConfig, JOB, bare) == 0
    assert (tmp_path / "bare" / "scores.csv").read_bytes() == (tmp_path / "full" / "scores.csv").read_bytes()
    saved = json.loads((tmp_path / "bare" / "config.json").read_text())
    assert (saved["model"], saved["pretrained"], saved["image_size"]) == ("FDSL-Tiny-ViT", "none", 56)
    prov = json.loads((tmp_path / "bare" / "results.json").read_text())["provenance"]
    assert prov["options"] == shlex.join(bare) and prov["backbone"] == "FDSL-Tiny-ViT"
    assert prov["random_weights"] and prov["weights"] == {"tag": "none"}


def test_config_json_reruns_a_saved_run(setup, tmp_path):
    """`--config <run>/config.json --save_path NEW` reproduces that run's scores.csv byte for byte."""
    _, data, ck, _ = setup
    first = tmp_path / "first"
    assert main(EvalConfig, JOB, tiny_test_argv(data, ck, first, "--seed", "5", "--winmode", "mul",
                                                "--win_size", "2", "--win_stride", "1")) == 0
    again = tmp_path / "again"
    assert main(EvalConfig, JOB, ["--config", str(first / "config.json"), "--save_path", str(again)]) == 0
    assert (again / "scores.csv").read_bytes() == (first / "scores.csv").read_bytes()
    assert (again / "k_shot.txt").read_text() == (first / "k_shot.txt").read_text()
    rerun = json.loads((again / "config.json").read_text())
    assert rerun == json.loads((first / "config.json").read_text()) | {"save_path": str(again),
                                                                        "config": str(first / "config.json")}

