"""`python -m fdsl.cli.demo --real_features`: real EfficientNet-Lite0 features, no CLIP weights, no training."""
from __future__ import annotations

import re

from fdsl_test_utils import drop_fdsl_log_handlers

from fdsl.cli.demo import main


def _means(stdout: str) -> list:
    """pixel_auroc of each printed table's mean row, in print order."""
    return [float(m.group(1)) for m in re.finditer(r"^\| mean +\| +(\d+\.\d\d) \|", stdout, re.M)]


def test_real_features_demo_labels_its_weights_and_detects(tmp_path, capsys):
    try:
        rc = main(["--real_features", "1", "--out", str(tmp_path), "--device", "cpu"], quick=True)
    finally:
        drop_fdsl_log_handlers()
    out = capsys.readouterr().out
    assert rc == 0, out[-2000:]
    heads = [line for line in out.splitlines() if "--scorer nn" in line and "1-shot on held-out" in line]
    assert [h.split(":")[0] for h in heads] == ["REAL weights"] * 2 + ["RANDOM weights"] * 2
    real_photos, real_tex, rand_photos, rand_tex = _means(out)
    assert real_photos > rand_photos + 5 and real_tex > rand_tex + 5  # percent pixel AUROC
    runs = tmp_path / "runs" / "real_features_lite0_128px"
    assert list((runs / "real_photos" / "images").rglob("*.png"))  # heat maps of the real run
    assert (runs / "predict" / "verdicts" / "scores.csv").is_file()  # fit / calibrate / predict, no checkpoint
    # calibrated on other images than it judges, and it says where the gallery is
    from fdsl.inspect.detector_file import read_detector_file
    from fdsl.outputs.files import sha256_file

    pred = runs / "predict"
    cal = set(read_detector_file(next(pred.glob("*.fdsl")))[0]["thresholds"]["calibration_images"])
    judged = {sha256_file(p) for p in (pred / "incoming").rglob("*.png")}
    assert cal and judged and not cal & judged
    assert str(pred / "verdicts" / "index.html") in out
