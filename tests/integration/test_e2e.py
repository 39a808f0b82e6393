"""End to end through the command line: `train.py` on synthetic dataset A, `test.py` 1-shot on unseen dataset B.

The backbone is the tiny random-weight CLIP `FDSL-Tiny-ViT`, loaded from a weights file written here, so the
real weights-file path runs. Training runs once per module (about 10-30 s on two CPU cores); everything else
reuses it. Besides the file layout, the trained head has to *detect* B's synthetic defects, clearly better
than an untrained head does.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable  # the repo's interpreter (.venv/bin/python when run as documented)

TINY = "FDSL-Tiny-ViT"
LAYERS = ["1", "2", "3", "4"]
MODEL_ARGS = ["--model", TINY, "--image_size", "112", "--features_list", *LAYERS, "--few_shot_features", *LAYERS]
EPOCHS = 8
TRAIN_CLASSES = ("carpet_syn", "wood_syn")
TEST_CLASSES = ("brick_syn", "tissue_syn")
RESULT_KEYS = {"classes", "mean", "config", "memory_bank_bytes", "units", "provenance"}
METRIC_KEYS = {"pixel_auroc", "pixel_f1_max", "pixel_ap", "aupro", "image_auroc", "image_f1_max", "image_ap"}
SCORE_COLUMNS = ["img_path", "cls_name", "anomaly", "score", "patch_score", "map_max"]
CAL_SIZE = 240  # test.py's default evaluation resolution


def run_cli(script: str, *args, cwd: Path, env: dict[str, str] | None = None,
            expect_rc: int | None = 0) -> subprocess.CompletedProcess:
    """Run `python <repo>/<script> args...` as a user would; fail with its stderr when the exit code is off."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **(env or {}))
    proc = subprocess.run([PYTHON, str(ROOT / script), *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=600)
    if expect_rc is not None and proc.returncode != expect_rc:
        pytest.fail(f"{script} {' '.join(map(str, args))}\nexited {proc.returncode}, expected {expect_rc}\n"
                    f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}")
    return proc


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def read_scores(path: Path) -> tuple[list[str], list[dict]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def class_metrics(results: dict) -> dict[str, dict[str, float]]:
    return {c: dict(m) for c, m in results["classes"].items()}


# --------------------------------------------------------------------------- fixtures (run once per module)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def data(work: Path) -> SimpleNamespace:
    """Datasets A (training) and B (unseen classes, 1-shot test) and the tiny CLIP's weights file."""
    import open_clip

    from fdsl.core.backbone import register_model_configs
    from fdsl.data.synthetic import make_synthetic_dataset

    a = make_synthetic_dataset(work / "A", classes=TRAIN_CLASSES, n_train=4, n_test_good=12, n_test_bad=36,
                               image_size=128, seed=0)
    b = make_synthetic_dataset(work / "B", classes=TEST_CLASSES, n_train=8, n_test_good=8, n_test_bad=16,
                               image_size=128, seed=1)
    register_model_configs()
    torch.manual_seed(0)
    weights = work / "tiny_clip.pt"
    torch.save(open_clip.create_model(TINY).state_dict(), weights)
    return SimpleNamespace(A=a, B=b, weights=weights, meta_a=read_json(a / "meta.json"),
                           meta_b=read_json(b / "meta.json"))


def train_args(data: SimpleNamespace, save_path: Path) -> list:
    return [*MODEL_ARGS, "--pretrained", data.weights, "--dataset", "mvtec", "--train_data_path", data.A,
            "--save_path", save_path, "--k_shot", 2, "--batch_size", 4, "--epoch", EPOCHS, "--lr", "1e-3",
            "--num_workers", 0, "--device", "cpu"]


def eval_args(data: SimpleNamespace, checkpoint: Path, save_path: Path, *extra) -> list:
    return [*MODEL_ARGS, "--pretrained", data.weights, "--dataset", "mvtec", "--data_path", data.B,
            "--checkpoint_path", checkpoint, "--save_path", save_path, "--k_shot", 1, "--batch_size", 8,
            "--num_workers", 0, "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def trained(work: Path, data: SimpleNamespace) -> SimpleNamespace:
    out = work / "train"
    proc = run_cli("train.py", *train_args(data, out), cwd=work)
    return SimpleNamespace(dir=out, proc=proc, checkpoint=out / f"epoch_{EPOCHS}.pth")


@pytest.fixture(scope="module")
def evaluated(work: Path, data: SimpleNamespace, trained: SimpleNamespace) -> SimpleNamespace:
    out = work / "test_1shot"
    args = eval_args(data, trained.checkpoint, out, "--save_images", 1)
    proc = run_cli("test.py", *args, cwd=work)
    return SimpleNamespace(dir=out, proc=proc, args=args, results=read_json(out / "results.json"))


@pytest.fixture(scope="module")
def untrained(work: Path, data: SimpleNamespace) -> dict:
    """1-shot results on B of a fresh, untrained head saved with fdsl.engine.checkpoint.save_checkpoint."""
    from fdsl.config import ModelConfig, config_to_dict
    from fdsl.core.model import FDSL
    from fdsl.engine.checkpoint import save_checkpoint

    mcfg = ModelConfig(model=TINY, pretrained=str(data.weights), image_size=112, features_list=[1, 2, 3, 4],
                       few_shot_features=[1, 2, 3, 4])
    torch.manual_seed(111)
    head = FDSL.from_config(mcfg).head
    checkpoint = work / "untrained" / "epoch_0.pth"
    save_checkpoint(checkpoint, head, config_to_dict(mcfg), epoch=0)
    out = work / "test_untrained"
    run_cli("test.py", *eval_args(data, checkpoint, out), cwd=work)
    return read_json(out / "results.json")


@pytest.fixture(scope="module")
def multi_seed(work: Path, data: SimpleNamespace, trained: SimpleNamespace) -> SimpleNamespace:
    out = work / "test_seeds"
    proc = run_cli("test.py", *eval_args(data, trained.checkpoint, out, "--seeds", 1, 2), cwd=work)
    return SimpleNamespace(dir=out, proc=proc)


# --------------------------------------------------------------------------- training


def test_train_writes_checkpoints_kshot_config_and_log(data, trained):
    from fdsl.core.checkpoint_io import read_checkpoint

    names = sorted(p.name for p in trained.dir.glob("epoch_*.pth"))
    assert names == sorted(f"epoch_{e}.pth" for e in range(1, EPOCHS + 1))
    ck = read_checkpoint(trained.checkpoint)
    assert ck["format"] == "fdsl" and ck["epoch"] == EPOCHS
    assert ck["model_config"]["model"] == TINY and ck["model_config"]["features_list"] == [1, 2, 3, 4]

    # k_shot.txt: k=2 normal train images per class, relative to the data root.
    lines = trained.dir.joinpath("k_shot.txt").read_text().split()
    assert len(lines) == 2 * len(TRAIN_CLASSES)
    train_paths = {it["img_path"]: c for c, items in data.meta_a["train"].items() for it in items}
    for line in lines:
        assert not os.path.isabs(line) and line in train_paths, line
        assert (data.A / line).is_file()
    for cls in TRAIN_CLASSES:
        assert sum(train_paths[p] == cls for p in lines) == 2
    assert len(set(lines)) == len(lines), "reference images must be drawn without replacement"

    cfg = read_json(trained.dir / "config.json")
    assert cfg["k_shot"] == 2 and cfg["epoch"] == EPOCHS and cfg["batch_size"] == 4
    assert cfg["model"] == TINY and cfg["pretrained"] == str(data.weights)
    assert cfg["learning_rate"] == pytest.approx(1e-3)

    log = trained.dir.joinpath("log.txt").read_text()
    assert f"loaded CLIP weights from {data.weights}" in log  # the weights file was really read
    losses = {int(m.group(1)): float(m.group(2))
              for m in re.finditer(rf"epoch (\d+)/{EPOCHS}: mean loss ([-+0-9.eE]+|nan|inf)", log)}
    assert sorted(losses) == list(range(1, EPOCHS + 1))
    assert all(math.isfinite(v) and v > 0 for v in losses.values()), losses
    assert losses[EPOCHS] < losses[1], f"the training loss did not go down: {losses}"


# --------------------------------------------------------------------------- evaluation layout


def test_results_json_schema(data, evaluated):
    res = evaluated.results
    assert set(res) == RESULT_KEYS
    assert set(res["classes"]) == set(TEST_CLASSES)
    for cls, metrics in res["classes"].items():
        assert set(metrics) == METRIC_KEYS, cls
        for key, value in metrics.items():
            assert isinstance(value, float) and 0.0 <= value <= 1.0, (cls, key, value)
    assert set(res["mean"]) == METRIC_KEYS
    for key in METRIC_KEYS:
        assert res["mean"][key] == pytest.approx(np.mean([res["classes"][c][key] for c in TEST_CLASSES]))
    assert res["units"]["metrics"].startswith("fraction")
    assert res["provenance"]["backbone"] == TINY and res["provenance"]["checkpoint"]["sha256"]
    cfg = res["config"]
    assert cfg["k_shot"] == 1 and cfg["data_path"] == str(data.B) and cfg["model"] == TINY
    assert cfg["checkpoint_path"].endswith(f"epoch_{EPOCHS}.pth")
    # 1-shot bank of the tiny model: 4 layers x 64 tokens x 64 channels of fp32 at least, per class.
    assert set(res["memory_bank_bytes"]) == set(TEST_CLASSES)
    assert all(isinstance(v, int) and v >= 4 * 64 * 64 * 4 for v in res["memory_bank_bytes"].values())


def test_scores_csv_one_row_per_test_image(data, evaluated):
    header, rows = read_scores(evaluated.dir / "scores.csv")
    assert header == SCORE_COLUMNS
    expected = {it["img_path"]: (cls, it["anomaly"]) for cls, items in data.meta_b["test"].items() for it in items}
    assert len(rows) == len(expected) == 2 * (8 + 16)
    assert {r["img_path"] for r in rows} == set(expected)
    for r in rows:
        assert not os.path.isabs(r["img_path"]) and (data.B / r["img_path"]).is_file()
        assert (r["cls_name"], int(r["anomaly"])) == expected[r["img_path"]]
        for col in ("score", "patch_score", "map_max"):
            assert 0.0 <= float(r[col]) <= 1.0, (r["img_path"], col, r[col])


def test_kshot_file_images_and_table(data, evaluated):
    lines = evaluated.dir.joinpath("k_shot.txt").read_text().split()
    assert len(lines) == len(TEST_CLASSES)  # k=1: one line per class
    for cls, line in zip(TEST_CLASSES, sorted(lines), strict=True):
        assert line.startswith(f"{cls}/train/good/") and (data.B / line).is_file()

    pngs = sorted(evaluated.dir.glob("images/*/*.png"))
    assert len(pngs) == 2 * (8 + 16)
    assert {p.parent.name for p in pngs} == set(TEST_CLASSES)
    from PIL import Image

    from fdsl.outputs.overlay import side_by_side_shape

    with Image.open(pngs[0]) as im:  # caption, titled image | ground truth | map at the evaluation size, colour bar
        assert im.size[::-1] == side_by_side_shape(CAL_SIZE, CAL_SIZE)

    log = evaluated.dir.joinpath("log.txt").read_text()
    assert re.search(r"^\| objects +\| +AUROC +\| +AUROC_p", log, re.M), "pipe table header missing from log.txt"
    assert re.search(r"results \(seed \d+, 1-shot, %\):", log) and " (%): AUROC " in log  # units stated
    assert re.search(r"^\|:-+\|", log, re.M)
    for name in (*TEST_CLASSES, "mean"):
        assert re.search(rf"^\| {name} +\| +\d+\.\d\d \|", log, re.M), name


# --------------------------------------------------------------------------- detection


def test_trained_head_detects_unseen_defects(evaluated, untrained):
    mean = evaluated.results["mean"]
    base = untrained["mean"]
    summary = (f"trained: pixel {mean['pixel_auroc']:.3f} image {mean['image_auroc']:.3f} "
               f"{ {c: round(m['pixel_auroc'], 3) for c, m in evaluated.results['classes'].items()} }; "
               f"untrained: pixel {base['pixel_auroc']:.3f} image {base['image_auroc']:.3f}")
    print(summary)
    assert mean["pixel_auroc"] > 0.75, summary
    assert mean["image_auroc"] > 0.6, summary
    assert mean["pixel_auroc"] - base["pixel_auroc"] >= 0.15, summary


# --------------------------------------------------------------------------- resumability


def test_rerun_test_skips_finished_classes(work, evaluated):
    before_results = (evaluated.dir / "results.json").read_text()
    before_scores = (evaluated.dir / "scores.csv").read_text()
    proc = run_cli("test.py", *evaluated.args, cwd=work)
    for cls in TEST_CLASSES:
        assert re.search(rf"{cls}: already finished", proc.stderr), proc.stderr[-3000:]
    assert "AnomalyDataset" not in proc.stderr, "a finished class was scored again"
    assert read_json(evaluated.dir / "results.json") == json.loads(before_results)
    assert (evaluated.dir / "scores.csv").read_text() == before_scores


def test_rerun_train_does_no_more_epochs(work, data, trained, evaluated):
    stamps = {p.name: p.stat().st_mtime_ns for p in trained.dir.glob("epoch_*.pth")}
    proc = run_cli("train.py", *train_args(data, trained.dir), cwd=work)
    assert f"all {EPOCHS} epochs already done" in proc.stderr, proc.stderr[-3000:]
    assert not re.search(r"epoch \d+/\d+: mean loss", proc.stderr)
    assert {p.name: p.stat().st_mtime_ns for p in trained.dir.glob("epoch_*.pth")} == stamps


def test_interrupted_training_resumes_to_the_same_weights(work, data, trained):
    from fdsl.core.checkpoint_io import read_checkpoint

    out = work / "train_interrupted"
    shutil.copytree(trained.dir, out)
    for epoch in (EPOCHS - 1, EPOCHS):  # as if killed during epoch EPOCHS - 1
        (out / f"epoch_{epoch}.pth").unlink()
    proc = run_cli("train.py", *train_args(data, out), cwd=work)
    assert f"epoch {EPOCHS - 2} done" in proc.stderr
    ran = [int(e) for e in re.findall(rf"epoch (\d+)/{EPOCHS}: mean loss", proc.stderr)]
    assert ran == [EPOCHS - 1, EPOCHS]
    resumed = read_checkpoint(out / f"epoch_{EPOCHS}.pth")["head"]
    original = read_checkpoint(trained.checkpoint)["head"]
    assert resumed.keys() == original.keys()
    for key in original:
        torch.testing.assert_close(resumed[key], original[key], rtol=1e-4, atol=1e-5, msg=key)


# --------------------------------------------------------------------------- several seeds, k-shot files


def test_multi_seed_layout_and_summary(multi_seed):
    out = multi_seed.dir
    per_seed = {}
    for seed in (1, 2):
        d = out / f"seed_{seed}"
        res = read_json(d / "results.json")
        assert set(res) == RESULT_KEYS and res["config"]["seed"] == seed
        assert set(res["classes"]) == set(TEST_CLASSES)
        header, rows = read_scores(d / "scores.csv")
        assert header == SCORE_COLUMNS and len(rows) == 2 * (8 + 16)
        per_seed[seed] = res
    summary = read_json(out / "summary.json")
    assert {"seeds", "mean", "std"} <= set(summary) and summary["seeds"] == [1, 2]
    for key in METRIC_KEYS:
        values = [per_seed[s]["mean"][key] for s in (1, 2)]
        assert summary["mean"][key] == pytest.approx(np.mean(values))
        assert summary["std"][key] == pytest.approx(np.std(values), abs=1e-12)
    # Test images are read and encoded once per class for both seeds, not once per (class, seed).
    assert multi_seed.proc.stderr.count("AnomalyDataset") == len(TEST_CLASSES)
    # B's train pool holds 8 normal images per class: the two seeds draw different references.
    shots = {s: (out / f"seed_{s}" / "k_shot.txt").read_text().split() for s in (1, 2)}
    assert len(shots[1]) == len(shots[2]) == len(TEST_CLASSES)
    assert shots[1] != shots[2]


def test_k_shot_file_reproduces_a_seed(work, data, trained, multi_seed):
    shots = multi_seed.dir / "seed_1" / "k_shot.txt"
    out = work / "test_from_file"
    run_cli("test.py", *eval_args(data, trained.checkpoint, out, "--k_shot_file", shots), cwd=work)
    assert (out / "k_shot.txt").read_text().split() == shots.read_text().split()
    got = class_metrics(read_json(out / "results.json"))
    want = class_metrics(read_json(multi_seed.dir / "seed_1" / "results.json"))
    assert got.keys() == want.keys()
    for cls in want:
        for key in METRIC_KEYS:
            assert got[cls][key] == pytest.approx(want[cls][key], abs=1e-6), (cls, key)


# --------------------------------------------------------------------------- errors


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_error_missing_meta_json(work, data, trained):
    empty = work / "empty_dataset"
    empty.mkdir()
    args = eval_args(data, trained.checkpoint, work / "err_meta")
    args[args.index("--data_path") + 1] = empty
    proc = run_cli("test.py", *args, cwd=work, expect_rc=None)
    assert_one_line_error(proc, "meta.json", str(empty))


def test_error_cuda_device_without_cuda(work, data, trained):
    args = eval_args(data, trained.checkpoint, work / "err_device")
    args[args.index("--device") + 1] = "0"
    proc = run_cli("test.py", *args, cwd=work, env={"CUDA_VISIBLE_DEVICES": ""}, expect_rc=None)
    assert_one_line_error(proc, "--device", "cpu")


def test_error_k_shot_larger_than_train_pool(work, data, trained):
    args = eval_args(data, trained.checkpoint, work / "err_kshot")
    args[args.index("--k_shot") + 1] = 9  # B has 8 normal train images per class
    proc = run_cli("test.py", *args, cwd=work, expect_rc=None)
    assert_one_line_error(proc, "k=9", "only 8")

    args = train_args(data, work / "err_kshot_train")
    args[args.index("--k_shot") + 1] = 5  # A has 4 normal train images per class
    proc = run_cli("train.py", *args, cwd=work, expect_rc=None)
    assert_one_line_error(proc, "k=5", "only 4")
    assert not list((work / "err_kshot_train").glob("epoch_*.pth"))


def test_error_nonexistent_checkpoint(work, data):
    missing = work / "no_such_run" / "epoch_5.pth"
    proc = run_cli("test.py", *eval_args(data, missing, work / "err_ckpt"), cwd=work, expect_rc=None)
    assert_one_line_error(proc, str(missing))


def test_error_unknown_flag(work, data, trained):
    proc = run_cli("test.py", *eval_args(data, trained.checkpoint, work / "err_flag"), "--k_shots", 1,
                   cwd=work, expect_rc=None)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unrecognized arguments: --k_shots" in proc.stderr
