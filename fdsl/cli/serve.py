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


def bound_address(host: str, port: int) -> str:
    """The address the server will listen on for `host` (resolved as the socket bind resolves it: ``127.1`` is
    127.0.0.1); refuses, with one line, a host/port it cannot listen on (in use, or not an address here)."""
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
    return str(addr[0])


def url_host(address: str) -> str:
    """An address as written in a URL or a Host header (IPv6 in brackets)."""
    return f"[{address}]" if ":" in address else address


def allowed_hosts(address: str, port: int) -> list[str] | None:
    """The Host headers a server bound to `address` answers: that address and ``localhost``, with the port,
    when it is a loopback address (against DNS rebinding); None (any) for an address open to the network."""
    if not is_loopback(address):
        return None
    return [f"{url_host(address)}:{port}", f"localhost:{port}"]


def main(argv: Sequence[str] | None = None) -> int:
    """Load the detector once, then serve until Ctrl-C; returns the exit status (2 on bad input)."""
    from fdsl.cli.jobs import run_command
    from fdsl.config import ServeConfig
    from fdsl.io import prepare_run_dir, setup_logging
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

        address = bound_address(cfg.host, cfg.port)
        if not is_loopback(address):
            log.warning("binding %s: the page and API are reachable from other machines, without a password",
                        cfg.host)
        prepare_run_dir(cfg.workdir, "--workdir")  # a file or a read-only folder: refused before loading
        det_path = Path(cfg.detector)
        if det_path.is_dir():  # a folder written by `fdsl export`: scored without PyTorch; the page cannot fit
            from fdsl.deploy import load_exported

            det = load_exported(det_path)
        else:
            det = Detector.load(det_path, runtime=cfg.runtime(), pretrained=cfg.pretrained)
        limits = Limits(max_files=cfg.max_files, max_file_bytes=int(cfg.max_file_mb * 2 ** 20),
                        max_request_pixels=int(cfg.max_request_mp * 1e6))
        app = create_app(det, det_path.name, cfg.workdir, limits, cfg.batch_size, cfg.runtime(),
                         allowed_hosts(address, cfg.port), pretrained=cfg.pretrained, max_fitted=cfg.max_fitted)
        bound_address(cfg.host, cfg.port)  # still free after loading
        print(f"serving {cfg.detector} on http://{url_host(address)}:{cfg.port}/ (Ctrl-C stops)", flush=True)
        uvicorn.run(app, host=address, port=cfg.port, workers=1, log_level="warning")

    return run_command(job, interrupted="stopped")
