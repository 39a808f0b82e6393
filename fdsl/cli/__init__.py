"""The one command-line dispatcher: `fdsl <command>` / `python -m fdsl <command>`."""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

_USAGE = """usage: fdsl {train,test,demo,fit,predict,calibrate,serve,export,batch,doctor} [options]

  train      train the scorers and NAM on a dataset's test split (as train.py)
  test       k-shot evaluation of a checkpoint, per class (as test.py)
  demo       synthetic end-to-end demo (as python -m fdsl.cli.demo)
  fit        a detector file from a checkpoint and a folder of good parts
  predict    score images with a detector file: scores.csv, overlays, masks
  calibrate  set a detector's image and pixel thresholds from validation folders
  serve      a local web page and JSON API around a detector (needs the serve extra)
  export     a detector as one OpenVINO or ONNX graph, run without PyTorch by `python -m fdsl.deploy`
  batch      score an archive on Ray Data (local or a cluster) into Parquet, exactly once (needs the ray extra)
  doctor     what is installed: the torch build (CPU or CUDA) and how to switch, each extra's missing pins

`fdsl <command> --help` lists a command's options."""


def _commands() -> dict[str, Callable[[list[str]], int]]:
    from fdsl.cli import batch, demo, doctor, export, inspection, jobs

    def inspect(cmd: str) -> Callable[[list[str]], int]:
        return lambda rest: inspection.main([cmd, *rest])

    def serve(rest: list[str]) -> int:
        from fdsl.cli.serve import main as serve_main

        return serve_main(rest)

    return {"train": jobs.train_main, "test": jobs.test_main, "demo": demo.main,
            **{cmd: inspect(cmd) for cmd in ("fit", "predict", "calibrate")}, "serve": serve, "export": export.main,
            "batch": batch.main, "doctor": doctor.main}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch `argv[0]` to its sub-command; returns its exit status (2 for an unknown command)."""
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

