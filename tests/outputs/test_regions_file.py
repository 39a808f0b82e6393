"""`regions.jsonl` beside scores.csv: per anomalous image its connected regions (bbox, area, peak score)."""
from __future__ import annotations

import csv
import json

from fdsl_test_utils import drop_fdsl_log_handlers, small_calibrated_part
from PIL import Image

from fdsl.cli.inspection import predict_folder


def test_regions_file_matches_scores_and_masks(tmp_path):
    part = small_calibrated_part(tmp_path)
    out = tmp_path / "out"
    try:
        summary = predict_folder(part.path, part.good + part.bad, out, runtime="cpu", overlays=False)
        rows = list(csv.DictReader(open(out / "scores.csv", encoding="utf-8")))
        flagged = [r for r in rows if r["is_anomalous"] == "1" and r["mask"]]
        assert flagged, "the calibrated part flags some image (max FPR 0.5)"
        recs = [json.loads(line) for line in (out / "regions.jsonl").read_text().splitlines()]
        assert [r["path"] for r in recs] == [r["path"] for r in flagged]  # scores.csv order, anomalous only
        pix = part.det.pixel_threshold
        for rec, row in zip(recs, flagged):
            w, h = Image.open(row["path"]).size
            assert rec["n_regions"] == len(rec["regions"]) >= 1
            assert sum(g["area_px"] for g in rec["regions"]) == int(row["defect_area_px"])
            areas = [g["area_px"] for g in rec["regions"]]
            assert areas == sorted(areas, reverse=True)
            for g in rec["regions"]:
                x0, y0, x1, y1 = g["bbox"]
                assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and g["area_px"] <= (x1 - x0) * (y1 - y0)
                if row["region"] == "pixel_threshold":
                    assert g["peak"] > pix  # every mask pixel lies above the pixel threshold
        assert summary["outputs"]["regions"] == "regions.jsonl"
        # a rerun (everything resumed) keeps the same lines
        before = (out / "regions.jsonl").read_text()
        predict_folder(part.path, part.good + part.bad, out, runtime="cpu", overlays=False)
        assert (out / "regions.jsonl").read_text() == before
    finally:
        drop_fdsl_log_handlers()


def test_without_scipy_no_regions_file_and_one_warning(tmp_path, monkeypatch, caplog):
    """A deploy install of only NumPy and Pillow: predict still works, writes no regions.jsonl, warns once."""
    import logging
    import sys

    import fdsl.outputs
    from fdsl.outputs import folder_run

    part = small_calibrated_part(tmp_path)
    monkeypatch.delattr(fdsl.outputs, "regions", raising=False)
    monkeypatch.setitem(sys.modules, "fdsl.outputs.regions", None)  # the import fails, as without scipy
    monkeypatch.setattr(folder_run, "_NO_REGIONS_WARNED", [])
    try:
        with caplog.at_level(logging.WARNING):
            summary = predict_folder(part.path, part.good + part.bad, tmp_path / "out", runtime="cpu",
                                     overlays=False)
    finally:
        drop_fdsl_log_handlers()
    assert (tmp_path / "out" / "scores.csv").is_file() and not (tmp_path / "out" / "regions.jsonl").exists()
    assert summary["outputs"]["regions"] is None
    assert sum("need scipy" in r.getMessage() for r in caplog.records) == 1
