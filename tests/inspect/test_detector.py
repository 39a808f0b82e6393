"""Fitted detectors (fdsl.inspect.detector) and the inspection CLI (`python -m fdsl fit | predict | calibrate`).

One tiny checkpoint (a random head with data-driven BN statistics, LFE on) and one synthetic MVTec-layout class
are built per module; everything else reuses them.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fdsl_test_utils import liven_head
from PIL import Image

from fdsl.config import RuntimeConfig

ROOT = Path(__file__).resolve().parents[2]
TINY = "FDSL-Tiny-ViT"
CLS = "brick_syn"
DEFECTS_EXCLUDED = ("good",)
CPU_FP32 = RuntimeConfig(device="cpu", precision="fp32")


def read_csv(path: Path) -> tuple[list, list]:
    with path.open(newline="") as fh:
        r = csv.DictReader(fh)
        return list(r.fieldnames or []), list(r)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    import open_clip

    from fdsl.config import ModelConfig
    from fdsl.core.backbone import register_model_configs
    from fdsl.core.model import FDSL
    from fdsl.data.shots import load_reference_images
    from fdsl.data.synthetic import make_synthetic_dataset
    from fdsl.engine.checkpoint import save_checkpoint
    from fdsl.inspect.detector import Detector

    work = tmp_path_factory.mktemp("detector")
    root = make_synthetic_dataset(work / "B", classes=(CLS,), n_train=4, n_test_good=4, n_test_bad=6,
                                  image_size=128, seed=1)
    register_model_configs()
    torch.manual_seed(0)
    weights = work / "tiny_clip.pt"
    torch.save(open_clip.create_model(TINY).state_dict(), weights)
    mcfg = ModelConfig(model=TINY, pretrained=str(weights), image_size=112, features_list=[1, 2, 3, 4],
                       few_shot_features=[1, 2, 3, 4], winmode="mul", win_size=4, win_stride=2)
    torch.manual_seed(3)
    model = FDSL.from_config(mcfg).eval()
    train = sorted(f"{CLS}/train/good/{p.name}" for p in (root / CLS / "train" / "good").glob("*.png"))
    test = sorted(str(p.relative_to(root)) for p in (root / CLS / "test").rglob("*.png"))
    liven_head(model, load_reference_images(root, train[:2], 112), load_reference_images(root, test, 112))
    checkpoint = work / "ck" / "epoch_1.pth"
    save_checkpoint(checkpoint, model.head, dataclasses.asdict(mcfg), epoch=1)
    det = Detector.fit(checkpoint, root / CLS / "train" / "good", runtime=CPU_FP32)
    defects = sorted(d for d in (root / CLS / "test").iterdir() if d.name not in DEFECTS_EXCLUDED)
    return SimpleNamespace(work=work, root=root, weights=weights, mcfg=mcfg, checkpoint=checkpoint, det=det,
                           train=train, defects=defects)


def _load_quiet(path, **kw):
    from fdsl.inspect.detector import Detector

    return Detector.load(path, runtime=CPU_FP32, **kw)


# --------------------------------------------------------------------------- scores


def test_predict_scores_equal_test_py(env, tmp_path):
    """Same shots and checkpoint: predict's score is test.py's 0.5·(patch_score + map_max), map_max its column."""
    from fdsl.config import TestConfig
    from fdsl.engine.evaluation import Evaluator

    k_file = tmp_path / "k_shot.txt"
    k_file.write_text("".join(p + "\n" for p in env.train))
    fields = {f.name: getattr(env.mcfg, f.name) for f in dataclasses.fields(env.mcfg)}
    cfg = TestConfig(**fields, data_path=str(env.root), checkpoint_path=str(env.checkpoint),
                     save_path=str(tmp_path / "eval"), k_shot=len(env.train), k_shot_file=str(k_file),
                     batch_size=8, num_workers=0, device="cpu", precision="fp32", aupro=False)
    Evaluator(cfg).run()
    _, rows = read_csv(tmp_path / "eval" / "scores.csv")
    assert len(rows) == 10
    preds = env.det.predict([env.root / r["img_path"] for r in rows], batch_size=3)  # other batching on purpose
    expect = np.array([0.5 * (float(r["patch_score"]) + float(r["map_max"])) for r in rows])
    got = np.array([p.score for p in preds])
    assert np.std(expect) > 1e-3, "scores should vary, or the comparison says little"
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-6)
    np.testing.assert_allclose([p.map_max for p in preds], [float(r["map_max"]) for r in rows], rtol=0, atol=1e-6)
    assert all(p.is_anomalous is None and p.mask is None for p in preds)  # uncalibrated: no verdict


def test_save_load_restores_everything_without_reencoding(env, tmp_path, monkeypatch):
    from fdsl import __version__
    from fdsl.core.model import FDSL
    from fdsl.outputs.files import sha256_file

    path = env.det.save(tmp_path / "part.fdsl")
    images = sorted((env.root / CLS / "test").rglob("*.png"))
    before = env.det.predict(images)

    def boom(*a, **k):
        raise AssertionError("loading must not re-encode reference images")

    monkeypatch.setattr(FDSL, "encode_references", boom)
    monkeypatch.setattr(FDSL, "extract_windows", boom)
    det = _load_quiet(path)
    after = det.predict(images)
    assert [p.score for p in after] == [p.score for p in before]
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    info = det.info
    assert info["fdsl_version"] == __version__ and info["format_version"] == 1
    assert info["backbone"]["model"] == TINY and info["backbone"]["pretrained"] == env.weights.name
    assert info["backbone"]["sha256"] == sha256_file(env.weights)
    assert info["model_config"]["winmode"] == "mul" and info["model_config"]["win_size"] == 4
    names = [n["name"] for n in info["normal_images"]]
    assert names == [Path(p).name for p in env.train]
    assert [n["sha256"] for n in info["normal_images"]] == [sha256_file(env.root / p) for p in env.train]
    assert det.memory.window_bank is not None and det.memory.window_bank.k == len(env.train) * 9
    for k, v in env.det.memory.state_dict().items():
        assert torch.equal(det.memory.state_dict()[k], v), k
    assert info["thresholds"] == {"image": None, "pixel": None}


# --------------------------------------------------------------------------- thresholds


def test_calibrate_max_fpr_gives_requested_rate(env, tmp_path):
    det = _load_quiet(env.det.save(tmp_path / "part.fdsl"))
    normal = [env.root / CLS / "train" / "good", env.root / CLS / "test" / "good"]  # 8 normal images
    rep = det.calibrate(normal, env.defects, max_fpr=0.25)
    scores = np.array([p.score for p in det.predict(normal)])
    thr = det.image_threshold
    assert len(scores) == 8 and rep["image"] == thr
    assert np.mean(scores > thr) <= 0.25
    assert np.sum(scores > thr) == 2, "the lowest threshold allowed by the rate: 2 of 8 normal images above"
    assert rep["image_fpr"] == pytest.approx(np.mean(scores > thr))
    det.save(tmp_path / "part.fdsl")
    again = _load_quiet(tmp_path / "part.fdsl")
    assert again.image_threshold == thr and again.pixel_threshold == rep["pixel"]
    preds = again.predict(normal)
    assert [p.is_anomalous for p in preds] == [bool(s > thr) for s in scores]
    # No masks: at most the same share of normal images shows any defect pixel.
    assert np.mean([p.defect_area_px > 0 for p in preds]) <= 0.25 + 1e-9


def test_calibrate_f1_with_masks_is_f1_max(env, tmp_path):
    from fdsl.metrics import metrics

    det = _load_quiet(env.det.save(tmp_path / "part.fdsl"))
    normal = env.root / CLS / "test" / "good"
    rep = det.calibrate(normal, env.defects, masks=env.root / CLS / "ground_truth")
    assert rep["image_method"] == "f1_max" and rep["pixel_method"] == "f1_max_masks"
    preds = det.predict([normal, *env.defects])
    labels = np.r_[np.zeros(4, bool), np.ones(6, bool)]
    scores = np.array([p.score for p in preds])
    pred = scores > det.image_threshold
    tp = float(np.sum(pred & labels))
    f1 = 2 * tp / (pred.sum() + labels.sum())
    assert f1 == pytest.approx(metrics.f1_max(labels, scores)) and rep["image_f1"] == pytest.approx(f1)
    assert rep["pixel_f1"] == pytest.approx(metrics.f1_max(*_pixel_truth(env, preds)), abs=1e-9)


def _pixel_truth(env, preds):
    from fdsl.data.images import load_mask, mask_transform

    gt = np.zeros((len(preds), 240, 240), bool)
    bad = [p for d in env.defects for p in sorted(d.glob("*.png"))]
    for i, p in enumerate(bad, start=4):
        m = env.root / CLS / "ground_truth" / p.parent.name / f"{p.stem}_mask.png"
        gt[i] = mask_transform(240)(load_mask(m, None))[0].numpy() > 0.5
    return gt.ravel(), np.stack([p.anomaly_map for p in preds]).ravel()


# --------------------------------------------------------------------------- safety and versions


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_load_executes_no_pickled_code(env, tmp_path):
    from fdsl.errors import CheckpointError

    marker = tmp_path / "pwned"
    for name, writer in (("pickle.fdsl", lambda f: pickle.dump({"x": _Payload(marker)}, f)),
                         ("torch.fdsl", lambda f: torch.save({"x": _Payload(marker)}, f))):
        path = tmp_path / name
        with path.open("wb") as fh:
            writer(fh)
        with pytest.raises(CheckpointError, match="not an FDSL detector"):
            _load_quiet(path)
        assert not marker.exists(), "a pickled payload ran during load"


def test_newer_format_and_wrong_backbone_are_clear_errors(env, tmp_path):
    from safetensors.torch import save_file

    from fdsl.errors import CheckpointError

    info = dict(env.det.info, format_version=99, fdsl_version="9.0")
    newer = tmp_path / "newer.fdsl"
    save_file(env.det.tensors(), str(newer), metadata={"fdsl_detector": json.dumps(info)})
    with pytest.raises(CheckpointError, match=r"format version 99.*upgrade fdsl"):
        _load_quiet(newer)

    path = env.det.save(tmp_path / "part.fdsl")
    other = tmp_path / "other" / env.weights.name
    other.parent.mkdir()
    shutil.copy(env.weights, other)
    with other.open("r+b") as fh:  # one changed byte inside the weights
        fh.seek(os.path.getsize(other) // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="sha256"):
        _load_quiet(path, pretrained=other)

    tampered = tmp_path / "tampered.fdsl"  # tensors of another model under this config
    tensors = env.det.tensors()
    tensors = {k: (v[:, :, :32].contiguous() if k.startswith("memory.global_bank.tokens_") else v)
               for k, v in tensors.items()}
    save_file(tensors, str(tampered), metadata={"fdsl_detector": json.dumps(env.det.info)})
    with pytest.raises(CheckpointError, match="another model"):
        _load_quiet(tampered)


def test_threshold_rules_by_hand():
    from fdsl.outputs.thresholds import threshold_f1_max, threshold_for_fpr

    s = np.array([0.1, 0.2, 0.3, 0.4])
    assert [threshold_for_fpr(s, r) for r in (0.0, 0.25, 0.5, 1.0)] == [0.4, 0.3, 0.2, 0.1]  # rule: score > t
    assert threshold_f1_max(np.array([0, 0, 1, 1]), s) == (pytest.approx(0.25), 1.0)
    t, f1 = threshold_f1_max(np.array([0, 1, 0, 1]), s)  # best: flag 0.2, 0.3, 0.4 (P 2/3, R 1)
    assert t == pytest.approx(0.15) and f1 == pytest.approx(0.8)


def test_output_names_stay_inside_and_unique():
    from fdsl.outputs.writers import output_names

    names = output_names(["a.png", "a.jpg", "sub/x y#.png", "../../etc/passwd.png", "..hidden/.x.png", "sub/x_y_.png"])
    assert len(set(names)) == len(names)
    for n in names:
        assert not n.startswith("/") and ".." not in n.split("/") and all(p and not p.startswith(".")
                                                                          for p in n.split("/"))
    assert names[0] != names[1] and names[2].startswith("sub/")


# --------------------------------------------------------------------------- the command line


def _cli(*args) -> int:
    from fdsl.cli.inspection import main

    return main([str(a) for a in args])


def test_cli_fit_calibrate_predict_resume(env, tmp_path, capsys):
    det = tmp_path / "part.fdsl"
    assert _cli("fit", "--checkpoint", env.checkpoint, "--normal", env.root / CLS / "train" / "good",
                "--out", det, "--device", "cpu", "--precision", "fp32") == 0
    assert _cli("calibrate", "--detector", det, "--normal", env.root / CLS / "test" / "good",
                "--anomalous", *env.defects, "--masks", env.root / CLS / "ground_truth", "--device", "cpu",
                "--precision", "fp32") == 0
    incoming = tmp_path / "incoming"
    shutil.copytree(env.root / CLS / "test", incoming)
    big = Image.open(incoming / "good" / "000.png").convert("RGB").resize((301, 177))
    (incoming / "odd dir").mkdir()
    big.save(incoming / "odd dir" / "wide #1.jpg")
    (incoming / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "verdicts"
    capsys.readouterr()
    assert _cli("predict", "--detector", det, "--images", incoming, "--out", out, "--device", "cpu",
                "--precision", "fp32", "--batch_size", 4) == 0
    cols, rows = read_csv(out / "scores.csv")
    assert cols == ["path", "score", "map_max", "threshold", "margin", "is_anomalous", "defect_area_px", "region",
                    "overlay", "mask"]
    assert len(rows) == 11 and all(r["is_anomalous"] in ("0", "1") for r in rows)
    _, errs = read_csv(out / "errors.csv")
    assert [Path(e["path"]).name for e in errs] == ["broken.png"]
    loaded = _load_quiet(det)
    for r in rows:
        p = loaded.predict(r["path"])[0]
        assert float(r["score"]) == pytest.approx(p.score, abs=1e-6)  # other batching: float32 rounding
        assert int(r["is_anomalous"]) == int(float(r["score"]) > loaded.image_threshold)
        assert abs(int(r["defect_area_px"]) - int(p.mask.sum())) <= 2
    overlays = sorted(out.joinpath("overlays").rglob("*.png"))
    assert len(overlays) == 11 and all(o.resolve().is_relative_to(out.resolve()) for o in overlays)
    assert (out / "overlays" / "odd_dir" / "wide_1.png").is_file()
    masks = sorted(out.joinpath("masks").rglob("*.png"))
    assert len(masks) == sum(r["is_anomalous"] == "1" for r in rows) > 0
    for r in rows:
        if r["is_anomalous"] == "1" and r["path"].endswith(".jpg"):
            assert Image.open(out / "masks" / "odd_dir" / "wide_1.png").size == (301, 177)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 12 and summary["n_errors"] == 1 and summary["threshold_source"] == "detector"

    # Rerun: everything done is skipped (outputs untouched); a newer detector file redoes everything.
    stamps = {o: o.stat().st_mtime_ns for o in overlays}
    assert _cli("predict", "--detector", det, "--images", incoming, "--out", out, "--device", "cpu",
                "--precision", "fp32") == 0
    assert {o: o.stat().st_mtime_ns for o in overlays} == stamps
    assert json.loads((out / "summary.json").read_text())["n_skipped_done"] == 11
    assert read_csv(out / "scores.csv")[1] == rows
    os.utime(det)
    assert _cli("predict", "--detector", det, "--images", incoming, "--out", out, "--device", "cpu",
                "--precision", "fp32", "--threshold", "2") == 0
    rows2 = read_csv(out / "scores.csv")[1]
    assert all(r["is_anomalous"] == "0" for r in rows2) and not list(out.joinpath("masks").rglob("*.png"))


def test_cli_uncalibrated_predict_gives_no_verdict(env, tmp_path):
    det = env.det.save(tmp_path / "part.fdsl")
    out = tmp_path / "v"
    assert _cli("predict", "--detector", det, "--images", env.root / CLS / "test" / "good", "--out", out,
                "--device", "cpu", "--precision", "fp32", "--overlays", "0") == 0
    _, rows = read_csv(out / "scores.csv")
    assert len(rows) == 4 and all(r["is_anomalous"] == "" and r["defect_area_px"] == "" for r in rows)
    assert not (out / "overlays").exists() and not (out / "masks").exists()
    # Listed files, two sharing a file name; --threshold gives verdicts without a pixel threshold (no masks).
    files = [env.root / CLS / "test" / "good" / "000.png", env.root / CLS / "train" / "good" / "000.png"]
    out2 = tmp_path / "v2"
    assert _cli("predict", "--detector", det, "--images", *files, "--out", out2, "--threshold", "0",
                "--device", "cpu", "--precision", "fp32") == 0
    _, rows = read_csv(out2 / "scores.csv")
    assert [r["path"] for r in rows] == [str(f) for f in files]
    assert all(r["is_anomalous"] == "1" and r["defect_area_px"] == "" for r in rows)
    assert len(list((out2 / "overlays").glob("*.png"))) == 2 and not (out2 / "masks").exists()
    assert json.loads((out2 / "summary.json").read_text())["threshold_source"] == "--threshold"


def test_cli_bad_input_is_one_line_error(env, tmp_path, capsys):
    det = env.det.save(tmp_path / "part.fdsl")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("x")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    fake = tmp_path / "fake.fdsl"
    fake.write_bytes(pickle.dumps({"a": 1}))
    cases = [
        (["predict", "--detector", det, "--images", empty, "--out", tmp_path / "o1"], "holds no image files"),
        (["predict", "--detector", det, "--images", env.root / CLS / "test" / "good", "--out", a_file], "is a file"),
        (["predict", "--detector", fake, "--images", env.root / CLS / "test" / "good", "--out", tmp_path / "o2"],
         "not an FDSL detector"),
        (["fit", "--checkpoint", env.checkpoint, "--normal", env.root / CLS / "train" / "good", "--out",
          tmp_path / "x.fdsl", "--features_list", "1", "2", "--device", "cpu"], "was trained with --features_list"),
        (["fit", "--checkpoint", tmp_path / "nope.pth", "--normal", empty, "--out", tmp_path / "y.fdsl"],
         "holds no image files"),
    ]
    for argv, needle in cases:
        capsys.readouterr()
        assert _cli(*argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()  # log lines, then the one-line error
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0] and needle in errors[0], lines[-3:]
        assert not any("Traceback" in line for line in lines)
    assert _cli("predict", "--detector", det, "--images", empty, "--out", tmp_path / "o", "--bogus", "1") == 2
    assert _cli("predict", "--det", det, "--images", empty, "--out", tmp_path / "o") == 2  # no abbreviations


def test_cli_interrupt_exits_130(env, tmp_path, monkeypatch, capsys):
    from fdsl.inspect.detector import Detector

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Detector, "load", interrupted)
    assert _cli("predict", "--detector", tmp_path / "d.fdsl", "--images", env.root / CLS / "test" / "good",
                "--out", tmp_path / "o") == 130
    assert "interrupted" in capsys.readouterr().err


def test_python_m_fdsl_dispatches(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "fdsl", "predict", "--detector", tmp_path / "missing.fdsl",
                           "--images", tmp_path, "--out", tmp_path / "o"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    from fdsl.__main__ import main

    assert main(["bogus"]) == 2
    assert main(["fit", "--help"]) == 0
    assert main(["test", "--help"]) == 0 and main(["train", "--bogus", "1"]) == 2


@pytest.mark.parametrize("command", ["fit", "predict", "calibrate"])
def test_cli_offers_the_runtime_options_of_test_py(command, capsys):
    from fdsl.config import RuntimeConfig, TestConfig, build_parser, settings

    assert _cli(command, "--help") == 0
    text = capsys.readouterr().out
    runtime_flags = [f.metadata["flags"][0] for f in dataclasses.fields(RuntimeConfig)]
    assert {"--win_batch", "--align_precision", "--bank_dtype", "--align_chunk_mb"} <= set(runtime_flags)
    test_help = build_parser(TestConfig).format_help()
    for flag in runtime_flags:
        assert flag in text and flag in test_help, flag
    assert settings(RuntimeConfig) == tuple(f.name for f in dataclasses.fields(RuntimeConfig))


def test_cli_runtime_options_reach_the_detector(env, tmp_path, monkeypatch):
    from fdsl.inspect.detector import Detector

    seen = {}

    def spy(path, *, runtime, pretrained=None):
        seen["runtime"] = runtime
        raise KeyboardInterrupt

    monkeypatch.setattr(Detector, "load", spy)
    assert _cli("predict", "--detector", tmp_path / "d.fdsl", "--images", env.root / CLS / "test" / "good",
                "--out", tmp_path / "o", "--device", "cpu", "--win_batch", "3", "--align_chunk_mb", "5",
                "--bank_dtype", "fp16", "--align_precision", "bf16") == 130
    rt = seen["runtime"]
    assert (rt.device, rt.win_batch, rt.align_chunk_mb, rt.bank_dtype, rt.align_precision) == (
        "cpu", 3, 5, "fp16", "bf16")
    assert _cli("calibrate", "--detector", tmp_path / "d.fdsl", "--normal", env.root / CLS / "test" / "good",
                "--max_fpr", "0.1", "--win_batch", "0") == 2  # validated like test.py's


def test_detector_runtime_sets_the_lfe_memory_bound(env, tmp_path):
    from fdsl.inspect.detector import Detector

    path = env.det.save(tmp_path / "part.fdsl")
    small = Detector.load(path, runtime=RuntimeConfig(device="cpu", win_batch=1, align_chunk_mb=1))
    assert (small.model.runtime.win_batch, small.model.runtime.align_chunk_mb) == (1, 1)
    image = env.root / CLS / "test" / "good" / "000.png"
    ref = _load_quiet(path).predict(image)[0]
    got = small.predict(image)[0]
    assert got.score == pytest.approx(ref.score, abs=1e-6)  # memory bounds change no number
    with pytest.raises(TypeError, match="RuntimeConfig"):
        Detector.load(path, runtime=3)
