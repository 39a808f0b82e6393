"""Write ``meta.json`` for a VisA tree.

Usage: ``python data/visa.py --root DIR [--classes candle pcb1 ...]``
(default root: ``$VISA_ROOT`` or ``data/visa`` in the repository).
"""
import sys

from fdsl.cli.indexing import index_main


def main(argv=None) -> int:
    return index_main("visa", argv)


if __name__ == "__main__":
    sys.exit(main())
