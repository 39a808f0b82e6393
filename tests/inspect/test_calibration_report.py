"""`fdsl calibrate` writes a report beside the detector (issue #19 §2) and warns on a small validation set."""
from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
from fdsl_test_utils import make_calibrated_detector
from PIL import Image


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_calibrated_detector(tmp_path_factory.mktemp("calreport"))


def test_calibrate_writes_report_and_warns_on_small_sets(env, tmp_path, capsys, caplog):
    from fdsl.cli.inspection import main
    from fdsl.inspect.detector import Detector

    det = tmp_path / "part.fdsl"
    det.write_bytes(env.path.read_bytes())
    with caplog.at_level(logging.WARNING, logger="fdsl"):
        assert main(["calibrate", "--detector", str(det), "--normal", str(env.cls_dir / "test" / "good"),
                     "--anomalous", *map(str, env.bad), "--device", "cpu", "--precision", "fp32"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("only 3 normal validation image(s) (fewer than 20)" in w for w in warnings)
    assert any("only 4 anomalous validation image(s) (fewer than 10)" in w for w in warnings)
    printed = capsys.readouterr().out
    folder = tmp_path / "part_calibration"
    assert "reached FPR" in printed and "TPR" in printed and str(folder) in printed

    loaded = Detector.load(det, runtime="cpu")
    thr = loaded.image_threshold
    with (folder / "scores.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["label"] for r in rows] == ["normal"] * 3 + ["anomalous"] * 4
    preds = loaded.predict([r["path"] for r in rows])
    for r, p in zip(rows, preds):
        assert float(r["score"]) == pytest.approx(p.score, abs=1e-6)
        assert r["flagged"] == str(int(p.score > thr))
    rep = json.loads((folder / "report.json").read_text())
    flagged = np.array([r["flagged"] == "1" for r in rows])
    assert rep["image_fpr"] == pytest.approx(flagged[:3].mean())
    assert rep["image_tpr"] == pytest.approx(flagged[3:].mean())
    assert len(rep["warnings"]) == 2
    with Image.open(folder / "calibration.png") as im:
        assert im.format == "PNG" and im.size[0] > 2 * im.size[1] * 0.9  # histogram | ROC side by side


def test_no_warning_for_large_sets():
    from fdsl.outputs.report import small_set_warnings

    assert small_set_warnings(20, 10) == [] and small_set_warnings(50, 0) == []
    assert len(small_set_warnings(19, 9)) == 2


def test_histogram_counts_have_integer_ticks(tmp_path, monkeypatch):
    """The histogram's y axis counts images: its ticks are whole numbers, even for 3 images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from fdsl.outputs import report

    seen = {}
    real_savefig = plt.Figure.savefig

    def keep(fig, *a, **k):
        seen["ticks"] = fig.axes[0].get_yticks()
        return real_savefig(fig, *a, **k)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    scores, labels = np.array([0.1, 0.2, 0.8]), np.array([False, False, True])
    report._plot(tmp_path / "c.png", scores, labels, 0.5, 0.0, 1.0, small=True)
    ticks = seen["ticks"]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)
