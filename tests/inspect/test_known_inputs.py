"""`predict` warns when its inputs include the detector's calibration images or its shots (by sha256)."""
from __future__ import annotations

import logging
import shutil

from fdsl_test_utils import drop_fdsl_log_handlers, small_calibrated_part

from fdsl.cli.inspection import predict_folder
from fdsl.outputs.files import sha256_file
from fdsl.outputs.input_check import reused_images


def test_calibration_digests_are_recorded_and_predict_warns(tmp_path, caplog):
    part = small_calibrated_part(tmp_path)
    cal = part.det.info["thresholds"]["calibration_images"]
    assert sorted(cal) == sorted({sha256_file(p) for p in part.good + part.bad})
    fresh = tmp_path / "incoming"
    fresh.mkdir()
    shutil.copy(part.good[0], fresh / "renamed_copy.png")  # same bytes under another name: still known
    train = sorted((part.root / "carpet_syn" / "train" / "good").glob("*.png"))
    known = reused_images(part.det.info, [fresh / "renamed_copy.png", train[0], part.bad[0]])
    assert known == {"calibration": [str(fresh / "renamed_copy.png"), str(part.bad[0])], "shots": [str(train[0])]}
    try:
        with caplog.at_level(logging.WARNING):
            predict_folder(part.path, [fresh], tmp_path / "out", runtime="cpu", overlays=False)
    finally:
        drop_fdsl_log_handlers()
    warned = [r.getMessage() for r in caplog.records if "used by `calibrate`" in r.getMessage()]
    assert len(warned) == 1 and "1 of the 1 input image(s)" in warned[0]


def test_no_warning_on_unseen_images(tmp_path, caplog):
    part = small_calibrated_part(tmp_path)
    other = small_calibrated_part(tmp_path / "other", cls="wood_syn")  # another class: images fdsl never saw
    try:
        with caplog.at_level(logging.WARNING):
            predict_folder(part.path, other.good, tmp_path / "out", runtime="cpu", overlays=False)
    finally:
        drop_fdsl_log_handlers()
    assert not [r for r in caplog.records if "calibrate`" in r.getMessage() or "own normal shots" in r.getMessage()]
