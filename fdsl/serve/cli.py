"""`fdsl serve --detector part.fdsl [--host 127.0.0.1 --port 8000 --device cpu]`: the local inspection web app."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from fdsl.config import PRECISIONS
from fdsl.errors import ConfigError, FDSLError

log = logging.getLogger("fdsl.serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fdsl serve", allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Serve a detector as a local web page and JSON API (FastAPI + uvicorn).")
    p.add_argument("--detector", required=True, help="detector file written by `fit` (and `calibrate`)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; anything but a loopback address exposes the page to the network")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--device", default="auto", help="cpu, a CUDA index (0), cuda:N, or auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="autocast dtype (auto: fp32)")
    p.add_argument("--batch_size", type=int, default=8, help="images per batch")
    p.add_argument("--pretrained", default=None, help="the backbone weights file, when it moved since `fit`")
    p.add_argument("--workdir", default="fdsl_serve",
                   help="the only folder the server writes to (detectors fitted on the page, scratch)")
    p.add_argument("--max_files", type=int, default=64, help="images per request")
    p.add_argument("--max_file_mb", type=float, default=20.0, help="megabytes per uploaded file")
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Load the detector once, then serve until Ctrl-C; returns the exit status (2 on bad input)."""
    from fdsl.io import setup_logging

    args = build_parser().parse_args(list(argv) if argv is not None else None)
    setup_logging(None)
    try:
        try:
            import uvicorn

            from fdsl.serve.app import create_app
        except ImportError as exc:
            raise ConfigError(f"`fdsl serve` needs the serve extra ({exc.name} is missing): "
                              "pip install -e \".[serve]\"") from exc
        from fdsl.inspect.detector import Detector
        from fdsl.serve.uploads import Limits

        if not 0 < args.port < 65536:
            raise ConfigError(f"--port must lie in 1..65535, got {args.port}")
        if args.max_files < 1 or args.max_file_mb <= 0 or args.batch_size < 1:
            raise ConfigError("--max_files, --max_file_mb and --batch_size must be positive")
        if not _is_loopback(args.host):
            log.warning("binding %s: the page and API are reachable from other machines, without a password",
                        args.host)
        det = Detector.load(args.detector, device=args.device, precision=args.precision,
                            pretrained=args.pretrained)
        limits = Limits(max_files=args.max_files, max_file_bytes=int(args.max_file_mb * 2 ** 20))
        app = create_app(det, Path(args.detector).name, args.workdir, limits, args.batch_size, args.device,
                         args.precision)
    except FDSLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"serving {args.detector} on http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, workers=1, log_level="warning")
    return 0


def entry(rest: List[str]) -> int:
    """The `fdsl serve` dispatcher entry."""
    return main(rest)
