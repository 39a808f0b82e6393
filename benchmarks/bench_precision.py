"""Precision × align precision × branch: time per image and drift against fp32 (docs/method.md §6b).

For each set (``tiny``: the demo's FDSL-Tiny-ViT geometry; ``vitl``: ViT-L-14-336 at 518 px, random
weights, 1 reference and 2 query images) and each winmode (``nan``: global branch only; ``mul``: global
+ LFE), every ``precision/align_precision`` setting is run through the library's runtime resolution and
compared with the fp32/fp32 pass on the same images and memory. See `precision_common` for the drift
measures. Times are `FDSL.predict` per image (backbone, alignment, head, upsampling), one pass.

    python -m benchmarks.bench_precision --sets tiny --json /tmp/prec_tiny.json
    python -m benchmarks.bench_precision --sets vitl --winmode nan mul --settings fp32/fp32 bf16/fp32 bf16/bf16
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks.precision_common import (
    DRIFT_HEADER,
    SETS,
    build_set,
    drift_line,
    load_model,
    near_ties,
    precision_rows,
)

ALL_SETTINGS = ["fp32/fp32", "bf16/fp32", "bf16/bf16", "fp16/fp32", "fp16/fp16", "fp32/fp16"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", nargs="+", default=["tiny"], choices=sorted(SETS))
    p.add_argument("--winmode", nargs="+", default=["nan", "mul"], choices=["nan", "mul", "onlywin"],
                   help="nan: global branch only; onlywin: window branch only; mul: both, blended")
    p.add_argument("--settings", nargs="+", default=ALL_SETTINGS,
                   help="precision/align_precision pairs; fp32/fp32 is always run first as the reference. "
                        "With winmode nan the align precision changes nothing, so only distinct precisions run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--work", default="/tmp/fdsl_bench_precision", help="folder for the sets (reused)")
    p.add_argument("--ties", action="store_true",
                   help="also print, per set, the share of fp32 global tokens whose top-2 similarities are within 2^-8")
    p.add_argument("--win_stride", type=int, default=0, help="override the sets' LFE window stride (0: keep)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    t0 = time.time()
    for key in args.sets:
        built = build_set(SETS[key], Path(args.work))
        if args.win_stride:  # the same data, weights and head; only the window geometry changes
            built = dataclasses.replace(built, spec=dataclasses.replace(built.spec, win_stride=args.win_stride))
        if args.ties:
            ties = near_ties(load_model(built, "nan", device), built, device)
            print(f"near-ties ({key}, global, per layer, top-1 − top-2 similarity < 2^-8): "
                  + " / ".join(f"{100 * t:.1f}%" for t in ties), flush=True)
        for winmode in args.winmode:
            model = load_model(built, winmode, device)
            for row in precision_rows(model, built, winmode, args.settings, device, args.batch):
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print(DRIFT_HEADER)
    for r in rows:
        print(drift_line(r))
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor(),
            "wall_s": time.time() - t0}
    print(f"\n{info}")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
