"""The package itself: declared dependencies, console scripts, and the `fdsl` dispatcher."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines) -> dict:
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if m := re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line):
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def test_pyproject_dependencies_match_requirements_txt() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _pins(project["dependencies"])
    assert declared == _pins((ROOT / "requirements.txt").read_text().splitlines())
    assert declared["torch"] == "2.14.1" and declared["open-clip-torch"] == "3.3.0"
    scripts = project["scripts"]
    assert set(scripts) == {"fdsl", "fdsl-train", "fdsl-test"}


def test_no_module_imports_a_private_name_of_another() -> None:
    """`from .x import _private` across modules is a seam: the name should be public or stay home."""
    offenders = []
    for path in sorted((ROOT / "fdsl").glob("*.py")):
        for m in re.finditer(r"^\s*from\s+(\S+)\s+import\s+\(?([^)\n]+)", path.read_text(), re.M):
            names = [n.strip().split(" as ")[0] for n in m.group(2).split(",")]
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]  # dunders are public
            offenders += [f"{path.name}: {m.group(1)}.{n}" for n in private]
    assert not offenders, offenders


@pytest.mark.parametrize("argv, rc, text", [
    (["--help"], 0, "usage: fdsl"),
    (["test", "--help"], 0, "--checkpoint_path"),
    (["train", "--help"], 0, "--train_data_path"),
    (["nope"], 2, "unknown command 'nope'"),
])
def test_fdsl_dispatcher(argv, rc, text, tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fdsl", *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == rc, proc.stderr
    assert text in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- every module, and the floors

import ast  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import pkgutil  # noqa: E402

import fdsl  # noqa: E402

MODULES = sorted(m.name for m in pkgutil.walk_packages(fdsl.__path__, "fdsl."))


@pytest.mark.parametrize("name", MODULES)
def test_every_module_imports(name) -> None:
    """Every module of every subpackage imports (walked recursively, not only the top level)."""
    importlib.import_module(name)


# The house, floor by floor: a module may import its own subpackage and any lower floor, nothing else.
# Subpackages on one floor (core and metrics; deploy and serve) do not import each other.
FLOORS = {"fdsl": 0, "fdsl.data": 1, "fdsl.core": 2, "fdsl.metrics": 2, "fdsl.outputs": 3,
          "fdsl.engine": 4, "fdsl.inspect": 5, "fdsl.deploy": 6, "fdsl.serve": 6, "fdsl.batch": 7, "fdsl.cli": 8}
ENTRY_POINTS = {"fdsl.__main__": "fdsl.cli"}  # `python -m fdsl` is the dispatcher's room
# fdsl.heads is the shipped head files plus their torch-free lookup (config resolves a default head): base floor.
BASE_PACKAGES = {"fdsl.heads"}
# The torch-free rooms, by what they may import directly.
TORCH_FREE = {"fdsl.outputs": {"fdsl", "fdsl.data.rgb", "fdsl.metrics", "fdsl.outputs"},
              "fdsl.deploy": {"fdsl", "fdsl.data.rgb", "fdsl.outputs", "fdsl.deploy"}}
# Named exceptions, each with its reason (keep this empty where the code allows).
EXCEPTIONS: dict[tuple[str, str], str] = {}


def _room(module: str) -> str:
    """The subpackage a module lives in ("fdsl" for the base floor's top-level modules)."""
    if module in ENTRY_POINTS:
        return ENTRY_POINTS[module]
    if module in BASE_PACKAGES or module.rsplit(".", 1)[0] in BASE_PACKAGES:
        return "fdsl"
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (module in PACKAGES) else "fdsl"


PACKAGES = {m.name for m in pkgutil.walk_packages(fdsl.__path__, "fdsl.") if m.ispkg}


def _imports(module: str) -> set[str]:
    """The fdsl modules `module` imports anywhere in its file (top level or inside functions)."""
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "fdsl"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "fdsl":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m != module}


GRAPH = {m: _imports(m) for m in MODULES}


def test_no_import_runs_up_a_floor() -> None:
    """Computed from the real imports: base (errors, checks, io, options, config, taps) -> data -> core and
    metrics -> outputs -> engine -> inspect -> deploy and serve -> batch (it loads both detector kinds) -> cli;
    outputs and deploy stay torch-free."""
    bad = []
    for m, targets in GRAPH.items():
        here = _room(m)
        for t in targets:
            there = _room(t)
            if (m, t) in EXCEPTIONS or there == here:
                continue
            if not FLOORS[there] < FLOORS[here]:
                bad.append(f"{m} -> {t} ({here} may not import {there})")
            elif here in TORCH_FREE and not any(t == a or t.startswith(a + ".") and a != "fdsl" or
                                                (a == "fdsl" and there == "fdsl") for a in TORCH_FREE[here]):
                bad.append(f"{m} -> {t} (the torch-free {here} may import only {sorted(TORCH_FREE[here])})")
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_cycle_between_files_or_subpackages() -> None:
    files = {m: {t for t in ts if t in GRAPH and not (t in PACKAGES and t == _room(m))} for m, ts in GRAPH.items()}
    assert not _cycles(files), _cycles(files)
    rooms: dict[str, set[str]] = {}
    for m, ts in GRAPH.items():
        rooms.setdefault(_room(m), set()).update(_room(t) for t in ts if _room(t) != _room(m)
                                                 and (m, t) not in EXCEPTIONS)
    assert not _cycles(rooms), _cycles(rooms)


def test_the_torch_free_floors_import_no_torch_in_a_fresh_interpreter() -> None:
    code = ("import sys, fdsl.outputs, fdsl.deploy, fdsl.deploy.run, " + ", ".join(
        m for m in MODULES if m.startswith(("fdsl.outputs.", "fdsl.deploy."))) +
            "; print(sorted(m for m in ('torch', 'open_clip', 'cv2', 'torchvision') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
