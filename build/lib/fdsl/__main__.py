"""`fdsl` / `python -m fdsl`: one command with sub-commands (train, test, demo)."""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional

_USAGE = """usage: fdsl {train,test,demo} [options]

  train   train the scorers and NAM on a dataset's test split (as train.py)
  test    k-shot evaluation of a checkpoint, per class (as test.py)
  demo    synthetic end-to-end demo (as python -m fdsl.demo)

`fdsl <command> --help` lists a command's options."""


def _commands() -> Dict[str, Callable[[Optional[List[str]]], int]]:
    from . import cli, demo

    return {"train": cli.train_main, "test": cli.test_main, "demo": demo.main}


def main(argv: Optional[List[str]] = None) -> int:
    """Dispatch `argv[0]` to its sub-command; usage on -h, and status 2 for an unknown command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if argv else 2
    commands = _commands()
    if argv[0] not in commands:
        print(f"error: unknown command {argv[0]!r}; choose one of {', '.join(commands)}\n\n{_USAGE}",
              file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
