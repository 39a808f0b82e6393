"""`fdsl export` and the torch-free inferencer `fdsl.deploy`: exported outputs equal `fdsl predict`'s."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from deploy_fixtures import build_detectors, reseal
from fdsl_test_utils import liven_head
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build_detectors(tmp_path_factory.mktemp("deploy"))


@pytest.fixture(scope="module")
def exported(env):
    """(branch, format, precision) -> exported folder, made once per module."""
    from fdsl.inspect.detector import Detector
    from fdsl.inspect.export import export_detector

    cache = {}

    def get(branch: str, fmt: str, precision: str = "fp32") -> Path:
        key = (branch, fmt, precision)
        if key not in cache:
            det = Detector.load(env.detectors[branch], runtime="cpu")
            cache[key] = export_detector(det, env.work / f"exp_{branch}_{fmt}_{precision}", fmt, precision)
        return cache[key]

    return get


def read_scores(path: Path) -> dict:
    with path.open(newline="") as fh:
        return {Path(r["path"]).name + Path(r["path"]).parent.name: r for r in csv.DictReader(fh)}


# LFE (mul) holds the global branch too, so ONNX is checked on it alone (each export costs seconds)
@pytest.mark.parametrize("branch,fmt", [("global", "openvino"), ("lfe", "openvino"), ("lfe", "onnx")])
def test_exported_graph_equals_detector_predict(env, exported, branch, fmt):
    """Scores, map maxima and whole maps of the exported graph equal `Detector.predict` to 1e-4 (fp32)."""
    from fdsl.deploy import load_exported
    from fdsl.inspect.detector import Detector

    det = Detector.load(env.detectors[branch], runtime="cpu")
    ref = det.predict(env.images, batch_size=3)
    got = load_exported(exported(branch, fmt)).predict(env.images, batch_size=4)  # other batching on purpose
    s_ref, s_got = np.array([p.score for p in ref]), np.array([p.score for p in got])
    assert np.std(s_ref) > 1e-3, "scores should vary, or the comparison says little"
    np.testing.assert_allclose(s_got, s_ref, rtol=0, atol=TOL)
    np.testing.assert_allclose([p.map_max for p in got], [p.map_max for p in ref], rtol=0, atol=TOL)
    np.testing.assert_allclose(np.stack([p.anomaly_map for p in got]), np.stack([p.anomaly_map for p in ref]),
                               rtol=0, atol=TOL)
    assert [p.is_anomalous for p in got] == [p.is_anomalous for p in ref]
    assert ref[0].anomaly_map.shape == got[0].anomaly_map.shape == (64, 64)


def test_contract_json_describes_preprocessing_and_thresholds(env, exported):
    from fdsl.data.images import OPENAI_MEAN, OPENAI_STD
    from fdsl.inspect.detector import Detector

    folder = exported("lfe", "openvino")
    c = json.loads((folder / "fdsl_export.json").read_text())
    det = Detector.load(env.detectors["lfe"], runtime="cpu")
    assert c["preprocessing"]["size"] == [112, 112] and c["preprocessing"]["resize"] == "squash"
    assert c["preprocessing"]["mean"] == list(OPENAI_MEAN) and c["preprocessing"]["std"] == list(OPENAI_STD)
    assert c["thresholds"]["image"] == det.image_threshold and c["thresholds"]["pixel"] == det.pixel_threshold
    assert c["cal_image_size"] == 64 and c["model_file"] == "model.xml" and (folder / "model.bin").is_file()
    assert c["detector"]["model_config"]["winmode"] == "mul"


def test_fp16_export_halves_the_weights_and_drifts_little(env, exported):
    """OpenVINO fp16 compression: weights file about half, scores within 1e-2 of fp32 (measured drift).

    The fp16 folder is the fp32 export saved again as `export_detector` saves fp16 (`save_openvino`), which
    spares a second conversion."""
    import shutil

    import openvino as ov

    from fdsl.deploy import load_exported
    from fdsl.inspect.export import save_openvino

    f32, f16 = exported("lfe", "openvino"), env.work / "exp_lfe_fp16"
    f16.mkdir()
    save_openvino(ov.Core().read_model(str(f32 / "model.xml")), f16 / "model.xml", "fp16")
    shutil.copy(f32 / "fdsl_export.json", f16 / "fdsl_export.json")
    reseal(f16, precision="fp16")  # the contract pins the model files by their sha256
    assert (f16 / "model.bin").stat().st_size < 0.6 * (f32 / "model.bin").stat().st_size
    a = np.array([p.score for p in load_exported(f32).predict(env.images)])
    b = np.array([p.score for p in load_exported(f16).predict(env.images)])
    drift = float(np.abs(a - b).max())
    assert 0 < drift < 1e-2, drift  # > 0: the fp16 weights are really used


def test_preprocessing_is_bit_identical_to_the_torch_path(env):
    from fdsl.data.images import OPENAI_MEAN, OPENAI_STD, image_transform, load_rgb
    from fdsl.outputs.pixels import preprocess

    ims = [load_rgb(p) for p in env.images[:3]] + [Image.new("RGB", (50, 31), (200, 10, 90))]
    ref = np.stack([image_transform(112)(im).numpy() for im in ims])
    assert np.array_equal(preprocess(ims, 112, OPENAI_MEAN, OPENAI_STD), ref)


def test_bilinear_resize_matches_opencv():
    import cv2

    from fdsl.outputs.pixels import resize_bilinear

    rng = np.random.default_rng(0)
    for src, dst in (((64, 64), (97, 31)), ((64, 64), (640, 480)), ((37, 40), (20, 13))):
        a = rng.random(src, dtype=np.float32)
        ref = cv2.resize(a, dst, interpolation=cv2.INTER_LINEAR)
        got = resize_bilinear(a, dst)
        assert got.shape == ref.shape
        assert float(np.abs(got - ref).max()) < 5e-6  # float32 rounding (OpenCV sums in another order)


def test_predict_and_deploy_cli_write_the_same_verdicts(env, exported, tmp_path):
    """`fdsl predict --detector DIR` and `python -m fdsl.deploy` give `fdsl predict --detector part.fdsl`'s
    scores.csv (to 1e-4) and masks; overlays are written for every image."""
    from fdsl.cli.inspection import main as inspect_main
    from fdsl.deploy.run import main as deploy_main

    folder = exported("lfe", "openvino")
    args = ["--images", str(env.test_dir), "--device", "cpu"]
    assert inspect_main(["predict", "--detector", str(env.detectors["lfe"]), "--out", str(tmp_path / "t"), *args]) == 0
    assert inspect_main(["predict", "--detector", str(folder), "--out", str(tmp_path / "e"), *args]) == 0
    assert deploy_main(["--model", str(folder), "--images", str(env.test_dir), "--out", str(tmp_path / "d")]) == 0
    ref = read_scores(tmp_path / "t" / "scores.csv")
    assert sum(r["is_anomalous"] == "1" for r in ref.values()) >= 1, "some verdict should be anomalous"
    for run in ("e", "d"):
        got = read_scores(tmp_path / run / "scores.csv")
        assert got.keys() == ref.keys()
        for k, r in ref.items():
            assert abs(float(got[k]["score"]) - float(r["score"])) < TOL
            assert abs(float(got[k]["map_max"]) - float(r["map_max"])) < TOL
            assert got[k]["is_anomalous"] == r["is_anomalous"]
            assert abs(int(got[k]["defect_area_px"]) - int(r["defect_area_px"])) <= 2  # near-threshold pixels
        masks = sorted(p.relative_to(tmp_path / "t") for p in (tmp_path / "t" / "masks").rglob("*.png"))
        own = sorted(p.relative_to(tmp_path / run) for p in (tmp_path / run / "masks").rglob("*.png"))
        assert masks and masks == own
        for m in masks:
            a, b = np.asarray(Image.open(tmp_path / "t" / m)), np.asarray(Image.open(tmp_path / run / m))
            assert a.shape == b.shape and np.mean(a != b) < 1e-3
        n_over = len(list((tmp_path / run / "overlays").rglob("*.png")))
        assert n_over == len(env.images)


def test_one_image_walks_the_same_rooms_through_predict_and_deploy(env, exported, tmp_path, monkeypatch):
    """One image through `fdsl predict --detector part.fdsl` and through `python -m fdsl.deploy`: below their
    entry points both walk the same FolderRun, down to decoding the batch (the call stack, fdsl frames only)."""
    import traceback

    import fdsl.outputs.folder_run as folder_run
    from fdsl.cli.inspection import main as inspect_main
    from fdsl.deploy.run import main as deploy_main

    stacks: list[list[str]] = []
    real = folder_run.read_images

    def spy(paths):
        frames = [f for f in traceback.extract_stack()[:-1] if f"{os.sep}fdsl{os.sep}" in f.filename]
        stacks.append([f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.name}" for f in frames])
        return real(paths)

    monkeypatch.setattr(folder_run, "read_images", spy)
    image = str(env.images[0])
    assert inspect_main(["predict", "--detector", str(env.detectors["lfe"]), "--images", image, "--out",
                         str(tmp_path / "t"), "--device", "cpu"]) == 0
    assert deploy_main(["--model", str(exported("lfe", "openvino")), "--images", image, "--out",
                        str(tmp_path / "d")]) == 0
    assert len(stacks) == 2
    walk = ["outputs/folder_run.py:run", "outputs/folder_run.py:_locked"]
    for stack in stacks:
        start = stack.index(walk[0])
        assert stack[start:] == walk, stack
        assert not any(s.startswith(("outputs/", "deploy/", "cli/")) and "folder_run" not in s
                       for s in stack[start:])
    predict_rooms = [s.split(":")[0] for s in stacks[0][:stacks[0].index(walk[0])]]
    deploy_rooms = [s.split(":")[0] for s in stacks[1][:stacks[1].index(walk[0])]]
    assert set(predict_rooms) <= {"cli/__init__.py", "cli/inspection.py", "cli/jobs.py"}, predict_rooms
    assert set(deploy_rooms) == {"deploy/run.py"}, deploy_rooms


def test_deploy_imports_no_torch_open_clip_or_opencv():
    code = ("import sys, fdsl, fdsl.deploy, fdsl.deploy.run, fdsl.deploy.pictures, fdsl.cli.inspection; "
            "bad = [m for m in ('torch', 'open_clip', 'cv2', 'torchvision') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout + r.stderr


def test_bad_exports_are_one_line_errors(env, tmp_path):
    from fdsl.cli.export import main as export_main
    from fdsl.deploy.run import main as deploy_main

    assert export_main(["--detector", str(env.detectors["global"]), "--format", "onnx", "--precision", "fp16",
                        "--out", str(tmp_path / "x")]) == 2
    assert export_main(["--detector", str(tmp_path / "missing.fdsl"), "--out", str(tmp_path / "y")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert deploy_main(["--model", str(empty), "--images", str(env.test_dir), "--out", str(tmp_path / "o")]) == 2


# --------------------------------------------------------------------------- a fresh environment without torch
@pytest.fixture(scope="session")
def deploy_venv(tmp_path_factory) -> Path:
    """A fresh venv holding fdsl (wheel installed with --no-deps), OpenVINO, onnxruntime, NumPy and Pillow only.

    Packages come from pip's configured index or cache at the versions installed here; one venv per session.
    """
    from importlib.metadata import version

    d = tmp_path_factory.mktemp("deploy_venv")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # this checkout must not be visible there
    run = dict(check=True, capture_output=True, text=True, timeout=900, env=env, cwd=d)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(d / "wheel"), str(ROOT)], **run)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(d / "env")], **run)
    py = d / "env" / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, *(f"{p}=={version(p)}" for p in ("openvino", "onnxruntime", "numpy", "pillow"))], **run)
    subprocess.run([*pip, "--no-deps", *map(str, (d / "wheel").glob("fdsl-*.whl"))], **run)
    return py


def test_deploy_runs_in_a_fresh_venv_without_torch(env, exported, deploy_venv, tmp_path):
    """`python -m fdsl.deploy` in an environment without torch (OpenVINO and ONNX exports) gives the
    detector's scores to 1e-4 and its verdicts."""
    from fdsl.inspect.detector import Detector

    clean = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    probe = subprocess.run([str(deploy_venv), "-c", "import importlib.util as u, fdsl; "
                            "print(fdsl.__file__, [m for m in ('torch', 'open_clip', 'cv2', 'torchvision') "
                            "if u.find_spec(m)])"], cwd=tmp_path, env=clean, capture_output=True, text=True)
    assert probe.returncode == 0 and "site-packages" in probe.stdout and probe.stdout.strip().endswith("[]"), \
        probe.stdout + probe.stderr
    det = Detector.load(env.detectors["lfe"], runtime="cpu")
    ref = {p.name + p.parent.name: pr for p, pr in zip(env.images, det.predict(env.images))}
    for fmt in ("openvino", "onnx"):
        out = tmp_path / fmt
        r = subprocess.run([str(deploy_venv), "-m", "fdsl.deploy", "--model", str(exported("lfe", fmt)),
                            "--images", str(env.test_dir), "--out", str(out)], cwd=tmp_path, env=clean,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        got = read_scores(out / "scores.csv")
        assert got.keys() == ref.keys()
        for k, pr in ref.items():
            assert abs(float(got[k]["score"]) - pr.score) < TOL
            assert got[k]["is_anomalous"] == str(int(pr.is_anomalous))
        assert len(list((out / "overlays").rglob("*.png"))) == len(env.images)


@pytest.mark.parametrize("settings", [dict(align_mode="diff2"), dict(use_img_idx=True), dict(winmode="onlywin"),
                                      dict(use_nam=False, use_abs=False, align_mode="diff2", use_img_idx=True)])
def test_graph_equals_predict_for_every_setting(env, settings):
    """The export graph run eagerly equals `FDSL.predict` for the other alignment modes, the image index,
    onlywin and NAM off (the conversion itself is checked above on the default settings)."""
    import torch

    from fdsl.config import ModelConfig
    from fdsl.core.model import FDSL
    from fdsl.data.images import image_transform, load_rgb
    from fdsl.inspect.export import DetectorGraph

    kw = dict(model="FDSL-Tiny-ViT", pretrained=str(env.weights), image_size=112, features_list=[2, 4],
              few_shot_features=[2, 4], winmode="mul", win_size=4, win_stride=2)
    kw.update(settings)
    torch.manual_seed(0)
    model = FDSL.from_config(ModelConfig(**kw)).eval()
    tf = image_transform(112)
    refs = torch.stack([tf(load_rgb(p)) for p in sorted((env.root / "brick_syn" / "train" / "good").glob("*.png"))])
    x = torch.stack([tf(load_rgb(p)) for p in env.images])
    liven_head(model, refs, x)  # data-driven BN statistics: an untrained head scores all images alike
    memory = model.make_memory(model.encode_references(refs))
    ref = model.predict(x, [memory], 64)[0]
    with torch.no_grad():
        amap, score, patch, mmax = DetectorGraph(model, memory, 64, chunk_mb=1)(x)  # 1 MiB: several chunks
    assert float(ref.pred_score.std()) > 1e-4
    for a, b in ((amap, ref.anomaly_map), (score, ref.pred_score), (patch, ref.patch_score), (mmax, ref.map_max)):
        assert float((a - b).abs().max()) < 1e-5


def test_export_refuses_what_the_graph_does_not_compute(env):
    """The training-free scorer (--scorer nn) is not in the graph: a ConfigError, not a wrong model."""
    from fdsl.config import ModelConfig
    from fdsl.core.model import FDSL
    from fdsl.errors import ConfigError
    from fdsl.inspect.export import DetectorGraph

    model = FDSL.from_config(ModelConfig(model="FDSL-Tiny-ViT", pretrained=str(env.weights), image_size=112,
                                         features_list=[2, 4], few_shot_features=[2, 4], scorer="nn"))
    with pytest.raises(ConfigError, match="--scorer nn"):
        DetectorGraph(model, None, 64)
