"""`fdsl serve --detector part.fdsl [--host 127.0.0.1 --port 8000 --device cpu]`: the local inspection web app.

Options: `fdsl.config.ServeConfig` (docs/options.md). Bad input prints one line ``error: ...`` and exits 2.
"""
from __future__ import annotations

import ipaddress
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fdsl.errors import ConfigError

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port(host: str, port: int) -> None:
    """Refuse, with one line, a host/port the server cannot listen on (in use, or not an address here)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(addr)
    except OSError as exc:
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); is another "
                          "server using it? choose another --port (or --host)") from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Load the detector once, then serve until Ctrl-C; returns the exit status (2 on bad input)."""
    from fdsl.cli.jobs import run_command
    from fdsl.config import ServeConfig
    from fdsl.io import setup_logging
    from fdsl.options import parse_config

    argv = list(sys.argv[1:] if argv is None else argv)

    def job() -> None:
        cfg = parse_config(ServeConfig, argv, prog="fdsl serve")
        setup_logging(None)
        from fdsl.cli.inspection import with_preset_weights

        with_preset_weights(cfg)
        try:
            import uvicorn

            from fdsl.serve.app import create_app
        except ImportError as exc:
            raise ConfigError(f"`fdsl serve` needs the serve extra ({exc.name} is missing): "
                              "pip install -e \".[serve]\"") from exc
        from fdsl.inspect.detector import Detector
        from fdsl.serve.uploads import Limits

        if not is_loopback(cfg.host):
            log.warning("binding %s: the page and API are reachable from other machines, without a password",
                        cfg.host)
        det = Detector.load(cfg.detector, runtime=cfg.runtime(), pretrained=cfg.pretrained)
        limits = Limits(max_files=cfg.max_files, max_file_bytes=int(cfg.max_file_mb * 2 ** 20))
        hosts = ([f"{h}:{cfg.port}" for h in ("127.0.0.1", "localhost", "[::1]")] if is_loopback(cfg.host)
                 else None)  # loopback: refuse other Host headers (DNS rebinding)
        _check_port(cfg.host, cfg.port)
        app = create_app(det, Path(cfg.detector).name, cfg.workdir, limits, cfg.batch_size, cfg.runtime(), hosts,
                         pretrained=cfg.pretrained)
        print(f"serving {cfg.detector} on http://{cfg.host}:{cfg.port}/ (Ctrl-C stops)", flush=True)
        uvicorn.run(app, host=cfg.host, port=cfg.port, workers=1, log_level="warning")

    return run_command(job, interrupted="stopped")
