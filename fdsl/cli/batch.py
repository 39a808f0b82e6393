"""`fdsl batch --detector DET --input IN --out OUT [--address ADDR] [--workers N] ...`: an archive on Ray Data.

    fdsl batch --detector part.fdsl --input /archive/line3 --out rescored/             # local Ray, 2 workers
    fdsl batch --detector exported/ --input list.csv --out rescored/ --address auto    # join a cluster

Needs the ray extra (pip install 'fdsl[ray]'). Bad input prints one line ``error: ...`` (exit 2); Ctrl-C exits
130 and a rerun with the same --out scores only what is missing. The work is `fdsl.batch.job.run_batch`.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

INTERRUPTED = "interrupted; finished blocks are kept, rerun the same command to score only what is missing"


def cmd_batch(cfg) -> dict:
    """Run `cfg` (a `BatchConfig`) and print where the table is."""
    from fdsl.errors import ConfigError

    try:
        import ray.data  # noqa: F401  (it sets up its loggers on import: quieted below)
    except ImportError:
        raise ConfigError("fdsl batch needs Ray Data: pip install 'fdsl[ray]'") from None
    from fdsl.batch.job import RESULTS, run_batch

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset notices; our progress line instead
    s = run_batch(cfg.detector, cfg.input, cfg.out, address=cfg.address, workers=cfg.workers,
                  batch_size=cfg.batch_size, device=cfg.device, gpus_per_worker=cfg.gpus_per_worker,
                  cpus_per_worker=cfg.cpus_per_worker, threshold=cfg.threshold, pretrained=cfg.pretrained,
                  masks=cfg.masks, overlays=cfg.overlays)
    rate = f", {s['images_per_second']:.2f} images/s" if s["images_per_second"] else ""
    print(f"batch: {cfg.out}/{RESULTS} ({s['n_inputs']} input(s): {s['n_scored']} scored, "
          f"{s['n_skipped_done']} already done, {s['n_errors']} error row(s), {s['n_anomalous']} anomalous"
          f"{rate}); summary: {cfg.out}/summary.json")
    return s


def main(argv: Sequence[str] | None = None) -> int:
    """`fdsl batch ...`; returns the exit status."""
    from fdsl.cli.jobs import run_command
    from fdsl.config import BatchConfig, parse_config
    from fdsl.io import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)

    def job() -> None:
        cfg = parse_config(BatchConfig, argv, __doc__.split("\n\n")[0], prog="fdsl batch")
        setup_logging(None)
        cmd_batch(cfg)

    return run_command(job, interrupted=INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
