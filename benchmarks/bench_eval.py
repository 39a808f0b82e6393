"""Evaluation-time benchmark of FDSL: latency, its breakdown, peak memory, metric cost.

What it measures (see benchmarks/README.md for figures):

* per-image evaluation latency -- backbone extract + alignment + scorers + NAM + upsample to
  ``--out_size`` (240) -- for every ``--precision`` x ``--batch`` x ``--winmode``; warm-up
  iterations are excluded and the median of ``--iters`` timed iterations is reported;
* a breakdown: backbone (``FDSL.extract``) vs alignment + head (``FDSL.score``) per image
  (global branch only; window rows report the end-to-end ``forward`` time);
* memory: each configuration runs in a fresh child process (this script re-invoked with the
  hidden ``--child`` flag, result returned as JSON on stdout), so peaks do not mix. Reported:
  RSS after the model is built, the peak RSS increase during evaluation (the kernel's VmHWM is
  reset through /proc/self/clear_refs just before), the whole-process peak (ru_maxrss, which
  includes the build), the model's weight bytes (unique storages) and how many ViT modules it
  holds, and ``torch.cuda.max_memory_allocated`` on CUDA;
* ``fdsl.metrics.aupro`` and ``fdsl.metrics.pixel_metrics`` time on ``--metric_maps`` (1000)
  random ``--metric_size``² (240²) maps with blob masks (also in a child process).

The window branch (LFE, ``--winmode mul``/``onlywin``) is a hook: while the library rejects it
with ConfigError the rows are printed as skipped; once it exists, compare LFE on vs off, and the
``weights MB`` / ``ViTs`` columns show whether the window branch holds a second copy of the ViT.

Random weights (``--pretrained none``, the default here) do not change speed.

    .venv/bin/python benchmarks/bench_eval.py --json /tmp/bench_eval.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from procstats import cpu_model, hwm_mb, loadavg, maxrss_mb, reset_hwm, rss_mb

ROOT = Path(__file__).resolve().parents[1]

MARK = "@@BENCH_RESULT@@ "


# ----------------------------------------------------------------------------- process facts


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# ----------------------------------------------------------------------------- child: model
def _weight_stats(model) -> dict[str, Any]:
    """Bytes of the model's unique tensor storages and the number of ViT modules it holds."""
    try:
        from open_clip.transformer import VisionTransformer
    except ImportError:  # pragma: no cover
        VisionTransformer = ()  # type: ignore[assignment]
    seen = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        key = (st.data_ptr(), t.device.type)
        if key in seen or st.nbytes() == 0:
            continue
        seen.add(key)
        total += st.nbytes()
    vits = [m for m in model.modules() if VisionTransformer and isinstance(m, VisionTransformer)]
    vit_storages = set()
    for m in vits:  # two modules sharing their weights count once
        vit_storages.add(tuple(sorted(p.untyped_storage().data_ptr() for p in m.parameters())))
    vit_bytes = sum(p.numel() * p.element_size() for p in vits[0].parameters()) if vits else 0
    return {"weights_mb": total / 2 ** 20, "vit_modules": len(vits), "vit_weight_copies": len(vit_storages),
            "vit_mb": vit_bytes / 2 ** 20}


def _bank_mb(model) -> float | None:
    """MiB held by the fitted memory (global and window banks), whatever the model calls it."""
    from torch import nn

    mem = getattr(model, "memory", None)
    if mem is None:
        mem = getattr(model, "bank", None)
    if mem is None:
        return None
    if hasattr(mem, "nbytes"):
        return mem.nbytes() / 2 ** 20
    if isinstance(mem, nn.Module):
        return sum(b.numel() * b.element_size() for b in mem.buffers()) / 2 ** 20
    return None


def child_model(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from fdsl.config import ModelConfig
    from fdsl.errors import ConfigError
    from fdsl.model import FDSL
    from fdsl.utils import resolve_device, resolve_precision

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    out: dict[str, Any] = {"status": "ok", "load_before": loadavg()}
    device = resolve_device(spec["device"])
    dtype = resolve_precision(spec["precision"], device)
    rss_start = rss_mb()
    cfg = ModelConfig(model=spec["model"], pretrained=spec["pretrained"], image_size=spec["image_size"],
                      features_list=list(spec["features"]), few_shot_features=list(spec["features"]),
                      use_nam=True, winmode=spec["winmode"], win_size=spec["win_size"],
                      win_stride=spec["win_stride"])
    t0 = time.perf_counter()
    try:
        model = FDSL.from_config(cfg)
    except ConfigError as exc:
        return {"status": "skipped", "reason": f"ConfigError: {exc}"}
    model.eval().to(device)
    model.set_precision(dtype)
    model.out_size = spec["out_size"]
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    sync()
    out["build_s"] = time.perf_counter() - t0
    out["rss_start_mb"] = rss_start
    out["rss_built_mb"] = rss_mb()
    out.update(_weight_stats(model))
    if cuda:
        out["cuda_weights_mb"] = torch.cuda.memory_allocated(device) / 2 ** 20

    S = spec["image_size"]
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(spec["k_shot"], 3, S, S, generator=g).to(device)
    x = torch.randn(spec["batch"], 3, S, S, generator=g).to(device)
    x_warm = x[: spec.get("warmup_batch") or spec["batch"]]
    t0 = time.perf_counter()
    model.fit(ref)
    sync()
    out["fit_s"] = time.perf_counter() - t0
    out["bank_mb"] = _bank_mb(model)

    # Time forward() end to end; split it by timing every call of model.extract (the backbone) from
    # inside: calls at the full input size are the global branch, smaller ones are LFE windows.
    # Whatever forward() does besides (alignment, scorers, NAM, stitching, upsampling) is the head.
    calls: list[tuple] = []
    extract = model.extract

    def timed_extract(images, *a, **kw):
        sync()
        t = time.perf_counter()
        feats = extract(images, *a, **kw)
        sync()
        calls.append((int(images.shape[-1]), time.perf_counter() - t))
        return feats

    model.extract = timed_extract  # instance attribute: forward()'s self.extract finds it first
    totals: list[float] = []
    backbone: list[float] = []
    win_backbone: list[float] = []
    head: list[float] = []
    out["hwm_reset"] = reset_hwm()
    rss_eval0 = rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    result = None
    with torch.no_grad():
        for it in range(spec["warmup"] + spec["iters"]):
            calls.clear()
            sync()
            t0 = time.perf_counter()
            result = model(x if it >= spec["warmup"] else x_warm)
            sync()
            total = time.perf_counter() - t0
            if it >= spec["warmup"]:
                g = sum(dt for side, dt in calls if side == S)
                w = sum(dt for side, dt in calls if side != S)
                totals.append(total)
                backbone.append(g)
                win_backbone.append(w)
                head.append(total - g - w)
            out["extract_calls"] = len(calls)
    model.extract = extract
    B = spec["batch"]
    out["iter_s"] = totals
    out["per_image_s"] = _median(totals) / B
    out["backbone_per_image_s"] = _median(backbone) / B
    out["window_backbone_per_image_s"] = _median(win_backbone) / B if spec["winmode"] != "nan" else None
    out["head_per_image_s"] = _median(head) / B
    out["images_per_s"] = B / _median(totals)
    out["rss_eval_start_mb"] = rss_eval0
    peak = hwm_mb()
    out["eval_peak_rss_mb"] = peak if out["hwm_reset"] else None
    out["eval_rss_increase_mb"] = (peak - rss_eval0) if (out["hwm_reset"] and peak and rss_eval0) else None
    out["process_peak_rss_mb"] = maxrss_mb()
    if cuda:
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    amap = result.anomaly_map
    out["map_shape"] = list(amap.shape)
    out["finite"] = bool(torch.isfinite(amap).all()) and bool(torch.isfinite(result.pred_score).all())
    out["load_after"] = loadavg()
    return out


# ----------------------------------------------------------------------------- child: metrics
def blob_masks(n: int, size: int, rng, anomalous_frac: float = 0.5):
    """(n, size, size) bool masks: a fraction of the images hold 1-3 random ellipses."""
    import numpy as np

    masks = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in np.flatnonzero(rng.random(n) < anomalous_frac):
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(3, size / 6, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return masks


def child_metrics(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from fdsl.metrics import aupro, pixel_metrics

    rng = np.random.default_rng(0)
    n, size = spec["metric_maps"], spec["metric_size"]
    t0 = time.perf_counter()
    masks = blob_masks(n, size, rng)
    maps = rng.random((n, size, size), dtype=np.float32)
    maps[masks] += 0.35  # anomalies score higher on average: a non-trivial curve
    out: dict[str, Any] = {"status": "ok", "gen_s": time.perf_counter() - t0, "load_before": loadavg(),
                           "n_maps": n, "size": size, "anomalous_maps": int(masks.any(axis=(1, 2)).sum()),
                           "anomalous_pixel_frac": float(masks.mean())}
    out["hwm_reset"] = reset_hwm()
    rss0 = rss_mb()
    timings: dict[str, list[float]] = {"aupro": [], "pixel_metrics": [], "pixel_metrics_no_aupro": []}
    values: dict[str, Any] = {}
    for _ in range(spec["metric_iters"]):
        t0 = time.perf_counter()
        values["aupro"] = aupro(masks, maps)
        timings["aupro"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        values["pixel_metrics"] = pixel_metrics(masks, maps, with_aupro=True)
        timings["pixel_metrics"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pixel_metrics(masks, maps, with_aupro=False)
        timings["pixel_metrics_no_aupro"].append(time.perf_counter() - t0)
    for k, v in timings.items():
        out[f"{k}_s"] = _median(v)
        out[f"{k}_iter_s"] = v
    out["values"] = values
    out["aupro_consistent"] = abs(values["aupro"] - values["pixel_metrics"]["aupro"]) < 1e-9
    peak = hwm_mb()
    out["eval_rss_increase_mb"] = (peak - rss0) if (out["hwm_reset"] and peak and rss0) else None
    out["process_peak_rss_mb"] = maxrss_mb()
    out["load_after"] = loadavg()
    return out


def run_child(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    try:
        res = child_model(spec) if spec["kind"] == "model" else child_metrics(spec)
    except Exception as exc:  # noqa: BLE001 -- report, do not hide: the parent prints it
        import traceback

        traceback.print_exc()
        res = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(MARK + json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0


# ----------------------------------------------------------------------------- parent
def spawn(spec: dict[str, Any], timeout: float, verbose: bool) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if verbose else subprocess.PIPE,
                              text=True, timeout=timeout, cwd=str(ROOT), check=False)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"child ran past {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    res = None
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            res = json.loads(line[len(MARK):])
    if res is None:
        tail = (proc.stderr or "")[-2000:]
        res = {"status": "error", "reason": f"child exited {proc.returncode} without a result", "stderr_tail": tail}
    elif res.get("status") == "error" and proc.stderr:
        res["stderr_tail"] = proc.stderr[-2000:]
    res["wall_s"] = time.perf_counter() - t0
    return res


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def print_model_table(rows: list[dict[str, Any]]) -> None:
    head = ["winmode", "prec", "batch", "s/img", "backbone s/img", "win backbone s/img", "align+head s/img",
            "img/s", "fit s", "bank MB", "RSS built MB", "eval +RSS MB", "peak RSS MB", "cuda peak MB",
            "weights MB", "ViTs", "load"]
    lines = [head]
    for r in rows:
        if r.get("status") != "ok":
            lines.append([r["winmode"], r["precision"], str(r["batch"]), r.get("status", "?"),
                          (r.get("reason") or "")[:60]] + [""] * (len(head) - 5))
            continue
        ld = r.get("load_before") or [None]
        lines.append([r["winmode"], r["precision"], str(r["batch"]), _fmt(r["per_image_s"], 3),
                      _fmt(r["backbone_per_image_s"], 3), _fmt(r.get("window_backbone_per_image_s"), 3),
                      _fmt(r["head_per_image_s"], 3), _fmt(r["images_per_s"], 3), _fmt(r["fit_s"]),
                      _fmt(r.get("bank_mb"), 1), _fmt(r["rss_built_mb"], 0),
                      _fmt(r["eval_rss_increase_mb"], 0), _fmt(r["process_peak_rss_mb"], 0),
                      _fmt(r.get("cuda_peak_mb"), 0), _fmt(r["weights_mb"], 0),
                      f'{r["vit_modules"]}/{r["vit_weight_copies"]}', _fmt(ld[0])])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    for j, line in enumerate(lines):
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |")
        if j == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return run_child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (figures are per image)")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16", "auto"])
    p.add_argument("--iters", type=int, default=3, help="timed iterations per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up iterations per configuration")
    p.add_argument("--warmup_batch", type=int, default=0,
                   help="batch size of the warm-up iterations (0: the timed batch size); a smaller one saves "
                        "time on slow CPUs")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or a CUDA index")
    p.add_argument("--winmode", nargs="+", default=["nan"], choices=["nan", "mul", "onlywin"],
                   help="global branch only (nan) and/or with the LFE window branch")
    p.add_argument("--win_size", type=int, default=13)
    p.add_argument("--win_stride", type=int, default=2)
    p.add_argument("--model", default="ViT-L-14-336")
    p.add_argument("--pretrained", default="none", help="'none' = random weights (speed is the same)")
    p.add_argument("--image_size", type=int, default=518)
    p.add_argument("--features", type=int, nargs="+", default=[6, 12, 18, 24])
    p.add_argument("--k_shot", type=int, default=1, help="reference images in the memory bank")
    p.add_argument("--out_size", type=int, default=240, help="anomaly-map evaluation size")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads")
    p.add_argument("--metric_maps", type=int, default=1000)
    p.add_argument("--metric_size", type=int, default=240)
    p.add_argument("--metric_iters", type=int, default=3)
    p.add_argument("--skip_metrics", action="store_true", help="do not time aupro / pixel_metrics")
    p.add_argument("--skip_model", action="store_true", help="do not time the model")
    p.add_argument("--child_timeout", type=float, default=1800.0, help="seconds before a child is abandoned")
    p.add_argument("--json", default=None, help="also write all figures to this JSON file")
    p.add_argument("--verbose", action="store_true", help="show the children's stderr (library logs)")
    args = p.parse_args(argv)

    import torch

    from fdsl.utils import resolve_device

    device = resolve_device(args.device)  # fail here, not in every child, when CUDA is absent
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": _version("open_clip"),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_avg_start": loadavg(),
        "mem_total_gb": _mem_total_gb(),
    }
    print(f"date {env['date']}  host {env['host']}")
    print(f"torch {env['torch']}  open_clip {env['open_clip']}  python {env['python']}")
    print(f"cpu {env['cpu_model']}  cpu_count {env['cpu_count']}  threads {args.threads}  "
          f"RAM {env['mem_total_gb']} GB  device {env['device']}"
          + (f" ({env['cuda_device']})" if env["cuda_device"] else ""))
    print(f"load average (1/5/15 min) at start: {env['load_avg_start']}")
    print(f"model {args.model} @ {args.image_size}px, features {args.features}, pretrained={args.pretrained}, "
          f"NAM on, {args.k_shot}-shot bank, maps upsampled to {args.out_size}; "
          f"warm-up {args.warmup}" + (f" (batch {args.warmup_batch})" if args.warmup_batch else "")
          + f", median of {args.iters}")
    sys.stdout.flush()

    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    signal.signal(signal.SIGTERM, _raise_interrupt)
    interrupted = False
    metrics = None
    try:
        _run_all(args, rows)
        if not args.skip_metrics:
            spec = {"kind": "metrics", "metric_maps": args.metric_maps, "metric_size": args.metric_size,
                    "metric_iters": args.metric_iters}
            print(f"[run] metrics on {args.metric_maps} maps of {args.metric_size}x{args.metric_size} ...",
                  end=" ", flush=True)
            metrics = spawn(spec, args.child_timeout, args.verbose)
            print(metrics["status"], flush=True)
    except KeyboardInterrupt:  # the running child is killed by subprocess.run; report what was measured
        interrupted = True
        print("\n[interrupted] reporting the configurations measured so far", flush=True)
    env["interrupted"] = interrupted
    _report(args, env, rows, metrics, t_start)
    bad = [r for r in rows if r.get("status") in ("error", "timeout")]
    if metrics is not None and metrics.get("status") != "ok":
        bad.append(metrics)
    return 1 if (bad or interrupted) else 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _run_all(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """One child process per (winmode, precision, batch); results appended to `rows`."""
    from fdsl.config import ModelConfig
    from fdsl.errors import ConfigError

    if not args.skip_model:
        for winmode in args.winmode:
            cfg = ModelConfig(model=args.model, pretrained=args.pretrained, image_size=args.image_size,
                              features_list=list(args.features), few_shot_features=list(args.features),
                              winmode=winmode, win_size=args.win_size, win_stride=args.win_stride)
            try:
                cfg.validate()
            except ConfigError as exc:  # e.g. LFE not implemented yet: report and skip, do not fail
                print(f"[skip] winmode={winmode}: ConfigError: {exc}")
                for prec in args.precision:
                    for b in args.batch:
                        rows.append({"winmode": winmode, "precision": prec, "batch": b, "status": "skipped",
                                     "reason": f"ConfigError: {exc}"})
                continue
            rejected = None
            for prec in args.precision:
                for b in args.batch:
                    if rejected:  # the library refused this winmode at build time: skip its other rows
                        rows.append({"winmode": winmode, "precision": prec, "batch": b, "status": "skipped",
                                     "reason": rejected})
                        continue
                    spec = {"kind": "model", "model": args.model, "pretrained": args.pretrained,
                            "image_size": args.image_size, "features": args.features, "k_shot": args.k_shot,
                            "out_size": args.out_size, "threads": args.threads, "device": args.device,
                            "precision": prec, "batch": b, "winmode": winmode, "win_size": args.win_size,
                            "win_stride": args.win_stride, "iters": args.iters, "warmup": args.warmup,
                            "warmup_batch": args.warmup_batch or b}
                    print(f"[run] winmode={winmode} precision={prec} batch={b} ...", end=" ", flush=True)
                    res = spawn(spec, args.child_timeout, args.verbose)
                    res.update({"winmode": winmode, "precision": prec, "batch": b})
                    rows.append(res)
                    if res["status"] == "ok":
                        print(f"{res['per_image_s']:.3f} s/img (child {res['wall_s']:.0f} s, "
                              f"load {res.get('load_before')})", flush=True)
                    else:
                        print(f"{res['status']}: {res.get('reason')}", flush=True)
                        if res.get("stderr_tail"):
                            print(res["stderr_tail"], file=sys.stderr)
                        if res["status"] == "skipped":  # the library rejected this winmode
                            print(f"[skip] winmode={winmode}: {res.get('reason')}")
                            rejected = res.get("reason")


def _report(args: argparse.Namespace, env: dict[str, Any], rows: list[dict[str, Any]],
            metrics: dict[str, Any] | None, t_start: float) -> None:
    """Print the tables and write the JSON file."""
    env["load_avg_end"] = loadavg()
    env["total_wall_s"] = time.perf_counter() - t_start
    print()
    if rows:
        print("Evaluation latency and memory (per image; median of timed iterations). "
              "eval +RSS: peak RSS increase during evaluation; peak RSS: whole child process incl. build; "
              "ViTs: ViT modules / distinct weight copies; load: 1-min load average before the run.")
        print_model_table(rows)
        print()
    if metrics is not None:
        if metrics.get("status") == "ok":
            print(f"Metrics on {metrics['n_maps']} maps of {metrics['size']}x{metrics['size']} "
                  f"({metrics['anomalous_maps']} with blobs, {100 * metrics['anomalous_pixel_frac']:.2f}% "
                  f"anomalous pixels), median of {args.metric_iters}:")
            print("| aupro s | pixel_metrics (with aupro) s | pixel_metrics (no aupro) s | eval +RSS MB |")
            print("|---|---|---|---|")
            print(f"| {metrics['aupro_s']:.2f} | {metrics['pixel_metrics_s']:.2f} | "
                  f"{metrics['pixel_metrics_no_aupro_s']:.2f} | {_fmt(metrics['eval_rss_increase_mb'], 0)} |")
        else:
            print(f"metrics: {metrics.get('status')}: {metrics.get('reason')}")
            if metrics.get("stderr_tail"):
                print(metrics["stderr_tail"], file=sys.stderr)
    print(f"\nload average at end: {env['load_avg_end']}; total {env['total_wall_s']:.0f} s")

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"env": env, "args": vars(args), "model": rows, "metrics": metrics}, fh, indent=2)
            fh.write("\n")
        print(f"wrote {args.json}")


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except (ImportError, AttributeError):
        return None


def _mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return None


if __name__ == "__main__":
    sys.exit(main())
