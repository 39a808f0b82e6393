"""`fdsl export --precision int8`: NNCF quantisation of the real-weights Lite0 nn detector, written with its gate
figures when the gate holds, refused in one line (saying by how much) when it does not."""
from __future__ import annotations

import json

import numpy as np
import pytest
from deploy_fixtures import build_lite0_detector


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    return build_lite0_detector(tmp_path_factory.mktemp("int8"))


def test_gate_figures_and_failures():
    """The gate's arithmetic: correlation, AUROC changes in points, and what each failure line says."""
    from fdsl.inspect.quantize import gate_failures, gate_figures

    s32 = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 1], bool)
    maps = np.zeros((5, 2, 2))
    same = gate_figures(s32, s32 + 0.01, maps, maps, labels, None)
    assert same["score_correlation"] > 0.9999 and same["image_auroc_change"] == 0.0
    assert gate_failures(same) == []
    swapped = gate_figures(s32, np.array([0.1, 0.2, 0.95, 0.8, 0.9]), maps, maps, labels, None)
    bad = gate_failures(swapped, min_corr=0.99, max_auroc_drop=0.5)
    assert any("short by" in b for b in bad) and any("image AUROC 100.00 -> 66.67" in b for b in bad)


def test_int8_export_passes_a_gate_and_records_it(lite, tmp_path):
    """int8 is written with the gate figures in the contract; the folder runs like any export, near fp32."""
    from fdsl.deploy import load_exported
    from fdsl.inspect.detector import Detector
    from fdsl.inspect.export import export_detector

    det = Detector.load(lite.path, runtime="cpu")
    cls = lite.test_dir.parent
    bad = [str(d) for d in lite.test_dir.iterdir() if d.name != "good"]
    folder = export_detector(det, tmp_path / "int8", "openvino", "int8",
                             int8=dict(normal=str(cls / "train" / "good"), anomalous=bad, min_corr=0.95,
                                       max_auroc_drop=5.0))
    c = json.loads((folder / "fdsl_export.json").read_text())
    gate = c["int8_gate"]
    assert c["precision"] == "int8" and gate["score_correlation"] >= 0.95 and gate["n_anomalous"] == 4
    assert gate["fp32_matmuls_kept"] >= 2 and "image_auroc_change" in gate  # the bank search stays fp32
    ref = det.predict(lite.images)
    got = load_exported(folder).predict(lite.images)
    s_ref, s_got = np.array([p.score for p in ref]), np.array([p.score for p in got])
    assert 0 < np.abs(s_ref - s_got).max() < 0.3 and np.corrcoef(s_ref, s_got)[0, 1] > 0.9


def test_int8_export_failing_the_gate_writes_nothing(lite, tmp_path, capsys):
    """A stricter gate (--int8_min_corr 0.99999) refuses: exit 2, one line with the figure and the shortfall."""
    from fdsl.cli.export import main as export_main

    out = tmp_path / "int8"
    code = export_main(["--detector", str(lite.path), "--out", str(out), "--precision", "int8",
                        "--calib_normal", str(lite.test_dir), "--int8_min_corr", "0.99999"])  # 6 images
    text = capsys.readouterr().err
    err = [ln for ln in text.splitlines() if ln.startswith("error:")]  # the rest is the INFO log
    assert code == 2 and len(err) == 1 and "fails the gate" in err[0] and "short by" in err[0], err
    assert "Traceback" not in text
    assert not (out / "model.xml").exists() and not (out / "fdsl_export.json").exists()
    assert export_main(["--detector", str(lite.path), "--out", str(out), "--precision", "int8"]) == 2
