"""`FolderRun`, the one folder loop: the lock comes before anything in --out is touched (a refused run leaves
the running one alone), and resume is keyed on the inputs' content, not their size and mtime."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fdsl.errors import ConfigError
from fdsl.outputs.folder_run import FolderRun, inputs
from fdsl.outputs.verdicts import Prediction


class MeanScorer:
    """A NumPy scorer (the `Scorer` protocol): score = mean grey level in [0, 1], map = the image at 8x8."""

    info = {"fdsl_version": "test"}
    image_threshold = 0.5
    pixel_threshold = None
    cal_image_size = 8

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def numerics(self) -> dict[str, str]:
        return {"mean": "float64"}

    def score_images(self, images, threshold=None, cal_image_size=None) -> list[Prediction]:
        thr = self.image_threshold if threshold is None else threshold
        preds = []
        for im in images:
            self.seen.append(im.size)
            grey = np.asarray(im.convert("L").resize((8, 8)), np.float32) / 255.0
            score = float(grey.mean())
            preds.append(Prediction(score, score > thr, grey, None, score, float(grey.max()), None, im.size))
        return preds


def _flat(value: int) -> Image.Image:
    return Image.fromarray(np.full((16, 16, 3), value, np.uint8))


def _run(det, images, out, source) -> dict:
    return FolderRun(det, inputs([images], out), out, source=source, source_file=source, overlays=False,
                     progress=None).run()


def _scores(out: Path) -> dict:
    with (out / "scores.csv").open(newline="", encoding="utf-8") as fh:
        return {Path(r["path"]).name: float(r["score"]) for r in csv.DictReader(fh)}


def test_an_input_replaced_with_the_same_size_and_mtime_is_scored_again(tmp_path):
    """`cp -p`, tar and zip keep a file's size and mtime; camera frames of one size all have one size. The
    content digest sees the replacement; a file only touched keeps its row."""
    src, out, model = tmp_path / "in", tmp_path / "out", tmp_path / "model.bin"
    src.mkdir()
    model.write_bytes(b"model")
    for name, v in (("a.bmp", 10), ("b.bmp", 20)):
        _flat(v).save(src / name)
    _run(MeanScorer(), src, out, model)
    before = _scores(out)
    b = src / "b.bmp"
    st = b.stat()
    _flat(250).save(b)  # a BMP of the same size in bytes
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert b.stat().st_size == st.st_size and b.stat().st_mtime_ns == st.st_mtime_ns
    det = MeanScorer()
    summary = _run(det, src, out, model)
    after = _scores(out)
    assert after["a.bmp"] == before["a.bmp"] and after["b.bmp"] == pytest.approx(250 / 255, abs=1e-6)
    assert summary["n_skipped_done"] == 1 and len(det.seen) == 1
    os.utime(src / "a.bmp")  # touched only: same content, nothing to score again
    det = MeanScorer()
    summary = _run(det, src, out, model)
    assert summary["n_skipped_done"] == 2 and det.seen == []


def test_folder_run_refuses_what_is_not_a_scorer(tmp_path):
    with pytest.raises(TypeError, match="Scorer"):
        FolderRun(object(), [], tmp_path / "out", source=tmp_path, source_file=tmp_path)
    with pytest.raises(ConfigError, match="--threshold"):
        FolderRun(MeanScorer(), [], tmp_path / "out", source=tmp_path, source_file=tmp_path, threshold=float("nan"))


HOLDER = """
import sys, time
from pathlib import Path
from fdsl.io import atomic_open
from fdsl.outputs.writers import folder_lock

out = Path(sys.argv[1])
with folder_lock(out):
    with atomic_open(out / "overlays" / "a.png", "wb") as fh:  # a write in progress, as a running predict has
        fh.write(b"picture")
        (out.parent / "ready").touch()
        t0 = time.time()
        while not (out.parent / "go").exists() and time.time() - t0 < 60:
            time.sleep(0.05)
print("finished")
"""


def test_a_refused_run_leaves_the_running_one_alone(tmp_path):
    """Two real processes into one --out: the first holds the lock and is writing a file; the second
    (`fdsl predict`) is refused and must not remove the first one's temporary file, so the first finishes."""
    from fdsl_test_utils import small_calibrated_part

    part = small_calibrated_part(tmp_path / "part")
    out = tmp_path / "run" / "out"
    out.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not (out.parent / "ready").exists():
            assert holder.poll() is None and time.time() - t0 < 60, holder.communicate()
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "fdsl", "predict", "--detector", str(part.path), "--images",
                                 str(part.good[0]), "--out", str(out), "--device", "cpu"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "in use by another predict run" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
    finally:
        (out.parent / "go").touch()
        stdout, stderr = holder.communicate(timeout=60)
    assert holder.returncode == 0 and "finished" in stdout, stderr
    assert (out / "overlays" / "a.png").read_bytes() == b"picture"
