"""FDSL_SMOKE=1 (fdsl/cli/smoke.py) and the scripts' own checks: PYTHON must import fdsl, data must be there."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fdsl.cli import smoke
from fdsl.data.meta import load_meta
from fdsl.errors import DataError

REPO = Path(__file__).resolve().parents[2]
ARGS = ["fdsl", "cpu", "1", "mul", "13", "2", "0.5", "14", "1"]  # the paper's nine arguments


def test_window_is_scaled_to_the_tiny_grid():
    assert smoke.smoke_window(13, 2) == (4, 2)
    assert smoke.smoke_window(3, 5) == (3, 3)
    assert smoke.smoke_window(2, 1) == (2, 1)


def test_smoke_writes_both_layouts_and_prints_the_assignments(tmp_path, capsys):
    assert smoke.main(["--out", str(tmp_path), "--win_size", "13", "--win_stride", "2"]) == 0
    out, err = capsys.readouterr()
    values = dict(line.split("=", 1) for line in out.splitlines())
    assert values["SMOKE_WIN_SIZE"] == "4" and values["SMOKE_EPOCHS"] == "2"
    assert "--pretrained none" in values["SMOKE_MODEL_ARGS"].strip("'")
    assert "smoke mode, NOT the paper's setting" in err and "13/2 -> 4/2" in err
    mvtec, visa = load_meta(tmp_path / "data" / "mvtec"), load_meta(tmp_path / "data" / "visa")
    assert set(mvtec["test"]) == {"carpet_syn", "wood_syn"} and set(visa["test"]) == {"candle_syn", "pcb_syn"}
    assert (tmp_path / "data" / "visa" / "split_csv" / "1cls.csv").is_file()


def _script(script: str, tmp_path: Path, timeout: int = 120, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(REPO), **env)
    return subprocess.run(["bash", str(REPO / script), *ARGS], capture_output=True, text=True, env=full,
                          timeout=timeout, cwd=tmp_path)


@pytest.mark.parametrize("script", ["trainAndTest.sh", "test_few_shot.sh"])
def test_missing_data_names_the_download_page(script, tmp_path):
    proc = _script(script, tmp_path, PYTHON=sys.executable, MVTEC_ROOT=str(tmp_path / "nowhere"),
                   VISA_ROOT=str(tmp_path / "nowhere_either"))
    assert proc.returncode == 2
    assert "MVTec AD not found" in proc.stderr and "https://www.mvtec.com/company/research/datasets/mvtec-ad" in \
        proc.stderr and "data/mvtec.py" in proc.stderr and "visa.py" not in proc.stderr.splitlines()[0]


def test_unindexed_folder_names_its_own_indexer(tmp_path):
    (tmp_path / "mvtec" / "bottle" / "train" / "good").mkdir(parents=True)
    proc = _script("test_few_shot.sh", tmp_path, PYTHON=sys.executable, MVTEC_ROOT=str(tmp_path / "mvtec"))
    assert proc.returncode == 2 and "not indexed yet" in proc.stderr and "data/mvtec.py --root" in proc.stderr


def test_python_that_cannot_import_fdsl_is_one_line(tmp_path):
    proc = _script("trainAndTest.sh", tmp_path, PYTHON="/bin/false")
    assert proc.returncode == 2 and "PYTHON=/bin/false cannot import fdsl" in proc.stderr


def test_test_py_message_for_a_missing_or_unindexed_dataset(tmp_path):
    with pytest.raises(DataError) as err:
        load_meta(tmp_path / "absent", "mvtec")
    msg = str(err.value)
    assert "does not exist" in msg and "mvtec-ad" in msg and "data/mvtec.py" in msg and "visa" not in msg
    (tmp_path / "v" / "split_csv").mkdir(parents=True)
    (tmp_path / "v" / "split_csv" / "1cls.csv").write_text("object,split,label,image,mask\n")
    with pytest.raises(DataError, match=r"holds VisA but is not indexed yet; run `python data/visa.py --root"):
        load_meta(tmp_path / "v", "mvtec")


@pytest.mark.skipif(os.environ.get("FDSL_SLOW") != "1", reason="the whole smoke run takes minutes on a loaded "
                    "2-core CPU (about 4 min measured); FDSL_SLOW=1 runs it")
def test_smoke_mode_runs_train_and_test_end_to_end(tmp_path):
    """FDSL_SMOKE=1 bash trainAndTest.sh with the paper's nine arguments: trains twice and tests twice, offline."""
    proc = _script("trainAndTest.sh", tmp_path, timeout=900, PYTHON=sys.executable, FDSL_SMOKE="1",
                   FDSL_SMOKE_DIR=str(tmp_path / "smoke"), OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "smoke mode, NOT the paper's setting" in proc.stderr
    results = sorted((tmp_path / "smoke" / "results" / "fdsl").glob("*/results.json"))
    assert [p.parent.name.split("_")[0] for p in results] == ["mvtec", "visa"]
