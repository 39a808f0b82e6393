"""What the benchmark scripts share: one child-process runner, one result convention, process probes.

Every configuration a script measures runs in a fresh child process (the script itself, run as
``python -m benchmarks.<script> --child '<spec json>'``), so that peak-memory figures do not mix.

Result convention: a child returns one JSON object, printed on a single stdout line that starts with
`MARK`. Its ``status`` is ``ok``, ``skipped`` (with a ``reason``) or ``error`` (with a ``reason``);
the parent adds ``timeout`` for a child that ran past its limit, ``stderr_tail`` for failed
children and ``wall_s`` for all of them.

The scripts form the package ``benchmarks``, run from the repository root (``python -m
benchmarks.bench_eval``); they import each other as ``benchmarks.<module>`` and never edit ``sys.path``.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MARK = "@@BENCH_RESULT@@ "
MiB = 2 ** 20
Result = dict[str, Any]


# ----------------------------------------------------------------------------- child processes
def child_main(argv: list[str], run: Callable[[Result], Result]) -> int | None:
    """Serve a ``--child SPEC`` invocation: run `run(spec)` and print its result on the marked line.

    Returns the exit code when `argv` is a child invocation, None otherwise (the caller goes on as
    the parent). An exception becomes a ``status: error`` result with its traceback on stderr.
    """
    if not argv or argv[0] != "--child":
        return None
    spec = json.loads(argv[1])
    try:
        res = run(spec)
    except Exception as exc:  # noqa: BLE001 -- reported to the parent, which prints it
        traceback.print_exc()
        res = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(MARK + json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0


def spawn(module: str, spec: Result, timeout: float, verbose: bool = False) -> Result:
    """Run `module` (``benchmarks.<script>``) as a child on `spec`; returns its result (see the module docstring)."""
    cmd = [sys.executable, "-m", module, "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if verbose else subprocess.PIPE,
                              text=True, timeout=timeout, cwd=str(ROOT), check=False)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"child ran past {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    res = None
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            res = json.loads(line[len(MARK):])
    stderr = proc.stderr or ""
    if res is None:
        res = {"status": "error", "reason": f"child exited {proc.returncode} without a result"}
    if res.get("status") == "error" and stderr:
        res["stderr_tail"] = stderr[-2000:]
    res["wall_s"] = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------- process probes (Linux /proc)
def _status_kb(field: str) -> int | None:
    """A ``kB`` field (VmRSS, VmHWM) of /proc/self/status, or None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    """Current resident memory of this process, MiB."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024.0


def hwm_mb() -> float | None:
    """Peak resident memory of this process since the last `reset_hwm`, MiB."""
    kb = _status_kb("VmHWM")
    return None if kb is None else kb / 1024.0


def reset_hwm() -> bool:
    """Reset this process's peak-RSS counter (VmHWM) to the current RSS; False when unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def maxrss_mb() -> float:
    """Whole-process peak RSS (ru_maxrss; kB on Linux, bytes on macOS), MiB."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


def _meminfo_mb(field: str) -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def mem_available_mb() -> float | None:
    return _meminfo_mb("MemAvailable")


def cpu_model() -> str:
    """The processor's model name."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(threads: int, device: str) -> Result:
    """Machine and library facts printed at the top of every benchmark."""
    import torch

    total = _meminfo_mb("MemTotal")
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "host": platform.node(),
            "python": platform.python_version(), "torch": torch.__version__, "open_clip": _version("open_clip"),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": threads, "device": device,
            "mem_total_gb": None if total is None else round(total / 1024, 1), "load_start": loadavg()}


def print_environment(env: Result) -> None:
    print(f"# {env['date']}  {env['cpu']} ({env['cpu_count']} CPUs, {env['threads']} threads, "
          f"{env['mem_total_gb']} GB RAM), device {env['device']}")
    print(f"# torch {env['torch']}, open_clip {env['open_clip']}, python {env['python']}; "
          f"load average at start {env['load_start']}", flush=True)


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except (ImportError, AttributeError):
        return None


# ----------------------------------------------------------------------------- machine throughput
def gemm_gflops(dtype_name: str, reps: int = 3, m: int = 1024, k: int = 1024, n: int = 2048) -> float:
    """GFLOP/s of a large (m×k)·(k×n) matrix product in `dtype_name` on the CPU, now (best of `reps`).

    The FLOP floors of the benchmarks divide by this: a part running near it cannot get much faster
    without doing fewer FLOPs.
    """
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    a, b = torch.randn(m, k).to(dt), torch.randn(k, n).to(dt)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best / 1e9


# ----------------------------------------------------------------------------- output
def fmt(x: Any, nd: int = 2) -> str:
    """A table cell: '-' for None, fixed decimals with thousands separators for floats."""
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return str(x)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, columns right-aligned to their widest cell."""
    w = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w[i]) for i, c in enumerate(cells)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in rows])


def write_json(path: str | None, payload: Result) -> None:
    """Write all figures to `path` (when given)."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1)
        fh.write("\n")
    print(f"# wrote {path}")
