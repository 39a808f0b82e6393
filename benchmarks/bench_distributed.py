"""Speed-up of evaluation under torchrun: P processes vs 1, same data, same model, same results.

It writes a synthetic MVTec-layout dataset, a weights file of a random-weight CLIP (speed does not depend on
the weights) and an untrained head, then runs ``test.py``'s evaluation twice through ``torchrun``: with
``--nproc_per_node 1`` and with ``--nproc_per_node P``. Each run is timed in two ways:

* ``eval s``: ``Evaluator.run()`` alone (all classes: memory banks, scoring, gathering, metrics, files),
  between barriers, on rank 0: the part that the ranks share;
* ``job s``: the whole command, start-up included (imports, process group, model build).

The runs' ``scores.csv`` must be byte-identical; the script says so. On the CPU, the P ranks share the
machine's cores: each process gets ``cores // P`` threads (``--threads``); the 1-process run is timed with
all cores and with 1 thread, and the speed-up is against the faster of the two (on a loaded machine,
several threads per process can be much slower than one).
With ``--device cuda`` each rank uses GPU LOCAL_RANK (nccl), so P must not exceed the GPUs.

    .venv/bin/python -m benchmarks.bench_distributed --nproc 2 --device cpu
    .venv/bin/python -m benchmarks.bench_distributed --nproc 8 --device cuda --model ViT-L-14-336 \\
        --image_size 518 --n_test 200
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
MARK = "@@BENCH_RESULT@@ "


def _worker(args: argparse.Namespace, rest: list) -> None:
    """One rank: evaluate with `rest` as test.py's options; rank 0 prints the timing as JSON."""
    import torch

    from fdsl.config import TestConfig, parse_config
    from fdsl.engine import distributed
    from fdsl.engine.evaluation import Evaluator
    from fdsl.io import setup_logging

    torch.set_num_threads(args.threads)
    cfg = parse_config(TestConfig, rest)
    with distributed.session(cfg.device):
        setup_logging(None, level=distributed.rank_log_level(30))
        ev = Evaluator(cfg)
        distributed.barrier()
        t0 = time.perf_counter()
        ev.run()
        distributed.barrier()
        if distributed.is_main():
            print(MARK + json.dumps({"eval_s": time.perf_counter() - t0, "world": distributed.world_size()}),
                  flush=True)


def _prepare(work: Path, args: argparse.Namespace) -> tuple[Path, Path, Path]:
    import open_clip
    import torch

    from fdsl.config import ModelConfig, config_to_dict
    from fdsl.core.backbone import register_model_configs
    from fdsl.core.model import FDSL
    from fdsl.data.synthetic import make_synthetic_dataset
    from fdsl.engine.checkpoint import save_checkpoint

    register_model_configs()
    good = args.n_test // 3
    data = make_synthetic_dataset(work / "data", classes=("brick_syn", "tissue_syn"), n_train=4,
                                  n_test_good=good, n_test_bad=args.n_test - good, image_size=128, seed=1)
    torch.manual_seed(0)
    weights = work / "clip.pt"
    torch.save(open_clip.create_model(args.model, force_image_size=args.image_size).state_dict(), weights)
    layers = args.layers
    mcfg = ModelConfig(model=args.model, pretrained=str(weights), image_size=args.image_size,
                       features_list=layers, few_shot_features=layers)
    ckpt = work / "head.pth"
    save_checkpoint(ckpt, FDSL.from_config(mcfg).head, config_to_dict(mcfg), epoch=0)
    return data, weights, ckpt


def _run(nproc: int, args: argparse.Namespace, test_args: list, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc), "-m", "benchmarks.bench_distributed",
           "--worker", "--threads", str(threads), "--", *test_args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(ROOT))
    job = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"torchrun --nproc_per_node {nproc} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)][-1]
    return json.loads(line[len(MARK):]) | {"job_s": job}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="ranks of the distributed run (compared with 1)")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, GPU LOCAL_RANK per rank)")
    p.add_argument("--model", default="FDSL-Tiny-ViT")
    p.add_argument("--image_size", type=int, default=112)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--n_test", type=int, default=60, help="test images per class (2 classes)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (default: cores // P)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each, best kept")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.worker:
        _worker(args, [a for a in rest if a != "--"])
        return
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench_dist_") as tmp:
        work = Path(tmp)
        data, weights, ckpt = _prepare(work, args)
        rows = []
        outs = {}
        if args.device == "cpu":  # 1 process with all cores, 1 process with 1 thread, P processes sharing the cores
            configs = [(1, args.threads or cores), (1, 1), (args.nproc, args.threads or max(1, cores // args.nproc))]
        else:
            configs = [(1, args.threads or 1), (args.nproc, args.threads or 1)]
        for nproc, threads in dict.fromkeys(configs):
            out = work / f"out_{nproc}_{threads}"
            test_args = ["--model", args.model, "--image_size", args.image_size, "--features_list", *args.layers,
                         "--few_shot_features", *args.layers, "--pretrained", weights, "--dataset", "mvtec",
                         "--data_path", data, "--checkpoint_path", ckpt, "--k_shot", 1,
                         "--batch_size", args.batch_size, "--num_workers", 0, "--device", args.device]
            best = None
            for r in range(args.repeats):
                res = _run(nproc, args, [str(a) for a in test_args + ["--save_path", out / str(r)]], threads)
                best = res if best is None or res["eval_s"] < best["eval_s"] else best
            outs[nproc, threads] = (out / "0" / "scores.csv").read_bytes()
            rows.append({"nproc": nproc, "threads": threads, **best})
        identical = len(set(outs.values())) == 1
        base = min((r for r in rows if r["nproc"] == 1), key=lambda r: r["eval_s"])  # the faster 1-process run
        print(f"device {args.device}, model {args.model} at {args.image_size} px, 2 classes × {args.n_test} test "
              f"images, batch {args.batch_size}, {cores} CPU cores, load average {os.getloadavg()[0]:.1f}")
        print(f"speed-ups against the faster 1-process run ({base['threads']} thread(s))")
        print("| processes | threads each | eval s | eval speed-up | job s (with start-up) | job speed-up |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['nproc']} | {row['threads']} | {row['eval_s']:.2f} | {base['eval_s'] / row['eval_s']:.2f}× "
                  f"| {row['job_s']:.1f} | {base['job_s'] / row['job_s']:.2f}× |")
        print(f"scores.csv identical in all runs: {identical}")
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, "identical": identical, "args": vars(args)},
                                                  indent=2, default=str))
        if not identical:
            sys.exit(1)


if __name__ == "__main__":
    main()
