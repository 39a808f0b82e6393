"""The GPU check (`benchmarks/gpu_check.sh`) runs end to end on the CPU: its quick setting is its test.

On a CUDA machine the same script compares CUDA with the CPU; here the comparison degenerates to the CPU
against itself, which the output must say, and the CUDA-only columns must say they are not measured.
"""
from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_check():
    return importlib.import_module("benchmarks.gpu_check")  # a package module: no sys.path edits


def test_gpu_check_runs_on_cpu_quick(gpu_check, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(out), "--work", str(tmp_path / "w")]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    assert report["pass"] is True
    assert {a["winmode"] for a in report["agreement"]} == {"nan", "mul"}
    for a in report["agreement"]:
        assert a["degenerate"] and a["max_abs_diff"] == 0.0 and a["n_images"] == 4
    assert "compares the CPU with itself" in md
    ref = [r for r in report["drift"] if (r["precision"], r["align_precision"]) == ("fp32", "fp32")]
    assert len(ref) == 2 and all(r["max_map_diff"] == 0.0 for r in ref)
    assert all(x == 0.0 for r in ref for x in r["nn_flip_global"])
    lfe = [r for r in report["drift"] if r["winmode"] == "mul" and r["precision"] == "bf16"]
    assert {r["align_precision"] for r in lfe} == {"fp32", "bf16"}
    assert all(len(r["nn_flip_window"]) == 4 for r in lfe)
    assert report["timing"] and all(r["peak_gpu_mb"] is None and r["s_per_img"] > 0 for r in report["timing"])
    assert "n/a (CPU)" in md
    assert report["training"][0]["loss"] > 0


def test_gpu_check_sh_runs_this_checkouts_script() -> None:
    sh = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert os.access(ROOT / "benchmarks" / "gpu_check.sh", os.X_OK)
    assert re.search(r'exec "\$PY" -m benchmarks\.gpu_check "\$@"', sh)
    assert 'PYTHONPATH="$PWD' in sh


def test_benchmarks_are_a_package_without_sys_path_edits() -> None:
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        text = script.read_text(encoding="utf-8")
        assert "sys.path" not in text.replace("``sys.path``", ""), script.name
        assert not re.search(r"^from (common|precision_common) import", text, re.M), script.name
    assert (ROOT / "benchmarks" / "__init__.py").is_file()
