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
