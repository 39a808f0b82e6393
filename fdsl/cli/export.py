"""`fdsl export --detector part.fdsl --format openvino|onnx --out DIR [--precision fp16]`.

Writes one graph (preprocessed images -> anomaly map and score; banks inside) and its contract JSON; see
`fdsl.inspect.export`. `python -m fdsl.deploy --model DIR ...` or `fdsl predict --detector DIR ...` run it.
Bad input prints one line ``error: ...`` and exits with status 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from fdsl.errors import FDSLError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fdsl export", allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Export a fitted detector to OpenVINO or ONNX (run without PyTorch).")
    p.add_argument("--detector", required=True, help="detector file written by `fdsl fit` (calibrate it first "
                                                     "for verdicts and masks)")
    p.add_argument("--format", default="openvino", choices=("openvino", "onnx"),
                   help="openvino (model.xml + model.bin) or onnx (model.onnx)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"),
                   help="fp16: OpenVINO weights stored in fp16 (compute stays fp32 on the CPU); ONNX is fp32")
    p.add_argument("--pretrained", default=None,
                   help="the backbone weights file, when it moved since `fit` (its sha256 is checked)")
    p.add_argument("--chunk_mb", type=int, default=64,
                   help="bound per image, in MiB, on each similarity block of the graph's nearest-normal search")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the export; 0 on success, 2 on bad input."""
    from fdsl.io import setup_logging

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    setup_logging(None)
    try:
        from fdsl.errors import ConfigError
        from fdsl.inspect.detector import Detector
        from fdsl.inspect.export import export_detector

        if args.chunk_mb < 1:
            raise ConfigError(f"--chunk_mb must be positive, got {args.chunk_mb}")
        det = Detector.load(args.detector, device="cpu", precision="fp32", pretrained=args.pretrained)
        out = export_detector(det, args.out, args.format, args.precision, args.chunk_mb)
    except FDSLError as exc:
        logging.getLogger("fdsl").debug("error details", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"exported: {out} ({args.format}, {args.precision}); run it with "
          f"`python -m fdsl.deploy --model {out} --images IN --out OUT`")
    return 0
