"""`fdsl serve`'s JSON API through an HTTP client (fastapi's TestClient): same verdicts as `fdsl predict`,
limits, refusals, isolation of failures, fitting from uploads, and no writes outside the work folder."""
from __future__ import annotations

import base64
import csv
import io
import os
import tempfile

import numpy as np
import pytest
from fdsl_test_utils import make_calibrated_detector as make_detector
from PIL import Image

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_detector(tmp_path_factory.mktemp("serve_api"))


def _client(env, workdir, **limits):
    from fastapi.testclient import TestClient

    from fdsl.serve.app import create_app
    from fdsl.serve.uploads import Limits

    return TestClient(create_app(env.det, env.path.name, workdir, Limits(**limits) if limits else None,
                                 runtime="cpu"))


def _files(paths, field="files"):
    return [(field, (p.name, p.read_bytes(), "image/png")) for p in paths]


def test_predict_equals_cli_predict(env, tmp_path):
    """The same images in the same batch: the API's records are predict's scores.csv rows, value for value."""
    from fdsl.cli.inspection import predict_folder

    images = tmp_path / "incoming"
    images.mkdir()
    verdicts = {p: pr.is_anomalous for p, pr in zip(env.good + env.bad, env.det.predict(env.good + env.bad))}
    flagged, passed = [p for p in env.bad if verdicts[p]], [p for p in env.good if not verdicts[p]]
    picks = [flagged[0], passed[0], flagged[-1]]
    names = ["a_bad.png", "b_good.png", "c_bad.png"]  # sorted as predict lists them
    for src, name in zip(picks, names):
        (images / name).write_bytes(src.read_bytes())
    predict_folder(env.path, [images], tmp_path / "out", runtime="cpu")
    with (tmp_path / "out" / "scores.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    client = _client(env, tmp_path / "work")
    resp = client.post("/api/predict", files=[("files", (n, (images / n).read_bytes(), "image/png")) for n in names])
    assert resp.status_code == 200, resp.text
    recs = resp.json()
    assert [r["name"] for r in recs] == names and len(rows) == 3
    assert {r["is_anomalous"] for r in recs} == {True, False}, "the check needs both verdicts"
    for rec, row in zip(recs, rows):
        assert set(rec) == {"name", "score", "map_max", "threshold", "margin", "is_anomalous", "defect_area_px",
                            "region", "overlay_png_base64", "input_warnings"}
        assert rec["input_warnings"] == []
        for k in ("score", "map_max", "threshold", "margin"):
            assert rec[k] == float(row[k]), k
        assert int(rec["is_anomalous"]) == int(row["is_anomalous"])
        assert rec["defect_area_px"] == int(row["defect_area_px"]) and rec["region"] == row["region"]
        assert rec["margin"] == pytest.approx(rec["score"] - rec["threshold"], abs=2e-6)
        overlay = Image.open(io.BytesIO(base64.b64decode(rec["overlay_png_base64"])))
        assert overlay.format == "PNG" and overlay.size == Image.open(tmp_path / "out" / row["overlay"]).size
    meta = client.get("/api/detector").json()
    assert meta["name"] == "part.fdsl" and meta["image_threshold"] == env.det.image_threshold
    assert meta["n_normal_images"] == len(env.train) and meta["model_config"]["model"] == "FDSL-Tiny-ViT"
    # the fit tab names a trained head only for the learned scorer: the page reads model_config.scorer
    page = client.get("/").text
    assert meta["model_config"]["scorer"] == "fdsl" and 'model_config.scorer === "nn"' in page
    assert "training-free scorer (nothing is trained)" in page and "trained head and backbone:" not in page


def test_refusals_are_400_or_413_with_a_message(env, tmp_path):
    client = _client(env, tmp_path / "work", max_files=2, max_file_bytes=60_000)
    good = env.good[0].read_bytes()
    cases = [
        ([("files", ("notes.txt", b"not an image at all", "text/plain"))], 400, "'notes.txt' is not an image"),
        ([("files", ("cut.png", good[: len(good) // 2], "image/png"))], 400, "corrupt or truncated"),
        ([("files", ("empty.png", b"", "image/png"))], 400, "empty"),
        (_files(env.good[:3]), 413, "at most 2"),
        ([("files", ("big.png", os.urandom(70_000), "image/png"))], 413, "larger than"),
        ([("other", ("a.png", good, "image/png"))], 400, "field 'files'"),
    ]
    for files, status, needle in cases:
        resp = client.post("/api/predict", files=files)
        assert resp.status_code == status and needle in resp.json()["detail"], (needle, resp.text)
    resp = client.post("/api/predict", content=b"x", headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "multipart" in resp.json()["detail"]
    assert client.post("/api/predict", files=_files(env.good[:1])).status_code == 200  # still serving


def test_a_failing_request_does_not_stop_the_server(env, tmp_path, monkeypatch):
    from fdsl.inspect.detector import Detector

    client = _client(env, tmp_path / "work")
    real = Detector.score_images
    monkeypatch.setattr(Detector, "score_images", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    resp = client.post("/api/predict", files=_files(env.bad[:1]))
    assert resp.status_code == 500 and "boom" in resp.json()["detail"]
    monkeypatch.setattr(Detector, "score_images", real)
    resp = client.post("/api/predict", files=_files(env.bad[:1]))
    assert resp.status_code == 200 and resp.json()[0]["name"] == env.bad[0].name


def test_fit_from_uploads_writes_only_in_workdir(env, tmp_path, monkeypatch):
    """Fitting from the page equals `Detector.fit` on the same images; nothing is written outside the work folder,
    and no upload is stored under its own name."""
    from fdsl.inspect.detector import Detector

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    work = cwd / "work"
    client = _client(env, work)
    noise = io.BytesIO()  # a good image over 1 MB: Starlette's own parser would spool it to the temp folder
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(noise, "PNG")
    assert noise.tell() > 2 ** 20
    files = (_files(env.train[:2], "normal") + _files(env.good, "val_normal") + _files(env.bad, "val_anomalous")
             + [("val_normal", ("big.png", noise.getvalue(), "image/png"))])
    systmp = tmp_path / "systmp"  # the system temp folder, where Starlette's own parser spools large uploads
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))

    def no_spool(*a, **k):  # what a SpooledTemporaryFile rolls over to (unlinked at once, so never listed)
        raise AssertionError("an upload was spooled to an anonymous temporary file")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_spool)
    resp = client.post("/api/fit", files=files)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["n_shots"] == 2 and body["calibration"]["image_method"] == "f1_max"
    assert len(body["warnings"]) == 2  # 4 good and 4 defect validation images: both too few
    assert body["calibration"]["n_normal"] == 4
    assert [p.relative_to(cwd).as_posix() for p in cwd.rglob("*") if p.is_file()] == [
        f"work/fitted/{body['id']}.fdsl"]
    assert not list(systmp.iterdir()), "an upload was written to the system temp folder"
    fitted = Detector.load(work / "fitted" / f"{body['id']}.fdsl", runtime="cpu")
    ref = Detector.fit(env.checkpoint, env.train[:2], runtime="cpu")
    assert [p.score for p in fitted.predict(env.bad)] == [p.score for p in ref.predict(env.bad)]
    assert fitted.image_threshold == pytest.approx(body["calibration"]["image"])
    assert client.get(body["download"]).content == (work / "fitted" / f"{body['id']}.fdsl").read_bytes()
    assert client.get("/api/fitted/..%2F..%2Fetc").status_code == 404
    assert client.post(f"/api/fitted/{body['id']}/use").json()["n_normal_images"] == 2
    assert client.get("/api/detector").json()["image_threshold"] == fitted.image_threshold
    assert client.post("/api/fit", files=_files(env.train[:1], "normal")).status_code == 400  # no validation set


def test_page_is_self_contained(env, tmp_path):
    html = _client(env, tmp_path / "work").get("/").text
    assert 'id="files"' in html and 'id="threshold"' in html and "/api/predict" in html
    for needle in ("http://", "https://", "//cdn", "<link "):
        assert needle not in html, needle


def test_serve_command_bad_input_is_one_line(tmp_path, capsys):
    from fdsl.cli import main

    assert main(["serve", "--detector", str(tmp_path / "missing.fdsl"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "missing.fdsl" in err[-1] and not any("Traceback" in e for e in err)
    assert main(["serve", "--detector", str(tmp_path / "x.fdsl"), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["serve", "--help"]) == 0 and "127.0.0.1" in capsys.readouterr().out


def test_cross_site_requests_and_foreign_hosts_are_refused(env, tmp_path):
    from fastapi.testclient import TestClient

    from fdsl.serve.app import create_app

    client = _client(env, tmp_path / "work")
    evil = client.post("/api/predict", files=_files(env.good[:1]), headers={"origin": "http://evil.example"})
    assert evil.status_code == 403 and "cross-site" in evil.json()["detail"]
    same = client.post("/api/predict", files=_files(env.good[:1]), headers={"origin": "http://testserver"})
    assert same.status_code == 200
    app = create_app(env.det, "part.fdsl", tmp_path / "work", runtime="cpu", allowed_hosts=["127.0.0.1:8000"])
    assert TestClient(app, base_url="http://127.0.0.1:8000").get("/api/detector").status_code == 200
    rebound = TestClient(app, base_url="http://attacker.example:8000").get("/api/detector")
    assert rebound.status_code == 403 and "Host" in rebound.json()["detail"]


def test_uploads_unlike_the_shots_carry_a_warning(env, tmp_path):
    gray, wide = io.BytesIO(), io.BytesIO()
    Image.open(env.good[0]).convert("L").save(gray, "PNG")
    Image.open(env.good[0]).resize((300, 100)).save(wide, "PNG")
    resp = _client(env, tmp_path / "work").post("/api/predict", files=[
        ("files", ("gray.png", gray.getvalue(), "image/png")), ("files", ("wide.png", wide.getvalue(), "image/png")),
        *_files(env.good[:1])])
    warnings = [r["input_warnings"] for r in resp.json()]
    assert "mode L" in warnings[0][0] and "aspect 3.00" in warnings[1][0] and warnings[2] == []


def test_exif_rotated_jpeg_scores_as_predict_does(env, tmp_path):
    """A camera JPEG with an EXIF orientation: predict applies it (load_rgb); the API does too, so the same
    upload gets predict's score, map and input warnings."""
    from fdsl.cli.inspection import predict_folder

    images = tmp_path / "incoming"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° when shown
    Image.open(env.bad[0]).convert("RGB").resize((120, 80)).save(images / "rot.jpg", exif=exif.tobytes())
    predict_folder(env.path, [images], tmp_path / "out", runtime="cpu")
    with (tmp_path / "out" / "scores.csv").open(newline="") as fh:
        row = next(csv.DictReader(fh))
    rec = _client(env, tmp_path / "work").post(
        "/api/predict", files=[("files", ("rot.jpg", (images / "rot.jpg").read_bytes(), "image/jpeg"))]).json()[0]
    for k in ("score", "map_max", "margin"):
        assert rec[k] == float(row[k]), k
    assert rec["defect_area_px"] == int(row["defect_area_px"])
    from fdsl.outputs.input_check import image_profile

    assert image_profile(images / "rot.jpg") == ("RGB", (80, 120))  # the size as shown, as the API sees it


def test_fit_from_uploads_records_its_own_shots(env):
    """A detector fitted in the web app says how its shots were chosen (all uploads), not the base's choice."""
    import copy

    from fdsl.serve.app import fit_from_images

    base = copy.copy(env.det)
    base.info = dict(env.det.info, shots={"selection": "coreset", "candidates": 9, "max_shots": 1})
    images = [Image.open(p).convert("RGB") for p in env.good]
    det = fit_from_images(base, images, [p.name for p in env.good], ["0" * 64] * len(images), ["RGB"] * len(images))
    assert det.info["shots"] == {"selection": "all", "candidates": len(images), "max_shots": None}
    assert len(det.info["normal_images"]) == len(images) and det.info["thresholds"] == {"image": None, "pixel": None}


def test_fitted_detector_is_used_with_the_served_weights(env, tmp_path):
    """`fdsl serve --pretrained moved.pt` (the weights no longer where the detector says): a detector fitted on
    the page is switched to with the same weights, not refused with a 500."""
    import copy
    import shutil

    from fastapi.testclient import TestClient

    from fdsl.inspect.detector import Detector
    from fdsl.serve.app import create_app

    moved = tmp_path / "moved.pt"
    shutil.copy(env.path.parent / "tiny_clip.pt", moved)
    det = copy.copy(env.det)
    det.info = copy.deepcopy(env.det.info)
    det.info["backbone"]["path"] = str(tmp_path / "gone" / "tiny_clip.pt")
    client = TestClient(create_app(det, "part.fdsl", tmp_path / "work", runtime="cpu", pretrained=str(moved)))
    body = client.post("/api/fit", files=_files(env.train[:2], "normal") + _files(env.good, "val_normal")
                       + _files(env.bad, "val_anomalous")).json()
    resp = client.post(f"/api/fitted/{body['id']}/use")
    assert resp.status_code == 200, resp.text
    fitted = Detector.load(tmp_path / "work" / "fitted" / f"{body['id']}.fdsl", runtime="cpu", pretrained=moved)
    assert client.get("/api/detector").json()["image_threshold"] == fitted.image_threshold


def test_serve_on_a_port_in_use_is_one_line(env, tmp_path, capsys):
    """Another program listens on the port: one line naming it and exit 2, before 'serving ...' is printed
    (uvicorn alone printed 'serving' and then its own ERROR line, exit 3)."""
    import socket

    from fdsl.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", "--detector", str(env.path), "--port", str(port), "--device", "cpu",
                     "--workdir", str(tmp_path / "work")])
    captured = capsys.readouterr()
    assert code == 2 and "serving" not in captured.out
    err = captured.err.strip().splitlines()
    assert err[-1].startswith("error: ") and f"--port {port}" in err[-1], err[-3:]
