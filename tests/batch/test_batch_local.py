"""`fdsl batch` on a local Ray (started as the command does, 2 workers): a few hundred images, every row once,
scores equal `fdsl predict`'s, bad files as error rows; a rerun scores only what is missing; another detector is
refused."""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from batch_fixtures import add_bad_files, make_images
from fdsl_test_utils import small_calibrated_part
from PIL import Image

pytest.importorskip("ray")

N_IMAGES = 240


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import ray

    from fdsl.batch.job import start_ray

    work = tmp_path_factory.mktemp("batch_local")
    part = small_calibrated_part(work)
    imgs = work / "imgs"
    good = make_images(imgs, N_IMAGES - len(part.bad))
    for i, p in enumerate(part.bad):  # real defect images, so some rows are anomalous with masks and regions
        shutil.copy(p, imgs / f"defect{i}_{p.name}")
    bad = add_bad_files(imgs)
    owned = start_ray(None, num_cpus=3)  # the local start `fdsl batch` makes without --address
    yield SimpleNamespace(work=work, part=part, imgs=imgs, good=good, bad=bad)
    if owned:
        ray.shutdown()


def _table(out: Path) -> list[dict]:
    return pq.read_table(out / "results.parquet").to_pylist()


def test_every_row_once_and_scores_equal_predict(env):
    from fdsl.batch.job import run_batch
    from fdsl.cli.inspection import predict_folder

    out = env.work / "out"
    s = run_batch(env.part.path, str(env.imgs), out, workers=2, batch_size=8, progress=False)
    rows = _table(out)
    paths = [r["path"] for r in rows]
    expected = sorted(str(p) for p in env.imgs.rglob("*") if p.is_file())
    assert len(paths) == len(set(paths)) == N_IMAGES + 3 and sorted(paths) == expected
    assert s["n_inputs"] == s["n_scored"] == N_IMAGES + 3 and s["n_errors"] == 3
    errors = {r["path"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {str(p) for p in env.bad.values()}
    assert len({r["worker"] for r in rows if not r["error"]}) == 2  # both workers scored

    predict_folder(env.part.path, [str(env.imgs)], env.work / "pred", runtime="cpu", overlays=False)
    with open(env.work / "pred" / "scores.csv", newline="") as fh:
        want = {os.path.abspath(r["path"]): r for r in csv.DictReader(fh)}
    scored = [r for r in rows if not r["error"]]
    assert set(want) == {r["path"] for r in scored}
    for r in scored:
        w = want[r["path"]]
        assert abs(r["score"] - float(w["score"])) <= 1e-5 and abs(r["map_max"] - float(w["map_max"])) <= 1e-5
        assert int(r["is_anomalous"]) == int(w["is_anomalous"]) and str(r["defect_area_px"]) == w["defect_area_px"]
    anomalous = [r for r in scored if r["is_anomalous"]]
    assert anomalous and all(r["mask"] and (out / r["mask"]).is_file() and r["regions"] for r in anomalous)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_anomalous"] == len(anomalous) and summary["detector_sha256"] and summary["images_per_second"]


def test_rerun_scores_only_what_is_missing_and_another_detector_is_refused(env):
    from fdsl.batch.job import run_batch
    from fdsl.errors import ConfigError

    out = env.work / "out"
    before = {r["path"]: r for r in _table(out)}
    changed = env.good[:2]
    for i, p in enumerate(changed):  # new content: other size, other mtime
        Image.fromarray(np.full((30 + i, 30, 3), 200, np.uint8)).save(p)
    touched = env.good[2]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))  # same bytes
    new = make_images(env.imgs / "later", 3, seed=7)
    s = run_batch(env.part.path, str(env.imgs), out, workers=2, batch_size=8, progress=False)
    assert s["n_scored"] == len(changed) + len(new) and s["n_skipped_done"] == N_IMAGES + 3 - len(changed)
    rows = {r["path"]: r for r in _table(out)}
    assert len(rows) == N_IMAGES + 3 + len(new)
    for p in changed:
        assert rows[str(p)]["sha256"] != before[str(p)]["sha256"] and rows[str(p)]["size"] == p.stat().st_size
    assert rows[str(touched)]["scored_at"] == before[str(touched)]["scored_at"]  # not rescored
    assert rows[str(touched)]["mtime_ns"] == touched.stat().st_mtime_ns
    kept = [p for p in before if p not in {str(c) for c in changed}]
    assert all(rows[p]["scored_at"] == before[p]["scored_at"] for p in kept)

    other = env.work / "other.fdsl"
    thresholds = env.part.det.info["thresholds"]
    was = thresholds["image"]
    try:
        thresholds["image"] = float(was) + 0.01
        env.part.det.save(other)
    finally:
        thresholds["image"] = was
    with pytest.raises(ConfigError, match="another detector") as exc:
        run_batch(other, str(env.imgs), out, progress=False)
    assert "\n" not in str(exc.value)
    assert {r["path"]: r["scored_at"] for r in _table(out)} == {p: r["scored_at"] for p, r in rows.items()}
