"""Write ``meta.json`` for an MVTec AD tree.

Usage: ``python data/mvtec.py --root DIR [--classes bottle cable ...]``
(default root: ``$MVTEC_ROOT`` or ``data/mvtec`` in the repository).
"""
import sys

from fdsl.cli.indexing import index_main


def main(argv=None) -> int:
    return index_main("mvtec", argv)


if __name__ == "__main__":
    sys.exit(main())
