"""torchrun worker: test.py whose rank 1 gets one more option (`--batch_size 3`), as a mistyped launch would."""
import os
import sys

from fdsl.cli.jobs import test_main

if __name__ == "__main__":
    argv = sys.argv[1:] + (["--batch_size", "3"] if os.environ.get("RANK") == "1" else [])
    sys.exit(test_main(argv))
