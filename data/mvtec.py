"""Write ``meta.json`` for an MVTec AD tree.

Usage: ``python data/mvtec.py --root DIR [--classes bottle cable ...]``
(default root: ``$MVTEC_ROOT`` or ``data/mvtec`` in the repository).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from fdsl.errors import DataError  # noqa: E402
from fdsl.meta import build_mvtec_meta, meta_summary, write_meta  # noqa: E402

logger = logging.getLogger("data.mvtec")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="Index an MVTec AD tree into <root>/meta.json.")
    parser.add_argument(
        "--root", type=Path, default=Path(os.environ.get("MVTEC_ROOT", REPO_ROOT / "data" / "mvtec")),
        help="dataset root (default: $MVTEC_ROOT or data/mvtec)",
    )
    parser.add_argument(
        "--classes", nargs="+", default=None, metavar="CLS",
        help="class folders to index (default: every MVTec-layout folder under --root)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build and write the meta; return the process exit code (2 on a data error)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        meta = build_mvtec_meta(args.root, args.classes)
        path = write_meta(args.root, meta)
    except DataError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    for cls, n in meta_summary(meta).items():
        logger.info("%s: train=%d test=%d anomalous=%d", cls, n["train"], n["test"], n["anomalous"])
    logger.info("wrote %s (%d classes)", path, len(meta["test"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
