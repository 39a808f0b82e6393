"""torchrun: 2 CPU ranks (gloo) against 1 process, through the command line, on the tiny CLIP and synthetic data.

- training: 2 ranks × batch 4 and 1 rank × batch 8 see the same global batches; their epoch losses and
  final head weights (the 2 ranks resuming from the 1-process run's epoch-1 checkpoint) agree to float
  tolerance, not bit-exact: the 2-rank batch norms sum their statistics across ranks in float64, a single
  process's BatchNorm1d reduces them in one pass, and DDP averages gradients in a different summation
  order; Adam then magnifies the last-bit differences of near-zero gradients (see the tolerances below);
- one training step: gradients and batch-norm statistics as in 1 process, also when one rank's slice of
  the global batch is empty;
- evaluation: scores.csv and results.json are byte-identical to the 1-process run's; resume is decided by
  rank 0; a rank that reads a corrupt image ends the whole job promptly, with a non-zero exit and the error.

The module launches torchrun 4 times (the 1-process references run in this process): about 3.3 minutes
on two CPU cores that other jobs load 5× over, less on a quiet machine.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
TINY = "FDSL-Tiny-ViT"
LAYERS = ["1", "2", "3", "4"]
MODEL_ARGS = ["--model", TINY, "--image_size", "112", "--features_list", *LAYERS, "--few_shot_features", *LAYERS]
EPOCHS = 3
# Tolerances of 2 ranks vs 1 process. One step's gradients agree to ~6e-6 relative (test_one_step_gradients).
# Resumed from the same epoch-1 checkpoint, two more epochs give weights within ~2e-7 (measured). From a fresh
# start they differ by up to ~4e-5: Adam's first, bias-corrected steps divide by sqrt(v) + 1e-8, which
# magnifies the last-bit differences of near-zero gradients. The first batch norm's bias of each scorer has
# an exactly-zero gradient (the next batch norm cancels the shift), so it holds Adam-scaled float noise in
# both runs (|value| ~ 1e-4): it and the running mean right behind it get the loose NOISE_ATOL.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5
NOISE_ATOL = 2e-3
NOISE_KEYS = ("fbatchNorm.bias", "proj.1.running_mean")

pytestmark = pytest.mark.skipif(not TORCHRUN.is_file(), reason=f"torchrun not found next to {sys.executable}")


def _env() -> dict:
    # Workers run the scripts by path: the repository must come first on their import path.
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                FDSL_DIST_TIMEOUT_S="120")


def run(script: str, args: list, nproc: int, cwd: Path, expect_rc: int | None = 0,
        timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node nproc script args`; with nproc 1, the command in this process
    (the single-process reference; it saves a Python start-up on a busy machine)."""
    if nproc == 1:
        from fdsl.cli import jobs as cli

        main = {"train.py": cli.train_main, "test.py": cli.test_main}[script]
        rc = main([str(a) for a in args])
        assert rc == (expect_rc if expect_rc is not None else rc), f"{script} exited {rc}"
        return subprocess.CompletedProcess([script], rc, "", "")
    launcher = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc)]
    proc = subprocess.run([*launcher, str(ROOT / script), *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    if expect_rc is not None and proc.returncode != expect_rc:
        pytest.fail(f"{script} nproc={nproc} exited {proc.returncode}, expected {expect_rc}\n"
                    f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


# --------------------------------------------------------------------------- pure helpers (no processes)


def test_global_batch_sampler_slices_the_single_process_batches():
    from torch.utils.data import DataLoader

    from fdsl.engine.strategy import GlobalBatchSampler

    for n, batch, world in [(9, 8, 2), (21, 8, 2), (21, 8, 4), (5, 4, 2)]:
        for epoch in (1, 2):
            gen = torch.Generator().manual_seed(7 * 1000 + epoch)  # as Trainer.run seeds its loader
            single = [b.tolist() for b in DataLoader(range(n), batch_size=batch, shuffle=True, generator=gen)]
            parts = []
            for r in range(world):
                s = GlobalBatchSampler(n, batch, seed=7, rank_=r, world=world)
                s.set_epoch(epoch)
                parts.append(list(s))
                assert len(s) == len(single)
            for j, full in enumerate(single):
                assert [i for p in parts for i in p[j]] == full  # rank slices, in order, are the global batch
                sizes = [len(p[j]) for p in parts]
                assert max(sizes) - min(sizes) <= 1
                if len(full) == batch:
                    assert sizes == [batch // world] * world


def test_shard_range_covers_whole_batches():
    from fdsl.engine.strategy import shard_range

    for n, batch, world in [(18, 4, 2), (9, 4, 2), (3, 4, 2), (100, 8, 3), (0, 4, 2)]:
        parts = [shard_range(n, batch, r, world) for r in range(world)]
        assert [i for p in parts for i in p] == list(range(n))
        for p in parts[:-1]:
            assert len(p) % batch == 0  # every rank but the last ends on a batch boundary


def test_per_rank_batch_must_divide():
    from fdsl.engine.strategy import per_rank_batch
    from fdsl.errors import ConfigError

    assert per_rank_batch(8, 2) == 4
    with pytest.raises(ConfigError, match="--batch_size 6 .* divisible by the 4 torchrun ranks"):
        per_rank_batch(6, 4)


def test_helpers_are_noops_without_torchrun():
    from fdsl.engine import distributed

    assert not distributed.active() and distributed.is_main() and distributed.world_size() == 1
    assert distributed.gather_to_main(3) == [3]
    assert distributed.broadcast_from_main(lambda: 5, "x") == 5
    with pytest.raises(ValueError, match="boom"):
        with distributed.step("x"):
            raise ValueError("boom")


# --------------------------------------------------------------------------- torchrun, 2 CPU ranks


def test_one_step_gradients_match_one_process():
    """Global batches of 5 (2 + 3 per rank) and 1 (one rank empty): gradients and BN statistics as 1 process."""
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "dist_grad_worker.py")], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result["1"]["slice"] == [0, 0]  # rank 0 had no sample and still took part
    for batch, r in result.items():
        assert r["n"] == int(batch)
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6), batch
        assert r["grad"] < 1e-4, (batch, r)  # measured ~6e-6
        assert r["buffers"] < 1e-5, (batch, r)  # measured ~7e-7


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    import open_clip

    from fdsl.core.backbone import register_model_configs
    from fdsl.data.synthetic import make_synthetic_dataset

    work = tmp_path_factory.mktemp("dist")
    # Training set: 3 classes × 3 test images = 9 → global batches of 8 and 1 (one rank's slice of the
    # last batch is empty). Test set: 2 classes × 9 images, batch 4 → 3 batches per class: rank 0 scores 1,
    # rank 1 scores 2.
    a = make_synthetic_dataset(work / "A", classes=("carpet_syn", "wood_syn", "tile_syn"), n_train=2,
                               n_test_good=1, n_test_bad=2, image_size=128, seed=0)
    b = make_synthetic_dataset(work / "B", classes=("brick_syn", "tissue_syn"), n_train=2, n_test_good=3,
                               n_test_bad=6, image_size=128, seed=1)
    register_model_configs()
    torch.manual_seed(0)
    weights = work / "tiny_clip.pt"
    torch.save(open_clip.create_model(TINY).state_dict(), weights)
    return SimpleNamespace(work=work, A=a, B=b, weights=weights)


def train_args(data: SimpleNamespace, out: Path, batch: int) -> list:
    return [*MODEL_ARGS, "--pretrained", data.weights, "--dataset", "mvtec", "--train_data_path", data.A,
            "--save_path", out, "--k_shot", 1, "--batch_size", batch, "--epoch", EPOCHS, "--num_workers", 0,
            "--device", "cpu"]


def eval_args(data: SimpleNamespace, root: Path, checkpoint: Path, out: Path) -> list:
    return [*MODEL_ARGS, "--pretrained", data.weights, "--dataset", "mvtec", "--data_path", root,
            "--checkpoint_path", checkpoint, "--save_path", out, "--k_shot", 1, "--batch_size", 4,
            "--num_workers", 0, "--device", "cpu"]


def epoch_losses(log: str) -> list[float]:
    import re

    return [float(m.group(1)) for m in re.finditer(rf"epoch \d+/{EPOCHS}: mean loss ([-+0-9.eE]+)", log)]


@pytest.fixture(scope="module")
def trained(data: SimpleNamespace) -> SimpleNamespace:
    one, two = data.work / "train_1x8", data.work / "train_2x4"
    run("train.py", train_args(data, one, 8), 1, data.work)
    # The 2-rank run resumes from the 1-process run's epoch 1 (rank 0 reads it, every rank gets the head and
    # Adam's state), then trains epochs 2 and 3.
    two.mkdir()
    shutil.copy(one / "epoch_1.pth", two / "epoch_1.pth")
    proc = run("train.py", train_args(data, two, 8), 2, data.work)
    return SimpleNamespace(one=one, two=two, proc=proc)


def test_training_two_ranks_match_one_process(trained):
    from fdsl.core.checkpoint_io import read_checkpoint

    log1, log2 = (trained.one / "log.txt").read_text(), (trained.two / "log.txt").read_text()
    l1, l2 = epoch_losses(log1), epoch_losses(log2)
    assert len(l1) == EPOCHS and len(l2) == EPOCHS - 1, (l1, l2)
    assert l2 == pytest.approx(l1[1:], rel=LOSS_RTOL)
    assert "torchrun: 2 ranks, backend gloo" in log2 and "resuming from" in log2
    # One log line per event: rank 1 does not log (nor write) anything.
    assert log2.count("saved ") == EPOCHS - 1
    names = sorted(p.name for p in trained.two.glob("epoch_*.pth"))
    assert names == [f"epoch_{e}.pth" for e in range(1, EPOCHS + 1)]
    s1 = read_checkpoint(trained.one / f"epoch_{EPOCHS}.pth")["head"]
    s2 = read_checkpoint(trained.two / f"epoch_{EPOCHS}.pth")["head"]
    assert s1.keys() == s2.keys()
    for k in s1:
        if s1[k].is_floating_point():
            atol = NOISE_ATOL if k.endswith(NOISE_KEYS) else WEIGHT_ATOL
            torch.testing.assert_close(s2[k], s1[k], atol=atol, rtol=1e-4, msg=k)
        else:
            assert torch.equal(s2[k], s1[k]), k
    # The weights did move: the comparison is not between two untouched heads.
    s0 = read_checkpoint(trained.one / "epoch_2.pth")["head"]
    assert any(not torch.equal(s0[k], s1[k]) for k in s1 if s1[k].is_floating_point())


def test_evaluation_two_ranks_identical_resume_and_failure(data, trained):
    """2 ranks write the 1-process files byte for byte; then, in one more launch, a rerun reuses the
    finished class (rank 0 decides) and a rank reading a corrupt image ends the job promptly."""
    ckpt = trained.one / f"epoch_{EPOCHS}.pth"
    one, two = data.work / "eval_1", data.work / "eval_2"
    run("test.py", eval_args(data, data.B, ckpt, one), 1, data.work)
    run("test.py", eval_args(data, data.B, ckpt, two), 2, data.work)
    assert (two / "scores.csv").read_bytes() == (one / "scores.csv").read_bytes()
    r1, r2 = json.loads((one / "results.json").read_text()), json.loads((two / "results.json").read_text())
    for r, folder in ((r1, one), (r2, two)):  # the run folder (so the options) and the launcher differ, nothing else
        r["config"].pop("save_path"), r["provenance"].pop("command")
        assert str(folder) in r["provenance"].pop("options")
    assert r2 == r1
    assert len((two / "scores.csv").read_text().splitlines()) == 1 + 18
    log2 = (two / "log.txt").read_text()
    assert "torchrun: 2 ranks, backend gloo" in log2 and log2.count("results (seed") == 1  # rank 0 logs, once

    # Resume + failure: the first class is finished; the second is redone and rank 1 (the last batch of
    # the class) meets a corrupt image.
    meta = json.loads((data.B / "meta.json").read_text())
    first, second = sorted(meta["test"])
    (two / "per_class" / f"{second}.json").unlink()
    victim = data.B / meta["test"][second][-1]["img_path"]
    original = victim.read_bytes()
    victim.write_bytes(b"not a png")
    try:
        t0 = time.monotonic()
        proc = run("test.py", eval_args(data, data.B, ckpt, two), 2, data.work, expect_rc=None, timeout=240)
        elapsed = time.monotonic() - t0
    finally:
        victim.write_bytes(original)
    assert proc.returncode != 0
    assert f"scoring the test images of {second}: rank 1 failed" in proc.stderr, proc.stderr[-3000:]
    assert victim.name in proc.stderr, proc.stderr[-3000:]
    assert elapsed < 120, f"the job took {elapsed:.0f} s to fail"
    log2 = (two / "log.txt").read_text()
    assert f"{first}: already finished" in log2


def test_ranks_with_different_settings_stop_with_one_agreed_error(tmp_path):
    """Rank 1 given another --batch_size: one error naming the setting (was: a wrong scores.csv, exit 0)."""
    from fdsl_test_utils import save_tiny_checkpoint, tiny_data, tiny_test_argv

    data = tiny_data(tmp_path / "data")
    ck = save_tiny_checkpoint(tmp_path / "ck.pth")
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "dist_settings_worker.py"),
                           *tiny_test_argv(data, ck, tmp_path / "out", "--device", "cpu")],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error: " in line and "--batch_size" in line]
    assert errors and "--batch_size is 3 on rank 1 but 2 on rank 0" in errors[0], proc.stderr[-3000:]
    assert not (tmp_path / "out" / "scores.csv").exists()
