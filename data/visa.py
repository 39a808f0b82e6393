"""Write ``meta.json`` for a VisA tree.

Usage: ``python data/visa.py --root DIR [--classes candle pcb1 ...]``
(default root: ``$VISA_ROOT`` or ``data/visa`` in the repository).
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
from fdsl.meta import build_visa_meta, meta_summary, write_meta  # noqa: E402

logger = logging.getLogger("data.visa")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="Index a VisA tree (split_csv/1cls.csv) into <root>/meta.json.")
    parser.add_argument(
        "--root", type=Path, default=Path(os.environ.get("VISA_ROOT", REPO_ROOT / "data" / "visa")),
        help="dataset root (default: $VISA_ROOT or data/visa)",
    )
    parser.add_argument(
        "--classes", nargs="+", default=None, metavar="CLS",
        help="objects to index (default: every object in the csv)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build and write the meta; return the process exit code (2 on a data error)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        meta = build_visa_meta(args.root, args.classes)
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
