"""`python -m fdsl <command>` (the `fdsl` console script): train, test, demo, fit, predict, calibrate.

    python -m fdsl train ...        # train.py
    python -m fdsl test ...         # test.py
    python -m fdsl demo ...         # the end-to-end demo
    python -m fdsl fit | predict | calibrate ...   # inspection of one's own parts (fdsl.inspect_cli)
"""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence

COMMANDS = ("train", "test", "demo", "fit", "predict", "calibrate")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Dispatch to a sub-command; returns its exit status (2 for an unknown command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        return _dispatch(argv[0], argv[1:])
    except SystemExit as exc:  # argparse's --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)


def _dispatch(cmd: str, rest: List[str]) -> int:
    argv = [cmd, *rest]
    if cmd in ("fit", "predict", "calibrate"):
        from .inspect_cli import main as inspect_main

        return inspect_main(argv)
    if cmd == "train":
        from .cli import main as cli_main
        from .config import TrainConfig
        from .training import train

        return cli_main(TrainConfig, train, rest)
    if cmd == "test":
        from .cli import main as cli_main
        from .config import TestConfig
        from .evaluation import evaluate

        return cli_main(TestConfig, evaluate, rest)
    if cmd == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    print(f"error: unknown command {cmd!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
