"""`python data/mvtec.py` / `python data/visa.py`: index a dataset tree into ``<root>/meta.json``."""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from fdsl.config import IndexConfig, parse_config
from fdsl.data.indexers import build_mvtec_meta, build_visa_meta, meta_summary, write_meta
from fdsl.errors import DataError

log = logging.getLogger(__name__)

# layout: (environment variable of the default root, meta builder, what is indexed)
LAYOUTS = {
    "mvtec": ("MVTEC_ROOT", build_mvtec_meta, "an MVTec AD tree (<cls>/train, <cls>/test, <cls>/ground_truth)"),
    "visa": ("VISA_ROOT", build_visa_meta, "a VisA tree (split_csv/1cls.csv)"),
}


def index_main(layout: str, argv: Sequence[str] | None = None) -> int:
    """Build and write ``meta.json`` for `layout` (``mvtec`` or ``visa``); returns the exit status.

    A data error, or a root that cannot be read or written, is one line and exit status 2 (`run_command`).
    """
    from fdsl.cli.jobs import run_command

    env, build, what = LAYOUTS[layout]

    def job() -> None:
        cfg = parse_config(IndexConfig, argv, f"Index {what} into <root>/meta.json.", prog=f"data/{layout}.py")
        root = Path(cfg.root or os.environ.get(env) or Path(__file__).resolve().parents[2] / "data" / layout)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            meta = build(root, cfg.classes)
            path = write_meta(root, meta)
        except OSError as err:  # e.g. a read-only root: meta.json cannot be written
            where = err.filename or root
            raise DataError(f"cannot read or write {where} under --root {root} ({err.strerror or err}); "
                            "check the folder's permissions or pass another --root") from err
        for cls, n in meta_summary(meta).items():
            log.info("%s: train=%d test=%d anomalous=%d", cls, n["train"], n["test"], n["anomalous"])
        log.info("wrote %s (%d classes)", path, len(meta["test"]))

    return run_command(job)
