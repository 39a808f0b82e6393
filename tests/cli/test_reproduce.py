"""reproduce.sh and fdsl.engine.paper: the plan (``--dry-run``) with missing and with tiny synthetic datasets,
the paper table, and the epoch choice (epoch 5 of a longer run is epoch 5 of a 5-epoch run)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fdsl_test_utils import TINY_MODEL_ARGS, drop_fdsl_log_handlers, tiny_data

from fdsl.cli.jobs import main
from fdsl.config import TrainConfig
from fdsl.data.synthetic import make_synthetic_dataset, make_synthetic_visa
from fdsl.engine import paper
from fdsl.engine.protocol import summarize

REPO = Path(__file__).resolve().parents[2]
STEPS = 7  # index x2, train x2, protocol x2, table


def _dry_run(tmp_path: Path, mvtec: Path, visa: Path) -> subprocess.CompletedProcess:
    weights = tmp_path / "ViT-L-14-336px.pt"
    weights.write_bytes(b"stand-in")  # the dry run only checks that the file exists
    env = dict(os.environ, MVTEC_ROOT=str(mvtec), VISA_ROOT=str(visa), FDSL_PRETRAINED=str(weights),
               FDSL_REPRO_OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    return subprocess.run(["bash", str(REPO / "reproduce.sh"), "--dry-run"], capture_output=True, text=True,
                          env=env, timeout=120)


def _steps(stdout: str) -> list:
    return re.findall(r"^  (\d+)\. (.+) \[(to do|done)\]$", stdout, re.M)


def test_dry_run_with_missing_datasets_says_how_to_get_each(tmp_path):
    proc = _dry_run(tmp_path, tmp_path / "no_mvtec", tmp_path / "no_visa")
    assert proc.returncode == 0, proc.stderr
    missing = [line for line in proc.stdout.splitlines() if line.strip().startswith("missing:")]
    assert len(missing) == 2, proc.stdout  # one line per dataset; the weights file exists
    assert "MVTec AD" in missing[0] and "mvtec.com" in missing[0] and "MVTEC_ROOT=" in missing[0]
    assert "VisA" in missing[1] and "amazon-science/spot-diff" in missing[1] and "VISA_ROOT=" in missing[1]
    assert [int(n) for n, _, _ in _steps(proc.stdout)] == list(range(1, STEPS + 1))
    assert "--k_shot 1 2 4 --seeds 10 11 12 13 14" in proc.stdout
    # The estimate falls back to the published sizes and covers every step.
    assert "15 classes, 3629 train / 1725 test images (from the published sizes)" in proc.stdout
    assert re.search(r"^  total: CPU [\d.]+ days, GPU [\d.]+ h", proc.stdout, re.M), proc.stdout
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_dry_run_with_tiny_synthetic_roots(tmp_path):
    mvtec = make_synthetic_dataset(tmp_path / "mvtec", classes=("brick_syn",), n_train=3, n_test_good=2,
                                   n_test_bad=2, image_size=32, seed=1)
    (mvtec / "meta.json").unlink()  # found but not yet indexed
    visa = make_synthetic_visa(tmp_path / "visa", classes=("pcb_syn",), n_train=4, n_test_good=2, n_test_bad=3,
                               image_size=32, seed=2)
    proc = _dry_run(tmp_path, mvtec, visa)
    assert proc.returncode == 0, proc.stderr
    assert "missing:" not in proc.stdout, proc.stdout
    assert f"MVTec AD: {mvtec} (found; the index step writes meta.json)" in proc.stdout
    assert f"VisA: {visa} (indexed: meta.json present)" in proc.stdout
    steps = _steps(proc.stdout)
    assert len(steps) == STEPS and steps[0][2] == "to do" and steps[1][2] == "done"  # VisA is indexed
    assert "MVTec AD: 1 classes, 3 train / 4 test images (from the folder layout)" in proc.stdout
    assert "VisA: 1 classes, 4 train / 5 test images (from meta.json)" in proc.stdout
    assert not (mvtec / "meta.json").exists() and not (tmp_path / "out").exists()


def test_paper_table_puts_ours_beside_the_paper(tmp_path):
    per_run = {(k, s): {"c": {m: 0.9 + 0.01 * k + 0.002 * s for m in paper.PAPER_METRICS} | {"aupro": 0.5}}
               for k in (1, 2, 4) for s in (0, 1)}
    for ds in ("mvtec", "visa"):
        (tmp_path / ds).mkdir()
        (tmp_path / ds / "summary.json").write_text(json.dumps(summarize(ds, ["c"], per_run)))
    md = paper.write_table({"mvtec": tmp_path / "mvtec", "visa": tmp_path / "visa"}, tmp_path / "t")
    assert "| MVTec AD 1-shot | ours (2 seeds) | 91.1 ± 0.1" in md  # 0.9 + 0.01 + mean(0, 0.002)
    assert "| VisA 4-shot" in md and md.count("ours − paper") == 6
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    r = next(r for r in rows if (r["dataset"], r["k"], r["metric"]) == ("mvtec", 1, "image_auroc"))
    assert r["paper"] == pytest.approx(0.944) and r["diff"] == pytest.approx(0.911 - 0.944)
    assert (tmp_path / "t.csv").read_text().startswith("dataset,k,metric,n_seeds,ours_mean,ours_std,paper,diff")
    with pytest.raises(Exception, match="summary.json does not exist"):
        paper.write_table({"mvtec": tmp_path / "nothing"}, tmp_path / "t2")


def test_epoch_of_a_longer_run_equals_the_same_epoch_of_a_shorter_one(tmp_path):
    """Why reproduce.sh trains the VisA head 5 epochs, not the released 11: epoch 5 does not depend on the total."""
    data = tiny_data(tmp_path / "data", n_train=3)
    heads = {}
    try:
        for total in (1, 2):
            out = tmp_path / f"run{total}"
            argv = [*TINY_MODEL_ARGS, "--train_data_path", str(data), "--save_path", str(out), "--k_shot", "1",
                    "--batch_size", "4", "--epoch", str(total), "--num_workers", "0", "--seed", "3"]
            assert main(TrainConfig, "fdsl.engine.training:train", argv) == 0
            heads[total] = torch.load(out / "epoch_1.pth", weights_only=True)["head"]
    finally:
        drop_fdsl_log_handlers()
    assert heads[1].keys() == heads[2].keys()
    for key in heads[1]:
        assert torch.equal(heads[1][key], heads[2][key]), key


def test_planned_commands_parse_with_the_real_parsers(tmp_path):
    """Every train.py / test.py command the plan prints is a valid command line of today's parsers."""
    import shlex

    from fdsl.config import TestConfig as EvalConfig
    from fdsl.config import parse_config

    proc = _dry_run(tmp_path, tmp_path / "m", tmp_path / "v")
    commands = [shlex.split(line.strip()) for line in proc.stdout.splitlines() if line.startswith("       ")]
    assert len(commands) == STEPS
    parsed = {"train.py": [], "test.py": []}
    for argv in commands:
        script = Path(argv[1]).name if len(argv) > 1 else ""
        if script in parsed:
            cls = TrainConfig if script == "train.py" else EvalConfig
            parsed[script].append(parse_config(cls, argv[2:]))
    assert len(parsed["train.py"]) == 2 and len(parsed["test.py"]) == 2
    for cfg in parsed["test.py"]:
        assert (cfg.shot_list(), cfg.run_seeds(), cfg.winmode, cfg.win_size, cfg.win_stride) == (
            [1, 2, 4], [10, 11, 12, 13, 14], "mul", 13, 2)
        assert cfg.checkpoint_path.endswith("epoch_5.pth") and cfg.model == "ViT-L-14-336" and cfg.image_size == 518
    assert all(cfg.epoch == 5 and cfg.k_shot == 10 and cfg.seed == 14 for cfg in parsed["train.py"])
