#!/usr/bin/env python
"""Peak memory of one `fdsl serve` request (POST /api/predict through the app, in-process), per worst case.

Each case runs in a fresh child process: the detector is loaded and the request body built first, then the
peak RSS is reset (/proc/self/clear_refs) and the request sent; the figure is the peak (VmHWM) minus the RSS
just before. Cases, at the default limits (50 MP per image, 20 MiB per file, 64 files, 100 MP per request):

* ``flat8_7000``: eight 7000x7000 single-colour PNGs (1.3 MB on the wire): refused (413, pixel budget).
* ``flat2_7000``: two 7000x7000 single-colour PNGs: 98 MP, the most pixels a request may hold.
* ``noise15_2560``: fifteen 2560x2560 noise PNGs (~19.7 MB each, incompressible): 98 MP whose overlays do
  not compress either, so the answer (base64 PNGs in JSON) is the largest.
* ``parallel4_flat2``: four ``flat2_7000`` requests at once (decoding waits for the scoring lock).

The detector is the tests' tiny calibrated one (112 px, global branch); what a request costs beyond the
model (decoding, the full-size map, mask and overlay, the PNGs and the JSON) does not depend on the model.

    python -m benchmarks.bench_serve_memory [--cases flat2_7000 ...] [--json out.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

CASES = ("flat8_7000", "flat2_7000", "noise15_2560", "parallel4_flat2")


def _status(key: str) -> int:
    """A /proc/self/status value in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _png(w: int, h: int, noise: bool, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    if noise:
        arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(buf, "PNG", compress_level=1)
    else:
        Image.new("RGB", (w, h), (120, 90, 60 + seed)).save(buf, "PNG")
    return buf.getvalue()


def child(case: str, detector: str) -> dict:
    """Run one case in this (fresh) process; returns its figures."""
    import time

    from fastapi.testclient import TestClient

    from fdsl.inspect.detector import Detector
    from fdsl.serve.app import create_app

    det = Detector.load(detector, runtime="cpu")
    with tempfile.TemporaryDirectory() as work:
        client = TestClient(create_app(det, "part.fdsl", work, runtime="cpu"))
        warm = client.post("/api/predict", files=[("files", ("w.png", _png(64, 64, False, 0), "image/png"))])
        assert warm.status_code == 200, warm.text
        if case.startswith("flat8"):
            bodies = [[(f"{i}.png", _png(7000, 7000, False, i)) for i in range(8)]]
        elif case.startswith("noise15"):
            bodies = [[(f"{i}.png", _png(2560, 2560, True, i)) for i in range(15)]]
        else:
            flat = [(f"{i}.png", _png(7000, 7000, False, i)) for i in range(2)]
            bodies = [flat] * (4 if case.startswith("parallel") else 1)
        wire = sum(len(b) for _, b in bodies[0])
        answers: list = []

        def send(files):
            r = client.post("/api/predict", files=[("files", (n, b, "image/png")) for n, b in files])
            answers.append((r.status_code, len(r.content)))

        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = _status("VmRSS")
        t0 = time.perf_counter()
        threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        peak = _status("VmHWM")
    return {"case": case, "status": sorted({a[0] for a in answers}), "requests": len(bodies),
            "wire_mb": round(wire / 1e6, 1), "answer_mb": round(max(a[1] for a in answers) / 1e6, 1),
            "rss_before_mb": round(before / 2 ** 20), "peak_rise_mb": round((peak - before) / 2 ** 20),
            "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=2, metavar=("CASE", "DETECTOR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(*args.child)), flush=True)
        return 0
    root = Path(__file__).resolve().parents[1]
    # the tests' small calibrated detector, loaded from its file (the benchmarks do not edit the import path)
    spec = importlib.util.spec_from_file_location("fdsl_test_utils", root / "tests" / "fdsl_test_utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    make_calibrated_detector = utils.make_calibrated_detector

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = make_calibrated_detector(Path(tmp), winmode="nan")
        for case in args.cases:
            r = subprocess.run([sys.executable, "-m", "benchmarks.bench_serve_memory", "--child", case, str(env.path)],
                               capture_output=True, text=True, cwd=root)
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
            row = json.loads(line[7:]) if line else {"case": case, "error": r.stderr.strip().splitlines()[-1:]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
