"""`fdsl predict` rerun into one --out (QA of the harden + workbench merge): whatever the sequence of runs,
scores.csv, the gallery, summary.json and the files on disk agree, and no row outlives its input."""
from __future__ import annotations

import csv
import html
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from fdsl_test_utils import small_calibrated_part

CLS = "carpet_syn"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    return small_calibrated_part(tmp_path_factory.mktemp("reruns"), CLS)


def _predict(env, images, out, **kw) -> dict:
    from fdsl.cli.inspection import predict_folder

    return predict_folder(env.path, [str(i) for i in images], out, runtime="cpu", **kw)


def _rows(out: Path) -> list:
    with (out / "scores.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _files(out: Path, folder: str) -> set:
    return {f.relative_to(out).as_posix() for f in (out / folder).rglob("*") if f.is_file()} \
        if (out / folder).exists() else set()


def _gallery_paths(out: Path) -> list:
    page = (out / "index.html").read_text(encoding="utf-8")
    return [html.unescape(p) for p in re.findall(r"<td class=f>(.*?)</td>", page)]


def _agree(out: Path) -> list:
    """Check that scores.csv, the gallery, summary.json and overlays/ + masks/ agree; returns the rows."""
    rows = _rows(out)
    paths = [r["path"] for r in rows]
    assert len(set(paths)) == len(paths), paths
    assert sorted(_gallery_paths(out)) == sorted(paths)
    linked = {r[c] for r in rows for c in ("overlay", "mask") if r[c]}
    assert _files(out, "overlays") | _files(out, "masks") == linked  # every link exists, no orphan file
    summary = json.loads((out / "summary.json").read_text())
    flagged = [r["path"] for r in rows if r["is_anomalous"] == "1"]
    assert summary["n_anomalous"] == len(flagged)
    assert sorted(f["path"] for f in summary["flagged"]) == sorted(flagged)
    assert summary["n_scored"] + summary["n_kept_earlier"] == len(rows)
    return rows


def test_gallery_lists_the_kept_rows_of_earlier_runs(env, tmp_path):
    """A run on b/ after a run on a/ keeps a/'s rows in scores.csv: the gallery shows them too."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    shutil.copy(env.good[0], a / "one.png")
    shutil.copy(env.bad[0], a / "two.png")
    shutil.copy(env.bad[1], b / "three.png")
    out = tmp_path / "v"
    _predict(env, [a], out)
    summary = _predict(env, [b], out)
    rows = _agree(out)
    assert len(rows) == 3 and summary["n_kept_earlier"] == 2


def test_maps_and_overlays_switched_off_leave_no_stale_files(env, tmp_path):
    """--save_maps then no --save_maps (and --overlays 0): the earlier run's raw maps and overlays go too,
    as they would otherwise sit beside rows that no longer refer to them."""
    inc = tmp_path / "inc"
    inc.mkdir()
    for p in env.good + env.bad[:1]:
        shutil.copy(p, inc / f"{p.parent.name}_{p.name}")
    out = tmp_path / "v"
    _predict(env, [inc], out, save_maps=True)
    assert len(_files(out, "maps")) == 2 * 3
    _predict(env, [inc], out)
    assert _files(out, "maps") == set()
    _agree(out)
    _predict(env, [inc], out, overlays=False)
    assert _files(out, "overlays") == set()
    assert all(r["overlay"] == "" for r in _agree(out))


def test_one_file_named_two_ways_is_one_row(env, tmp_path, monkeypatch):
    """The same folder given relative, then absolute: one row per file, the second run resumes."""
    inc = tmp_path / "inc"
    inc.mkdir()
    shutil.copy(env.good[0], inc / "a.png")
    shutil.copy(env.bad[0], inc / "b.png")
    out = tmp_path / "v"
    monkeypatch.chdir(tmp_path)
    _predict(env, ["inc"], out, save_maps=True)
    summary = _predict(env, [inc.resolve()], out, save_maps=True)
    rows = _agree(out)
    assert sorted(r["path"] for r in rows) == sorted(str(inc.resolve() / n) for n in ("a.png", "b.png"))
    assert summary["n_skipped_done"] == 2 and summary["n_kept_earlier"] == 0
    assert len(_files(out, "maps")) == 2 * 2


def test_an_input_keeps_its_dotted_output_name(env, tmp_path):
    """`sub.dir/a.b.c.png` listed from the parent, then from sub.dir itself: one output name throughout,
    nothing left under the earlier name."""
    root = tmp_path / "inc"
    (root / "sub.dir").mkdir(parents=True)
    shutil.copy(env.bad[0], root / "sub.dir" / "a.b.c.png")
    out = tmp_path / "v"
    _predict(env, [root], out)
    first = _rows(out)[0]
    summary = _predict(env, [root / "sub.dir"], out)
    rows = _agree(out)
    assert len(rows) == 1 and rows[0]["overlay"] == first["overlay"] == "overlays/sub_dir/a.b.c.png"
    assert summary["n_skipped_done"] == 1


def test_kept_row_of_a_replaced_input_is_dropped(env, tmp_path, caplog):
    """An earlier input that is not part of this run but was replaced since it was scored: its row (and
    overlay) would be a stale verdict of the file now at that path; it is dropped with a warning."""
    inc = tmp_path / "inc"
    inc.mkdir()
    shutil.copy(env.good[0], inc / "a.png")
    shutil.copy(env.good[1], inc / "b.png")
    out = tmp_path / "v"
    _predict(env, [inc], out)
    shutil.copy(env.bad[0], inc / "b.png")  # replaced, but the next run only looks at a.png
    with caplog.at_level("WARNING"):
        summary = _predict(env, [inc / "a.png"], out)
    rows = _agree(out)
    assert [Path(r["path"]).name for r in rows] == ["a.png"] and summary["n_kept_earlier"] == 0
    assert "b.png" in caplog.text


def test_an_earlier_output_folder_inside_the_inputs_is_not_scored(env, tmp_path, caplog):
    """--out inc/v1, then --out inc/v2: v1's overlays and masks are predict outputs, never parts."""
    inc = tmp_path / "inc"
    inc.mkdir()
    shutil.copy(env.good[0], inc / "a.png")
    shutil.copy(env.bad[0], inc / "b.png")
    _predict(env, [inc], inc / "v1")
    with caplog.at_level("WARNING"):
        summary = _predict(env, [inc], inc / "v2")
    assert sorted(Path(r["path"]).name for r in _agree(inc / "v2")) == ["a.png", "b.png"]
    assert summary["n_images"] == 2 and "v1" in caplog.text


def test_printed_counts_include_the_kept_rows(env, tmp_path, capsys):
    """The one-line result names the kept rows, so its anomalous count is not larger than its image count."""
    from fdsl.cli.inspection import main

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for i, p in enumerate(env.bad):
        shutil.copy(p, a / f"{i}.png")
    shutil.copy(env.good[0], b / "g.png")
    out = tmp_path / "v"
    args = ["predict", "--detector", str(env.path), "--out", str(out), "--device", "cpu", "--images"]
    assert main(args + [str(a)]) == 0 and main(args + [str(b)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    n_anom = sum(r["is_anomalous"] == "1" for r in _agree(out))
    assert f"(1 image(s) + {len(env.bad)} kept from earlier runs, {n_anom} anomalous)" in line, line


def test_a_file_given_twice_in_one_run_is_one_row(env, tmp_path, caplog):
    """`--images inc inc/a.png` (or a second name of the same file): scored once, one row, with a warning."""
    inc = tmp_path / "inc"
    inc.mkdir()
    shutil.copy(env.good[0], inc / "a.png")
    shutil.copy(env.bad[0], inc / "b.png")
    out = tmp_path / "v"
    with caplog.at_level("WARNING"):
        summary = _predict(env, [inc, inc / "a.png", tmp_path / "inc" / ".." / "inc" / "b.png"], out)
    assert sorted(Path(r["path"]).name for r in _agree(out)) == ["a.png", "b.png"]
    assert summary["n_images"] == 2 and "given more than once" in caplog.text


def test_long_input_names_get_output_names_that_fit(env, tmp_path):
    """A 254-character input name (legal) and its twin of another extension: output names are shortened
    (with a digest, so they stay unique) instead of failing with 'File name too long'."""
    from fdsl.outputs.writers import is_output_stem, output_names

    inc = tmp_path / "inc"
    inc.mkdir()
    long = "a" * 250
    shutil.copy(env.bad[0], inc / f"{long}.png")
    shutil.copy(env.good[0], inc / f"{long}.jpg")
    out = tmp_path / "v"
    _predict(env, [inc], out, save_maps=True)
    rows = _agree(out)
    assert len(rows) == 2 and len({r["overlay"] for r in rows}) == 2
    assert all(len(Path(r["overlay"]).name) < 200 for r in rows)
    stems = output_names([f"{'b' * 300}/{long}x.png", f"{'b' * 300}/{long}y.png"])
    assert len(set(stems)) == 2 and all(is_output_stem(s) for s in stems)
    assert all(len(part) < 200 for s in stems for part in s.split("/"))


def test_a_rerun_at_another_precision_scores_again(env, tmp_path):
    """Rows scored with --precision bf16 are not 'done' for an fp32 run (nor the reverse): the precision
    moves the scores, so it is part of the settings a resume compares."""
    from fdsl.config import RuntimeConfig
    from fdsl.inspect.detector import Detector

    inc = tmp_path / "inc"
    inc.mkdir()
    shutil.copy(env.bad[0], inc / "a.png")
    out = tmp_path / "v"
    bf16 = RuntimeConfig(device="cpu", precision="bf16")
    from fdsl.cli.inspection import predict_folder

    predict_folder(env.path, [inc], out, runtime=bf16)
    summary = predict_folder(env.path, [inc], out, runtime="cpu")
    assert summary["n_skipped_done"] == 0
    fp32 = Detector.load(env.path, runtime="cpu").predict(inc / "a.png")[0].score
    assert float(_agree(out)[0]["score"]) == pytest.approx(fp32, abs=1e-6)


def test_an_interrupted_rerun_leaves_no_stale_gallery_or_summary(env, tmp_path, monkeypatch):
    """Ctrl-C during a rerun with a new input: scores.csv already holds the new rows; the earlier run's
    index.html and summary.json (which do not) are not left beside it. The resumed run writes both again."""
    from fdsl.inspect.detector import Detector

    inc = tmp_path / "inc"
    inc.mkdir()
    shutil.copy(env.good[0], inc / "a.png")
    out = tmp_path / "v"
    _predict(env, [inc], out)
    shutil.copy(env.bad[0], inc / "b.png")
    shutil.copy(env.bad[1], inc / "c.png")
    real = Detector.score_images
    calls = []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Detector, "score_images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _predict(env, [inc], out, batch_size=1)
    assert len(_rows(out)) == 2
    assert not (out / "index.html").exists() and not (out / "summary.json").exists()
    monkeypatch.setattr(Detector, "score_images", real)
    summary = _predict(env, [inc], out)
    assert len(_agree(out)) == 3 and summary["n_skipped_done"] == 2


def test_a_garbled_state_entry_is_scored_again(env, tmp_path):
    """A state file whose entry for an input is not a record (hand-edited, another tool): that input is
    scored again instead of an AttributeError traceback."""
    inc = tmp_path / "inc"
    inc.mkdir()
    shutil.copy(env.good[0], inc / "a.png")
    out = tmp_path / "v"
    _predict(env, [inc], out)
    state = json.loads((out / ".predict_state.json").read_text())
    state["inputs"] = {k: 5 for k in state["inputs"]}
    (out / ".predict_state.json").write_text(json.dumps(state))
    summary = _predict(env, [inc], out)
    assert summary["n_skipped_done"] == 0 and len(_agree(out)) == 1


def test_a_calibration_report_inside_an_input_folder_is_not_an_input(env, tmp_path, caplog):
    """The detector kept in the good-parts folder: calibrate writes <stem>_calibration/calibration.png there;
    listing that folder again (fit, calibrate, predict) skips the report's picture."""
    from fdsl.outputs.files import list_images
    from fdsl.outputs.report import write_calibration_report

    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(env.good[0], good / "a.png")
    rep = dict(n_normal=1, n_anomalous=1, image=0.5, image_fpr=0.0, image_tpr=1.0,
               images=[{"name": "a.png", "path": "a.png", "anomalous": False, "score": 0.4, "map_max": 0.4},
                       {"name": "b.png", "path": "b.png", "anomalous": True, "score": 0.6, "map_max": 0.6}])
    write_calibration_report(good / "part.fdsl", rep)
    assert (good / "part_calibration" / "calibration.png").is_file()
    with caplog.at_level("WARNING"):
        assert [n for _, n in list_images(good)] == ["a.png"]
    assert "part_calibration" in caplog.text
