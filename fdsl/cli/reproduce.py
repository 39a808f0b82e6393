"""`python -m fdsl.cli.reproduce table | plan`: the command of `fdsl.engine.paper` (used by ``reproduce.sh``).

    python -m fdsl.cli.reproduce table --mvtec RESULTS/mvtec --visa RESULTS/visa --out RESULTS/paper_table
    python -m fdsl.cli.reproduce plan --mvtec_root D1 --visa_root D2 --seeds 10 11 12 13 14 --winmode mul

``table`` writes our protocol summaries beside the paper's table; ``plan`` counts the images and estimates
every step's time. ``plan`` imports no torch (it runs before any install).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fdsl.engine.paper import RATE_GFLOPS, plan_lines, write_table


def main(argv: Sequence[str] | None = None) -> int:
    """``table`` or ``plan`` (see the module docstring); bad input exits 2 with one line."""
    from fdsl.errors import FDSLError, user_message

    parser = argparse.ArgumentParser(prog="python -m fdsl.cli.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="our protocol summaries beside the paper's table")
    t.add_argument("--mvtec", help="protocol run folder on MVTec AD (holding summary.json)")
    t.add_argument("--visa", help="protocol run folder on VisA (holding summary.json)")
    t.add_argument("--out", required=True, help="output path without suffix: writes .md, .csv, .json")
    p = sub.add_parser("plan", help="image counts and the time estimate of a reproduction")
    p.add_argument("--mvtec_root", required=True)
    p.add_argument("--visa_root", required=True)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12, 13, 14])
    p.add_argument("--winmode", default="mul")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--cpu_gflops", type=float, default=RATE_GFLOPS["cpu"], help="sustained fp32 GFLOP/s of the CPU")
    p.add_argument("--gpu_tflops", type=float, default=RATE_GFLOPS["cuda"] / 1000,
                   help="sustained fp32 TFLOP/s of the GPU")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "table":
            runs = {ds: Path(p) for ds, p in (("mvtec", args.mvtec), ("visa", args.visa)) if p}
            if not runs:
                raise FDSLError("give --mvtec and/or --visa: protocol run folders holding summary.json")
            print(write_table(runs, Path(args.out)))
        else:
            roots = {"mvtec": Path(args.mvtec_root), "visa": Path(args.visa_root)}
            if not (args.cpu_gflops > 0 and args.gpu_tflops > 0):
                raise FDSLError(f"--cpu_gflops {args.cpu_gflops} and --gpu_tflops {args.gpu_tflops} must be > 0")
            rates = {"cpu": args.cpu_gflops, "cuda": args.gpu_tflops * 1000}
            print("\n".join(plan_lines(roots, args.shots, args.seeds, args.winmode, args.epochs, rates)))
    except FDSLError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
