"""`python -m fdsl.cli.demo`: the random-weight smoke run end to end, its rerun, and the offline message."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEST_CLASSES = ("brick_syn", "tissue_syn")


# The quick setting (less data, fewer epochs) is reachable from Python only, not from the user's parser.
_QUICK = "import sys; from fdsl.cli.demo import main; sys.exit(main(sys.argv[1:], quick=True))"


def run_demo(*args, env: dict | None = None, timeout: int = 600, quick: bool = True) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **(env or {}))
    for name in ("FDSL_PRETRAINED", "FDSL_MODEL"):  # the defaults under test come from these
        full_env.pop(name, None)
    entry = ["-c", _QUICK] if quick else ["-m", "fdsl.cli.demo"]
    return subprocess.run([sys.executable, *entry, *map(str, args)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo("--pretrained", "none", "--out", out, "--device", "cpu")


def test_smoke_run_prints_table_and_writes_heat_maps(smoke):
    out, proc = smoke
    assert proc.returncode == 0, describe(proc)
    assert "Traceback" not in proc.stderr
    assert "RANDOM-WEIGHT SMOKE RUN" in proc.stderr and "FDSL_MODEL=ViT-L-14-336" in proc.stderr
    assert re.search(r"^\| objects +\| +AUROC +\| +AUROC_p", proc.stdout, re.M), describe(proc)
    for name in (*TEST_CLASSES, "mean"):
        assert re.search(rf"^\| {name} +\|( +\d+\.\d\d \|){{7}}$", proc.stdout, re.M), name
    match = re.search(r"^heat maps.*: (.+)$", proc.stdout, re.M)
    assert match, describe(proc)
    images = Path(match.group(1).strip())
    assert images.is_dir() and images.is_relative_to(out)
    for cls in TEST_CLASSES:
        pngs = list((images / cls).glob("*.png"))
        assert pngs and all(p.stat().st_size > 0 for p in pngs), cls
    assert (out / "data").is_dir() and len(list((out / "data").glob("*/meta.json"))) == 2
    assert (images.parent / "results.json").is_file()


def test_rerun_reuses_data_checkpoints_and_finished_classes(smoke):
    out, first = smoke
    assert first.returncode == 0, describe(first)
    metas = {p: p.stat().st_mtime_ns for p in (out / "data").glob("*/meta.json")}
    proc = run_demo("--pretrained", "none", "--out", out, "--device", "cpu")
    assert proc.returncode == 0, describe(proc)
    assert proc.stderr.count("reusing synthetic data") == 2
    assert "epochs already done" in proc.stderr
    assert not re.search(r"epoch \d+/\d+: mean loss", proc.stderr)
    assert proc.stderr.count("already finished") == len(TEST_CLASSES)
    assert {p: p.stat().st_mtime_ns for p in metas} == metas
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table == [line for line in first.stdout.splitlines() if line.startswith("| ")]


def test_offline_real_weights_explain_fdsl_pretrained(tmp_path):
    proc = run_demo("--pretrained", "openai", "--out", tmp_path, "--device", "cpu", timeout=300, quick=False)
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert "could not fetch" in proc.stderr
    assert "FDSL_PRETRAINED=/path/to/weights.pt bash demo.sh" in proc.stderr
    assert "FDSL_PRETRAINED=none bash demo.sh" in proc.stderr
    assert not (tmp_path / "data").exists(), "nothing should be generated before the weights are there"


def demo_parser():
    """The demo's parser as the command builds it (`parse_config(DemoConfig, ...)`)."""
    from fdsl.config import DemoConfig, build_parser

    return build_parser(DemoConfig, prog="python -m fdsl.cli.demo")


def test_user_parser_has_no_hidden_options():
    with pytest.raises(SystemExit):
        demo_parser().parse_args(["--quick"])
