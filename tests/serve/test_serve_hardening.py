"""`fdsl serve` under a careful and a hostile user (issue 28): a per-request pixel budget, decoding in bounded
batches under the scoring lock, the Host allow-list from the bound address, the work folder checked at start,
an exported folder served, and the page-fitted detectors bounded across restarts."""
from __future__ import annotations

import io
import os
import threading
import time

import pytest
from fdsl_test_utils import make_calibrated_detector
from PIL import Image

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_calibrated_detector(tmp_path_factory.mktemp("serve_hard"), winmode="nan")


def _client(env, workdir, det=None, **kw):
    from fastapi.testclient import TestClient

    from fdsl.serve.app import create_app

    return TestClient(create_app(det or env.det, env.path.name, workdir, runtime="cpu", **kw))


def _png(w: int, h: int, colour=(90, 120, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, "PNG")
    return buf.getvalue()


def test_per_request_pixel_budget_is_a_413_naming_it(env, tmp_path):
    from fdsl.serve.uploads import Limits

    client = _client(env, tmp_path / "w", limits=Limits(max_request_pixels=100_000))
    files = [("files", (f"{i}.png", _png(200, 200), "image/png")) for i in range(3)]  # 120 000 px in all
    resp = client.post("/api/predict", files=files)
    assert resp.status_code == 413, resp.text
    assert "per-request pixel budget" in resp.json()["detail"] and "--max_request_mp" in resp.json()["detail"]
    fit = client.post("/api/fit", files=[("normal", f[1]) for f in files[:2]] + [("val_normal", files[2][1])]
                      + [("val_anomalous", files[0][1])])
    assert fit.status_code == 413 and "pixel budget" in fit.json()["detail"]
    assert client.post("/api/predict", files=files[:2]).status_code == 200  # 80 000 px: within it


def test_decoding_is_batched_under_the_scoring_lock_even_in_parallel(env, tmp_path, monkeypatch):
    """Each scoring batch holds at most `batch_pixels` pixels (or one larger image); every decode happens with
    the scoring lock held, so parallel requests hold one batch of decoded images at a time."""
    import fdsl.serve.app as app_mod
    from fdsl.serve.uploads import Limits

    client = _client(env, tmp_path / "w", limits=Limits(batch_pixels=50_000), batch_size=8)
    service = client.app.state.service
    real_decode, real_score = app_mod.decode_image, type(env.det).score_images
    state = {"unlocked": 0, "live": 0, "peak": 0, "batches": []}
    guard = threading.Lock()

    def decode(*a, **k):
        if not service.lock.locked():
            state["unlocked"] += 1
        with guard:
            state["live"] += 1
            state["peak"] = max(state["peak"], state["live"])
        time.sleep(0.01)  # gives a parallel request the chance to decode at the same time, were it allowed
        return real_decode(*a, **k)

    def score(self, images, *a, **k):
        state["batches"].append(sum(im.size[0] * im.size[1] for im in images))
        with guard:
            state["live"] -= len(images)
        return real_score(self, images, *a, **k)

    monkeypatch.setattr(app_mod, "decode_image", decode)
    monkeypatch.setattr(type(env.det), "score_images", score)
    sizes = [(150, 150), (150, 150), (300, 300), (100, 100), (100, 100), (100, 100)]  # 22.5k 22.5k 90k 10k 10k 10k
    files = [("files", (f"{i}.png", _png(w, h), "image/png")) for i, (w, h) in enumerate(sizes)]
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(client.post("/api/predict", files=files)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in answers] == [200] * 3
    assert all([x["name"] for x in r.json()] == [f"{i}.png" for i in range(6)] for r in answers)
    assert state["unlocked"] == 0, "an image was decoded outside the scoring lock"
    assert state["peak"] <= 3  # one batch at a time (at most the three 100 px images), not 6 per request
    assert state["batches"] == [45_000, 90_000, 30_000] * 3  # the 300 px image alone: it exceeds the bound


def test_host_allow_list_comes_from_the_bound_address(env, tmp_path, monkeypatch):
    """`--host 127.1` binds 127.0.0.1 and guards it (a foreign Host is refused); `--host 127.0.0.2` answers its
    own URL. The app `fdsl serve` builds is captured where uvicorn would run it."""
    import socket

    import uvicorn
    from fastapi.testclient import TestClient

    from fdsl.cli import main

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **k: served.update(app=app, host=host, port=port))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for host, address in (("127.1", "127.0.0.1"), ("127.0.0.2", "127.0.0.2")):
        assert main(["serve", "--detector", str(env.path), "--host", host, "--port", str(port), "--device", "cpu",
                     "--workdir", str(tmp_path / "w")]) == 0
        assert served["host"] == address
        own = TestClient(served["app"], base_url=f"http://{address}:{port}")
        assert own.get("/api/detector").status_code == 200
        assert TestClient(served["app"], base_url=f"http://localhost:{port}").get("/api/detector").status_code == 200
        foreign = TestClient(served["app"], base_url=f"http://attacker.example:{port}")
        assert foreign.get("/api/detector").status_code == 403
        evil = own.get("/api/detector", headers={"host": f"attacker.example:{port}", "origin": "http://attacker.example"})
        assert evil.status_code == 403


def test_workdir_naming_a_file_is_refused_at_start(env, tmp_path, capsys, monkeypatch):
    from fdsl.cli import main
    from fdsl.inspect.detector import Detector

    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(Detector, "load", lambda *a, **k: pytest.fail("loaded before checking --workdir"))
    for workdir in (tmp_path / "file", tmp_path / "file" / "below"):
        assert main(["serve", "--detector", str(env.path), "--workdir", str(workdir), "--port", "8765"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: --workdir") and str(workdir) in err[-1]
        assert not any("Traceback" in e for e in err)


def test_fitted_detectors_are_bounded_and_found_again_after_a_restart(env, tmp_path):
    fitted = tmp_path / "w" / "fitted"
    fitted.mkdir(parents=True)
    for i, fid in enumerate(("a" * 16, "b" * 16, "c" * 16)):  # three earlier page fits, oldest first
        (fitted / f"{fid}.fdsl").write_bytes(env.path.read_bytes())
        os.utime(fitted / f"{fid}.fdsl", (1_000_000 + i, 1_000_000 + i))
    (fitted / "notes.txt").write_text("not ours")
    client = _client(env, tmp_path / "w", max_fitted=2)  # a restart with --max_fitted 2
    assert sorted(p.name for p in fitted.iterdir()) == ["b" * 16 + ".fdsl", "c" * 16 + ".fdsl", "notes.txt"]
    assert client.get(f"/api/fitted/{'c' * 16}").status_code == 200  # known again after the restart
    assert client.post(f"/api/fitted/{'b' * 16}/use").status_code == 200  # in use: kept while it is
    files = lambda ps, field: [(field, (p.name, p.read_bytes(), "image/png")) for p in ps]  # noqa: E731
    body = client.post("/api/fit", files=files(env.train[:2], "normal") + files(env.good, "val_normal")
                       + files(env.bad, "val_anomalous")).json()
    assert "2 newest" in body["kept"]
    assert sorted(p.stem for p in fitted.glob("*.fdsl")) == sorted(["b" * 16, body["id"]])
    assert client.get(f"/api/fitted/{'c' * 16}").status_code == 404
