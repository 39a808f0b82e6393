"""`python -m fdsl <command>`: see `fdsl.cli`."""
import sys

from fdsl.cli import main

if __name__ == "__main__":
    sys.exit(main())
