"""GPU check, ready to run when a CUDA device is lent (`benchmarks/gpu_check.sh`, ≤ 5 minutes on one GPU).

What it does, on random-weight sets (see `precision_common`: the demo's tiny geometry, and ViT-L-14-336
at 518 px with 1 reference and 2 query images):

1. **Agreement.** The real `Evaluator` (JobContext, pinned non-blocking batches, TF32 off for fp32) on
   ``--device`` in fp32 against the same run on the CPU: per-image ``score``, ``patch_score`` and
   ``map_max`` of ``scores.csv`` must agree to 1e-4, for the global branch (winmode nan) and LFE (mul).
   With ``--device cpu`` this degenerates to CPU against CPU (the output says so).
2. **Drift.** bf16 and fp16 backbones, with the window alignment in fp32 or reduced, against fp32 on
   ``--device``: nearest-neighbour flips per layer, max |map diff|, Δ pixel / image AUROC.
3. **Time and memory.** `FDSL.predict` seconds per image for the global branch and LFE at a few batch
   sizes and ``--win_batch`` values (ViT-L at the default 13/2 windows on CUDA), and the peak
   ``torch.cuda.max_memory_allocated`` of each pass.
4. **Training.** One epoch of the real `Trainer` on the tiny set (pinned, non-blocking batches, autocast).

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``; exits 1 when an agreement check fails.

    bash benchmarks/gpu_check.sh --out /tmp/gpu_check              # on CUDA: everything (≤ 5 min)
    python -m benchmarks.gpu_check --device cpu --quick --out /tmp/gc  # the CPU smoke test (tiny only)
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from benchmarks.precision_common import (
    DRIFT_HEADER,
    TINY,
    VITL,
    BuiltSet,
    build_set,
    drift_line,
    load_model,
    precision_rows,
    run_pass,
    runtime_cfg,
    sync,
)
from fdsl.config import TestConfig, TrainConfig  # noqa: E402
from fdsl.core.runtime import resolve_device  # noqa: E402
from fdsl.engine.evaluation import Evaluator  # noqa: E402
from fdsl.engine.training import Trainer  # noqa: E402

TOL = 1e-4
TINY_QUICK = dataclasses.replace(TINY, key="tiny_quick", n_train=2, n_good=2, n_bad=2)


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "cuda_available": torch.cuda.is_available(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env.update(name=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                   bf16_supported=torch.cuda.is_bf16_supported(), cuda=torch.version.cuda,
                   total_memory_gb=torch.cuda.get_device_properties(device).total_memory / 2 ** 30)
    return env


def _scores(path: Path) -> list[list[float]]:
    with open(path / "scores.csv", newline="") as fh:
        return [[float(r["score"]), float(r["patch_score"]), float(r["map_max"])] for r in csv.DictReader(fh)]


def evaluate(built: BuiltSet, model, winmode: str, device: str, precision: str, work: Path,
             num_workers: int) -> tuple[list[list[float]], float, dict]:
    """Run the real Evaluator (adopting `model`) into a fresh folder; returns the per-image scores,
    the wall time and the class metrics."""
    spec = built.spec
    out = work / "eval" / f"{spec.key}_{winmode}_{device.replace(':', '')}_{precision}"
    shutil.rmtree(out, ignore_errors=True)  # a finished run would be skipped (resume), not re-measured
    cfg = TestConfig(model=spec.model, pretrained=str(built.weights), image_size=spec.image_size,
                     features_list=list(spec.features), few_shot_features=list(spec.features), winmode=winmode,
                     win_size=spec.win_size, win_stride=spec.win_stride, data_path=str(built.data),
                     checkpoint_path=str(built.checkpoint), save_path=str(out), batch_size=4,
                     num_workers=num_workers, device=device, precision=precision, k_shot=spec.k_shot, seed=0,
                     aupro=False, cal_image_size=spec.cal_size)
    t = time.perf_counter()
    res = Evaluator(cfg, model).run()[0]
    return _scores(out), time.perf_counter() - t, res["classes"][spec.cls]


def agreement(built: BuiltSet, model, winmode: str, device: torch.device, work: Path, num_workers: int) -> dict:
    cpu, t_cpu, m_cpu = evaluate(built, model, winmode, "cpu", "fp32", work, 0)
    dev, t_dev, m_dev = evaluate(built, model, winmode, str(device), "fp32", work, num_workers)
    diff = max(abs(a - b) for ra, rb in zip(cpu, dev) for a, b in zip(ra, rb))
    ok = len(cpu) == len(dev) and diff <= TOL
    return {"set": built.spec.key, "winmode": winmode, "against": f"{device} fp32 vs cpu fp32",
            "degenerate": device.type == "cpu", "n_images": len(dev), "max_abs_diff": diff, "pass": ok,
            "eval_wall_s_cpu": t_cpu, "eval_wall_s_device": t_dev,
            "pixel_auroc": m_dev["pixel_auroc"], "image_auroc": m_dev["image_auroc"]}


def timing(model, built: BuiltSet, winmode: str, device: torch.device, precisions: list[str],
           batches: list[int], win_batches: list[int | None]) -> list[dict]:
    """Seconds per image of `FDSL.predict` and peak GPU memory, per precision × batch × win_batch."""
    rows = []
    for prec in precisions:
        for wb in win_batches if winmode != "nan" else [None]:
            for b in batches:
                kw = {"win_batch": wb} if wb else {}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                sync(device)
                res = run_pass(model, built, runtime_cfg(str(device), prec, "fp32", **kw), device, b, with_nn=False)
                peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
                rows.append({"set": built.spec.key, "model": built.spec.model, "image_size": built.spec.image_size,
                             "win": f"{built.spec.win_size}/{built.spec.win_stride}", "winmode": winmode,
                             "precision": prec, "batch": b, "win_batch": wb, "s_per_img": res.seconds_per_image,
                             "peak_gpu_mb": peak})
    return rows


def train_one_epoch(built: BuiltSet, device: torch.device, precision: str, work: Path, num_workers: int) -> dict:
    spec = built.spec
    out = work / "train" / f"{spec.key}_{str(device).replace(':', '')}_{precision}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(model=spec.model, pretrained=str(built.weights), image_size=spec.image_size,
                      features_list=list(spec.features), few_shot_features=list(spec.features),
                      train_data_path=str(built.data), save_path=str(out), batch_size=4, num_workers=num_workers,
                      device=str(device), precision=precision, epoch=1, k_shot=1, seed=0, augment="none")
    t = time.perf_counter()
    losses = Trainer(cfg).run()
    return {"set": spec.key, "device": str(device), "precision": precision, "epochs": 1, "loss": losses[-1],
            "wall_s": time.perf_counter() - t}


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [f"# FDSL GPU check ({env['device']})", "", "```", json.dumps(env, indent=1), "```", ""]
    lines += ["## Agreement (fp32, real Evaluator): per-image score, patch_score, map_max", ""]
    if any(a["degenerate"] for a in report["agreement"]):
        lines += ["Run with `--device cpu`: this compares the CPU with itself (degenerate; the CUDA check "
                  "needs a GPU).", ""]
    lines += ["| set | winmode | compared | images | max abs diff | ≤ 1e-4 | pixel AUROC | image AUROC |",
              "|---|---|---|---:|---:|---|---:|---:|"]
    for a in report["agreement"]:
        lines.append(f"| {a['set']} | {a['winmode']} | {a['against']} | {a['n_images']} | {a['max_abs_diff']:.2e} "
                     f"| {'PASS' if a['pass'] else 'FAIL'} | {a['pixel_auroc']:.4f} | {a['image_auroc']:.4f} |")
    lines += ["", "## Drift against fp32 on this device", "", DRIFT_HEADER]
    lines += [drift_line(r) for r in report["drift"]]
    lines += ["", "## Time per image (`FDSL.predict`) and peak GPU memory", "",
              "| set | model | px | win | winmode | precision | batch | win_batch | s/img | peak GPU MiB |",
              "|---|---|---:|---|---|---|---:|---:|---:|---:|"]
    for r in report["timing"]:
        peak = "n/a (CPU)" if r["peak_gpu_mb"] is None else f"{r['peak_gpu_mb']:,.0f}"
        lines.append(f"| {r['set']} | {r['model']} | {r['image_size']} | {r['win']} | {r['winmode']} "
                     f"| {r['precision']} | {r['batch']} | {r['win_batch'] or '–'} | {r['s_per_img']:.4f} | {peak} |")
    lines += ["", "## Training (real Trainer, 1 epoch)", "", "| set | device | precision | loss | wall s |",
              "|---|---|---|---:|---:|"]
    for t in report["training"]:
        lines.append(f"| {t['set']} | {t['device']} | {t['precision']} | {t['loss']:.4f} | {t['wall_s']:.1f} |")
    lines += ["", f"Total wall time: {report['wall_s']:.0f} s. Overall: {'PASS' if report['pass'] else 'FAIL'}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cuda:N, a CUDA index, cpu, or auto")
    p.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--work", default=None, help="folder for the sets and runs (default <out>/work)")
    p.add_argument("--quick", action="store_true", help="tiny set only, fewer settings (the CPU smoke test)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    workers = 2 if cuda else 0
    report: dict = {"env": environment(device), "quick": args.quick, "agreement": [], "drift": [], "timing": [],
                    "training": []}
    def save() -> None:
        report["pass"] = all(a["pass"] for a in report["agreement"])
        report["wall_s"] = time.perf_counter() - t0
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "gpu_check.md").write_text(markdown(report))

    reduced = ["bf16"] + (["fp16"] if cuda else [])  # CPU fp16 kernels are slow; tiny only on the CPU
    sets = [TINY_QUICK] if args.quick else [TINY, VITL]
    for spec in sets:
        built = build_set(spec, work, device=device)
        big = spec.model != TINY.model
        for winmode in ("nan", "mul"):
            model = load_model(built, winmode, torch.device("cpu"))
            report["agreement"].append(agreement(built, model, winmode, device, work, workers))
            save()
            settings = ["fp32/fp32", "bf16/fp32", "bf16/bf16"]
            if cuda or not big:
                settings += ["fp16/fp32", "fp16/fp16", "fp32/fp16"]
            if args.quick:
                settings = ["fp32/fp32", "bf16/fp32", "bf16/bf16"]
            report["drift"] += precision_rows(model, built, winmode, settings, device, batch=4)
            save()
            tb = [4] if args.quick else [1, 8]
            twb: list[int | None] = [16] if args.quick else [16, 64]
            timed = built
            if big and cuda and winmode == "mul":  # the default window geometry, 169 windows per image
                model.cfg = dataclasses.replace(model.cfg, win_stride=2)
                timed = dataclasses.replace(built, spec=dataclasses.replace(spec, win_stride=2))
            if cuda:  # warm-up: cuDNN and kernel start-up are not per-image costs
                run_pass(model, timed, runtime_cfg(str(device)), device, tb[-1], with_nn=False)
            report["timing"] += timing(model, timed, winmode, device, ["fp32"] + reduced, tb, twb)
            save()
            del model
            if cuda:
                torch.cuda.empty_cache()
    tiny = build_set(TINY_QUICK if args.quick else TINY, work, device=device)
    for prec in ["fp32"] + ([] if args.quick else reduced):
        report["training"].append(train_one_epoch(tiny, device, prec, work, workers))
    save()
    print(markdown(report))
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
