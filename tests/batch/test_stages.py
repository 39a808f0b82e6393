"""`fdsl batch` without Ray: input listing, the decode and score stages, block files, the merge and the state."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fdsl_test_utils import small_calibrated_part
from PIL import Image

from fdsl.batch.inputs import list_inputs
from fdsl.batch.job import best_rows, check_state, merge, write_block
from fdsl.batch.stages import RESULT_SCHEMA, DecodeImages, ScoreImages
from fdsl.errors import ConfigError, DataError, FDSLError


def _png(path: Path, h: int, w: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    work = tmp_path_factory.mktemp("batch_stages")
    part = small_calibrated_part(work)
    imgs = work / "imgs"
    good = [_png(imgs / "a" / f"g{i}.png", 36 + i, 40, i) for i in range(6)] + [*part.good, *part.bad]
    bad = {"empty": imgs / "empty.png", "corrupt": imgs / "corrupt.png", "text": imgs / "text.jpg"}
    bad["empty"].write_bytes(b"")
    bad["corrupt"].write_bytes(good[0].read_bytes()[:60])  # a PNG cut after its header
    bad["text"].write_text("not an image\n")
    return SimpleNamespace(work=work, part=part, imgs=imgs, good=good, bad=bad)


def test_list_inputs_folder_glob_and_lists(env, tmp_path):
    folder = list_inputs(str(env.imgs))
    assert folder == sorted(folder, key=lambda p: os.path.relpath(p, env.imgs))
    assert set(map(str, env.bad.values())) < set(folder) and all(os.path.isabs(p) for p in folder)
    assert list_inputs(str(env.imgs / "a" / "*.png")) == sorted(str(p) for p in env.imgs.glob("a/*.png"))
    lst = tmp_path / "list.txt"
    lst.write_text(f"# archive\n{os.path.relpath(env.good[0], tmp_path)}\n\n{env.good[1]}\n{env.good[0]}\n"
                   f"{tmp_path / 'notes.md'}\n")
    # relative to the list's folder; the repeat once; a non-image listed is an input (an error row later)
    assert list_inputs(str(lst)) == [str(env.good[0]), str(env.good[1]), str(tmp_path / "notes.md")]
    csv_list = tmp_path / "list.csv"
    csv_list.write_text(f"line,path\n3,{env.good[2]}\n4,{env.good[3]}\n")
    assert list_inputs(str(csv_list)) == [str(env.good[2]), str(env.good[3])]
    with pytest.raises(DataError, match="does not exist"):
        list_inputs(str(tmp_path / "nowhere"))


def test_decode_keeps_every_input_and_names_the_bad_ones(env):
    paths = [str(env.good[0]), *map(str, env.bad.values()), str(env.imgs / "gone.png")]
    t = DecodeImages()(pa.table({"path": paths}))
    rows = {r["path"]: r for r in t.to_pylist()}
    assert list(rows) == paths
    ok = rows[str(env.good[0])]
    assert ok["error"] is None and (ok["height"], ok["width"]) == (36, 40)
    assert ok["sha256"] == hashlib.sha256(env.good[0].read_bytes()).hexdigest()
    assert np.array_equal(np.frombuffer(ok["pixels"], np.uint8).reshape(36, 40, 3),
                          np.asarray(Image.open(env.good[0]).convert("RGB")))
    assert "empty" in rows[str(env.bad["empty"])]["error"]
    for name in ("corrupt", "text"):
        assert rows[str(env.bad[name])]["error"] and rows[str(env.bad[name])]["pixels"] is None
    assert rows[str(env.imgs / "gone.png")]["error"] and rows[str(env.imgs / "gone.png")]["size"] is None


def test_score_rows_equal_the_detector_and_regions_cover_the_mask(env):
    paths = [str(p) for p in env.good] + [str(env.bad["corrupt"])]
    dec = DecodeImages()(pa.table({"path": paths}))
    rows = ScoreImages(str(env.part.path), threshold=None).__call__(dec).to_pylist()
    assert [r["path"] for r in rows] == paths
    preds = env.part.det.score_images([Image.open(p).convert("RGB") for p in env.good])
    for r, p in zip(rows, preds):
        assert r["error"] is None and abs(r["score"] - p.score) < 1e-6 and r["is_anomalous"] == p.is_anomalous
        assert r["margin"] == pytest.approx(p.score - env.part.det.image_threshold)
        assert r["defect_area_px"] == p.defect_area_px
        if p.is_anomalous:
            assert r["mask_png"] is not None and sum(g["area_px"] for g in r["regions"]) == p.defect_area_px
            assert all(0 <= g["x0"] < g["x1"] <= r["width"] and 0 <= g["y0"] < g["y1"] <= r["height"]
                       for g in r["regions"])
        else:
            assert r["mask_png"] is None and r["regions"] == []
    assert any(r["is_anomalous"] for r in rows[:-1]) and not all(r["is_anomalous"] for r in rows[:-1])
    assert rows[-1]["error"] and rows[-1]["score"] is None


def _result(path: str, size: int, mtime: int, score: float, at: float, error: str | None = None) -> dict:
    return {"path": path, "size": size, "mtime_ns": mtime, "sha256": None, "width": 4, "height": 4,
            "score": score, "map_max": score, "patch_score": score, "threshold": 0.5, "margin": score - 0.5,
            "is_anomalous": score > 0.5, "defect_area_px": 0, "region": "none", "regions": [], "error": error,
            "worker": "w:1", "scored_at": at, "mask_png": None, "overlay_png": None}


def test_blocks_are_named_by_their_inputs_and_the_merge_keeps_one_row_per_path(tmp_path):
    a = [_result("/x/a.png", 10, 1, 0.4, 1.0), _result("/x/b.png", 10, 1, 0.6, 1.0)]
    first = write_block(tmp_path, pa.Table.from_pylist(a, schema=RESULT_SCHEMA))
    again = write_block(tmp_path, pa.Table.from_pylist(a[::-1], schema=RESULT_SCHEMA))  # a retried block
    assert first == again and len(list((tmp_path / "parts").iterdir())) == 1
    # the same input delivered in another block (another composition), and b's file replaced since
    write_block(tmp_path, pa.Table.from_pylist([_result("/x/b.png", 10, 1, 0.6, 2.0),
                                                _result("/x/b.png", 11, 2, 0.7, 3.0)], schema=RESULT_SCHEMA))
    current = {"/x/a.png": (10, 1), "/x/b.png": (11, 2)}
    final = merge(tmp_path, list(current), current)
    t = pq.read_table(tmp_path / "results.parquet")
    assert t.column("path").to_pylist() == ["/x/a.png", "/x/b.png"]
    assert final["/x/b.png"]["score"] == 0.7 and not (tmp_path / "parts").exists()
    with pytest.raises(FDSLError, match="no row"):
        merge(tmp_path, ["/x/a.png", "/x/c.png"], {"/x/a.png": (10, 1), "/x/c.png": (1, 1)})
    best = best_rows([_result("/y.png", 1, 1, 0.1, 5.0), _result("/y.png", 1, 2, 0.2, 1.0)], {"/y.png": (1, 2)})
    assert best["/y.png"]["score"] == 0.2  # the row of the file as it is now, though older


def test_state_refuses_another_detector_in_one_line(tmp_path):
    det = tmp_path / "d.fdsl"
    det.write_bytes(b"x")
    out = tmp_path / "out"
    out.mkdir()
    (out / "batch_state.json").write_text(
        '{"format": 1, "detector": "/old.fdsl", "detector_sha256": "' + "a" * 64 + '", "threshold_override": null}')
    assert check_state(out, det, "a" * 64, None)["detector_sha256"] == "a" * 64
    with pytest.raises(ConfigError, match="another detector") as exc:
        check_state(out, det, "b" * 64, None)
    assert "\n" not in str(exc.value) and "/old.fdsl" in str(exc.value)
    with pytest.raises(ConfigError, match="--threshold"):
        check_state(out, det, "a" * 64, 0.7)


def test_ray_is_imported_only_when_a_job_starts():
    import subprocess
    import sys

    code = ("import sys, fdsl, fdsl.cli, fdsl.config, fdsl.batch.job, fdsl.batch.stages, fdsl.cli.batch; "
            "sys.exit(1 if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], env=dict(os.environ), timeout=120).returncode == 0


def test_cli_bad_input_is_one_line(env, tmp_path, capsys):
    from fdsl.cli import main

    assert main(["batch", "--detector", str(tmp_path / "none.fdsl"), "--input", str(env.imgs),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --detector") and "\n" not in err
    assert main(["batch", "--detector", str(env.part.path), "--input", str(tmp_path / "nothing"),
                 "--out", str(tmp_path / "o"), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err


def test_progress_line_has_done_rate_and_eta():
    import io

    from fdsl.batch.job import Progress

    buf = io.StringIO()
    bar = Progress(100, stream=buf)
    bar.t0 -= 10.0  # 10 s ago, no block yet
    bar.update(25, 1, final=True)
    line = buf.getvalue().strip()
    assert line.startswith("batch: 25/100 images (25.0%)") and "img/s" in line and "1 error(s)" in line
    rate = float(line.split(", ")[1].split()[0])
    assert 2.0 <= rate <= 2.6 and "ETA 00:00:" in line  # 75 left at ~2.5/s: ~30 s
    bar.first = (bar.first[0] - 5.0, 25)  # the first block came 5 s ago; 25 more since: 5/s, start-up excluded
    bar.update(25, 0, final=True)
    rate = float(buf.getvalue().strip().splitlines()[-1].split(", ")[1].split()[0])
    assert 4.5 <= rate <= 5.5


def test_exported_detector_scores_as_the_file(env, tmp_path):
    """An exported folder (OpenVINO, no PyTorch in the actor) is a scorer too: the same rows to 1e-4."""
    pytest.importorskip("openvino")
    from fdsl.batch.stages import detector_digest
    from fdsl.inspect.export import export_detector

    folder = export_detector(env.part.det, tmp_path / "exported", "openvino")
    dec = DecodeImages()(pa.table({"path": [str(p) for p in env.good]}))
    want = ScoreImages(str(env.part.path))(dec).to_pylist()
    got = ScoreImages(str(folder), threads=1)(dec).to_pylist()
    assert [r["path"] for r in got] == [r["path"] for r in want]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], rtol=0, atol=1e-4)
    digest = detector_digest(folder)
    (folder / "fdsl_export.json").write_text((folder / "fdsl_export.json").read_text() + " ")
    assert detector_digest(folder) != digest  # any file of the folder changes the detector's identity
    with pytest.raises(ConfigError, match="CPU"):
        ScoreImages(str(folder), device="cuda")
