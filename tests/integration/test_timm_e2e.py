"""End to end with REAL features: EfficientNet-Lite0 (package weights) + the training-free scorer, no checkpoint.

test.py --scorer nn must detect the drawn defects of a held-out photo set clearly better than the same network
with random weights, and `fdsl fit` + `fdsl predict` must give test.py's numbers for the same shot.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from fdsl_test_utils import drop_fdsl_log_handlers

from fdsl.cli import inspection
from fdsl.cli.jobs import test_main as run_test_py  # aliased: pytest would try to collect test_*
from fdsl.core.timm_backbone import lite0_package_file
from fdsl.data.synthetic import make_photo_dataset
from fdsl.inspect.detector_file import read_detector_file

LITE0 = ["--model", "timm:tf_efficientnet_lite0", "--image_size", "128", "--features_list", "3", "4",
         "--few_shot_features", "3", "4", "--scorer", "nn"]
CLS = "chelsea_photo"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    return make_photo_dataset(root / "data", photos=("chelsea", "coffee"), n_train=2, n_test_good=3,
                              n_test_bad=6, image_size=128, seed=4)


def _test_py(data: Path, out: Path, weights: str) -> dict:
    argv = [*LITE0, "--pretrained", weights, "--dataset", "mvtec", "--data_path", str(data), "--k_shot", "1",
            "--seed", "14", "--save_path", str(out), "--device", "cpu", "--num_workers", "0", "--batch_size", "9",
            "--cal_image_size", "64"]
    try:
        assert run_test_py(argv) == 0
    finally:
        drop_fdsl_log_handlers()
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def runs(photos, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    return {"real": (tmp / "real", _test_py(photos, tmp / "real", lite0_package_file())),
            "random": (tmp / "random", _test_py(photos, tmp / "random", "none"))}


def test_real_lite0_features_detect_defects_without_a_checkpoint(runs):
    real, rand = runs["real"][1]["mean"], runs["random"][1]["mean"]
    assert real["pixel_auroc"] >= 0.9, real
    assert real["pixel_auroc"] >= rand["pixel_auroc"] + 0.05, (real, rand)
    assert real["aupro"] >= rand["aupro"] + 0.2, (real, rand)  # measured 0.95 vs 0.61
    assert real["image_auroc"] >= 0.8, real


def test_fit_and_predict_give_test_py_numbers(runs, photos, tmp_path):
    out_dir, _ = runs["real"]
    shot = (out_dir / "k_shot.txt").read_text().splitlines()
    shot = [s for s in shot if s.startswith(f"{CLS}/")]
    assert len(shot) == 1
    det = tmp_path / "part.fdsl"
    rc = inspection.main(["fit", *LITE0, "--pretrained", lite0_package_file(), "--normal", str(photos / shot[0]),
                          "--out", str(det), "--cal_image_size", "64", "--device", "cpu"])
    assert rc == 0
    info, tensors = read_detector_file(det)  # the detector records its scorer and no checkpoint
    assert info["scorer"] == "nn" and info["model_config"]["scorer"] == "nn" and info["checkpoint"] is None
    assert not [k for k in tensors if k.startswith("head.")]
    assert inspection.main(["predict", "--detector", str(det), "--images", str(photos / CLS / "test"),
                            "--out", str(tmp_path / "pred"), "--overlays", "0", "--device", "cpu"]) == 0
    drop_fdsl_log_handlers()
    with (out_dir / "scores.csv").open() as fh:
        want = {r["img_path"].split("/", 1)[1]: r for r in csv.DictReader(fh) if r["cls_name"] == CLS}
    with (tmp_path / "pred" / "scores.csv").open() as fh:
        got = list(csv.DictReader(fh))
    assert len(got) == len(want) == 9
    for row in got:
        ref = want["/".join(Path(row["path"]).parts[-3:])]
        assert float(row["map_max"]) == pytest.approx(float(ref["map_max"]), abs=1e-5)
        assert float(row["score"]) == pytest.approx(0.5 * (float(ref["patch_score"]) + float(ref["map_max"])),
                                                    abs=1e-5)


def test_nn_with_a_checkpoint_is_one_line(tmp_path, capsys):
    rc = run_test_py([*LITE0, "--pretrained", "none", "--data_path", str(tmp_path), "--checkpoint_path",
                      str(tmp_path / "x.pth"), "--save_path", str(tmp_path / "o")])
    drop_fdsl_log_handlers()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "takes no checkpoint" in err[0]
