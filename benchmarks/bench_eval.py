"""Evaluation-time benchmark of FDSL: latency, where it goes against its FLOP floor, peak memory, metrics.

For every ``--winmode`` × ``--precision`` × ``--batch`` (one fresh child process each, see
`common.py`), at ViT-L-14-336 / 518 px by default with random weights (speed does not depend on
the weights), it reports:

* end to end: ``FDSL.predict`` per image (backbone, alignment, scorers, NAM, stitching, upsampling
  to ``--out_size``), the median of ``--iters`` runs after ``--warmup`` (``--no_e2e`` skips it);
* the split, by calling the library's steps one by one as ``predict`` does: global backbone
  (``FDSL.extract``), global alignment (``FDSL.residuals``), global scorers + NAM; and for LFE,
  window encoding (``FDSL.window_chunks``), window alignment, window scorers (``head.raw``) and
  stitching + NAM + layer combination. ``--lfe_chunks N`` measures only the first N chunks of
  ``--win_batch`` windows and extrapolates linearly to all windows (every per-window cost is
  linear in the number of windows); stitching + NAM is always measured in full;
* next to each part its FLOP floor: FLOPs counted analytically (ViT: 2·weights·tokens per window
  plus 4·T²·C per block for attention; alignment: 2·Q·M·C per layer; scorers: 2·tokens·weights)
  divided by this CPU's large-GEMM throughput in the part's dtype, measured in the same child;
* ``--compare_pixel_crops``: on the measured chunks, the previous window path (crop pixels, run
  ``conv1`` on every window) timed interleaved with the current one (``conv1`` once per image,
  patch-embedding grids cropped), and the largest difference of their features;
* memory: RSS once the model is built, the peak RSS increase during evaluation (VmHWM reset just
  before) and the whole child's peak (ru_maxrss, model build included), the window and global
  bank sizes, and how many ViT modules / weight copies the model holds;
* ``fdsl.metrics.metrics.aupro`` and ``pixel_metrics`` time on ``--metric_maps`` random maps (a child too).

    python -m benchmarks.bench_eval --winmode nan mul --precision fp32 bf16 --batch 1 --json /tmp/eval.json
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from typing import Any

from benchmarks.common import (
    Result,
    environment,
    fmt,
    gemm_gflops,
    hwm_mb,
    loadavg,
    maxrss_mb,
    print_environment,
    reset_hwm,
    rss_mb,
    spawn,
    table,
    write_json,
)
from benchmarks.common import child_main as _child_main

MODULE = "benchmarks.bench_eval"  # children run as python -m MODULE --child SPEC
PARTS = [("global_backbone", "global backbone"), ("global_align", "global alignment"),
         ("global_head", "global scorers + NAM"), ("win_encode", "window encoding"),
         ("win_align", "window alignment"), ("win_score", "window scorers"),
         ("win_stitch", "stitching + NAM + layer mean")]


# ----------------------------------------------------------------------------- FLOP model
def _weights_flop(module) -> int:
    """2 × the weights of the module's matrix products (parameters of dim ≥ 2): FLOPs per token."""
    return 2 * sum(p.numel() for p in module.parameters() if p.dim() >= 2)


def vit_flops(bb, grid: int) -> float:
    """FLOPs of one ViT pass over a grid×grid input (class token included), patch embedding excluded."""
    T = grid * grid + 1
    blocks = bb.visual.transformer
    return _weights_flop(blocks) * T + 4.0 * T * T * bb.width * bb.depth


def flop_model(model, B: int, k: int) -> dict[str, float]:
    """FLOPs per part for a batch of B query images against a k-shot memory (2 per multiply-add)."""
    from fdsl.core.windows import n_windows

    bb, cfg = model.backbone, model.cfg
    G, W, C, L = bb.grid_size, cfg.win_size, bb.width, len(bb.layers)
    conv = 2.0 * bb.visual.conv1.weight[0].numel() * C * G * G  # per image
    scorer = sum(_weights_flop(s) for s in model.head.scorers) / L  # per token and layer
    out = {"global_backbone": B * (conv + vit_flops(bb, G)),
           "global_align": L * 2.0 * (B * G * G) * (k * G * G) * C,
           "global_head": L * scorer * B * G * G}
    if cfg.winmode != "nan":
        nw = n_windows(G, W, cfg.win_stride)
        q = B * nw * W * W  # query window tokens
        m = W * W if cfg.use_img_idx else k * nw * W * W  # bank tokens each query token is compared with
        out.update(win_encode=B * (conv + nw * vit_flops(bb, W)), win_align=L * 2.0 * q * m * C,
                   win_score=L * scorer * q)
    return out


# ----------------------------------------------------------------------------- child: model
def _weight_stats(model) -> Result:
    """Bytes of the model's unique tensor storages and the number of ViT modules / weight copies it holds."""
    from open_clip.transformer import VisionTransformer

    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        if st.data_ptr() in seen or st.nbytes() == 0:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    vits = [m for m in model.modules() if isinstance(m, VisionTransformer)]
    copies = {tuple(sorted(p.untyped_storage().data_ptr() for p in m.parameters())) for m in vits}
    return {"weights_mb": total / 2 ** 20, "vit_modules": len(vits), "vit_weight_copies": len(copies)}


class _Clock:
    """Accumulates wall time per part (no hooks into the library: each step is called and timed here)."""

    def __init__(self, sync) -> None:
        self.sync = sync
        self.t: dict[str, float] = {}

    def __call__(self, part: str, fn, *a, **kw):
        self.sync()
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        self.sync()
        self.t[part] = self.t.get(part, 0.0) + time.perf_counter() - t0
        return out


def _split(model, x, mem, spec: Result, sync) -> Result:
    """Time predict's steps one by one (see the module docstring); per-window parts extrapolated."""
    import torch

    from fdsl.core.model import combine_layers
    from fdsl.core.runtime import autocast
    from fdsl.core.windows import n_windows, split_windows, stitch_windows

    clock = _Clock(sync)
    size = model.runtime.out_size
    out: Result = {}
    if model.cfg.winmode != "onlywin":
        feats = clock("global_backbone", model.extract, x)
        res = clock("global_align", model.residuals, mem.global_bank, feats)
        clock("global_head", lambda: combine_layers([m[:, 1] for m in model.head(res)[1]], size))
    if model.cfg.winmode == "nan":
        return {"split_s": clock.t, "windows_measured": 0, "windows_total": 0}
    cfg, bb = model.cfg, model.backbone
    G, W = bb.grid_size, cfg.win_size
    B, nw = x.shape[0], n_windows(G, W, cfg.win_stride)
    total = B * nw
    L = len(model.head.scorers)
    probs = [torch.zeros(total, 2, W, W) for _ in range(L)]
    chunks = model.window_chunks(x)
    done, max_diff, pixel_s, patch_s = 0, 0.0, 0.0, 0.0
    while spec["lfe_chunks"] <= 0 or done < spec["lfe_chunks"] * model.runtime.win_batch:
        t_before = clock.t.get("win_encode", 0.0)
        feats = clock("win_encode", next, chunks, None)
        if feats is None:
            break
        n = feats.image_embeds.shape[0]
        if spec["compare_pixel_crops"]:  # the previous path on the same windows: conv1 on every pixel crop
            patch_s += clock.t["win_encode"] - t_before
            index = torch.arange(done, done + n, device=x.device)
            sync()
            t0 = time.perf_counter()
            with autocast(model.device, model.runtime.compute_dtype):
                old = bb(split_windows(x, bb.patch_size, W, cfg.win_stride, index))
            sync()
            pixel_s += time.perf_counter() - t0
            max_diff = max([max_diff] + [float((a - b).abs().max()) for a, b in zip(old.tokens, feats.tokens)])
        res = clock("win_align", model.residuals, mem.window_bank, feats)
        raw = clock("win_score", model.head.raw, res)
        for p, r in zip(probs, raw):
            p[done:done + n] = r
        done += n
    frac = done / total
    for part in ("win_encode", "win_align", "win_score"):
        clock.t[part] /= frac  # linear extrapolation to all windows (exact when frac == 1)

    def stitch():
        st = [stitch_windows(p.reshape(B, nw, 2, W, W), G, W, cfg.win_stride) for p in probs]
        return combine_layers([m[:, 1] for m in model.head.refine(st)], size)

    clock("win_stitch", stitch)
    out.update(split_s=clock.t, windows_measured=done, windows_total=total)
    if spec["compare_pixel_crops"]:
        out.update(pixel_crops_s=pixel_s / frac, patch_crops_s=patch_s / frac, crops_max_abs_diff=max_diff)
    return out


def _synthetic_refs(model, ref):
    """Reference features with real global features and random unit window tokens of the real shapes.

    Encoding the k·169 reference windows costs as much as scoring an image's windows; the alignment's
    cost does not depend on the token values, so split-only runs can skip it (``--bank synthetic``).
    """
    import torch
    import torch.nn.functional as F

    from fdsl.core.features import BackboneOutput
    from fdsl.core.model import RefFeatures
    from fdsl.core.windows import n_windows

    g = model.encode_references(ref, windows=False).global_feats
    if not model.use_windows:
        return RefFeatures(g, None)
    bb, cfg = model.backbone, model.cfg
    n = ref.shape[0] * n_windows(bb.grid_size, cfg.win_size, cfg.win_stride)
    gen = torch.Generator().manual_seed(1)
    toks = [F.normalize(torch.randn(n, cfg.win_size ** 2, bb.width, generator=gen), dim=-1)
            .to(model.runtime.bank_dtype) for _ in bb.layers]  # L × (k·nw, W², C)
    emb = F.normalize(torch.randn(n, bb.embed_dim, generator=gen), dim=-1)  # (k·nw, D)
    return RefFeatures(g, BackboneOutput(toks, emb))


def child_model(spec: Result) -> Result:
    import torch

    from fdsl.config import ModelConfig, RuntimeConfig
    from fdsl.core.model import FDSL
    from fdsl.core.runtime import resolve_device, resolve_runtime

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    out: Result = {"status": "ok", "load_before": loadavg()}
    device = resolve_device(spec["device"])
    cfg = ModelConfig(model=spec["model"], pretrained=spec["pretrained"], image_size=spec["image_size"],
                      features_list=list(spec["features"]), few_shot_features=list(spec["features"]),
                      use_nam=True, winmode=spec["winmode"], win_size=spec["win_size"],
                      win_stride=spec["win_stride"], use_img_idx=spec["use_img_idx"])
    runtime = resolve_runtime(RuntimeConfig(device=str(device), precision=spec["precision"],
                                            bank_dtype=spec["bank_dtype"], win_batch=spec["win_batch"],
                                            align_chunk_mb=spec["align_chunk_mb"]), device, spec["out_size"])
    if spec["align"] == "fp32":
        runtime = dataclasses.replace(runtime, align_dtype=None)  # tokens are fp32: the product runs in fp32
    elif spec["align"] == "compute" and runtime.compute_dtype != torch.float32:
        runtime = dataclasses.replace(runtime, align_dtype=runtime.compute_dtype)
    align_dtype = runtime.align_dtype or torch.float32
    out["runtime"] = {f.name: str(getattr(runtime, f.name)) for f in dataclasses.fields(runtime)}
    rss_start = rss_mb()
    t0 = time.perf_counter()
    model = FDSL.from_config(cfg, runtime).eval().to(device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    out.update(build_s=time.perf_counter() - t0, rss_start_mb=rss_start, rss_built_mb=rss_mb(),
               **_weight_stats(model))
    S = spec["image_size"]
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(spec["k_shot"], 3, S, S, generator=g).to(device)
    x = torch.randn(spec["batch"], 3, S, S, generator=g).to(device)
    out["hwm_reset"] = reset_hwm()
    rss_eval0 = rss_mb()
    t0 = time.perf_counter()
    if spec["bank"] == "synthetic":  # window bank of the right shape from random unit tokens: same cost to search
        mem = model.make_memory(_synthetic_refs(model, ref))
    else:
        mem = model.make_memory(model.encode_references(ref))
    sync()
    out["fit_s"] = time.perf_counter() - t0
    out["bank_mb"] = mem.nbytes() / 2 ** 20
    out["window_bank_mb"] = mem.window_bank.nbytes() / 2 ** 20 if mem.window_bank is not None else None
    B = spec["batch"]
    with torch.no_grad():
        if spec["e2e"]:
            totals = []
            for it in range(spec["warmup"] + spec["iters"]):
                sync()
                t0 = time.perf_counter()
                result = model.predict(x, [mem])[0]
                sync()
                if it >= spec["warmup"]:
                    totals.append(time.perf_counter() - t0)
            out["iter_s"] = totals
            out["per_image_s"] = statistics.median(totals) / B
            out["finite"] = bool(torch.isfinite(result.anomaly_map).all() and torch.isfinite(result.pred_score).all())
        if spec["split"]:
            out.update(_split(model, x, mem, spec, sync))
    peak = hwm_mb()
    out["eval_rss_increase_mb"] = (peak - rss_eval0) if (out["hwm_reset"] and peak and rss_eval0) else None
    out["process_peak_rss_mb"] = maxrss_mb()
    if cuda:
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    # FLOP floors: this CPU's large-GEMM rate in each part's dtype, measured now, in this process
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    rates = {n: gemm_gflops(n) for n in sorted({"fp32", names[runtime.compute_dtype], names[align_dtype]})}
    out["gemm_gflops"] = rates
    dtype_of = {"global_backbone": names[runtime.compute_dtype], "win_encode": names[runtime.compute_dtype],
                "global_align": names[align_dtype], "win_align": names[align_dtype]}
    flops = flop_model(model, B, spec["k_shot"])
    out["gflop"] = {k: v / 1e9 for k, v in flops.items()}
    out["floor_s"] = {k: v / (rates[dtype_of.get(k, "fp32")] * 1e9) for k, v in flops.items()}
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

    from fdsl.metrics.metrics import aupro, pixel_metrics

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
        out[f"{k}_s"] = statistics.median(v)
        out[f"{k}_iter_s"] = v
    out["values"] = values
    out["aupro_consistent"] = abs(values["aupro"] - values["pixel_metrics"]["aupro"]) < 1e-9
    peak = hwm_mb()
    out["eval_rss_increase_mb"] = (peak - rss0) if (out["hwm_reset"] and peak and rss0) else None
    out["process_peak_rss_mb"] = maxrss_mb()
    out["load_after"] = loadavg()
    return out


def _child(spec: Result) -> Result:
    return child_model(spec) if spec["kind"] == "model" else child_metrics(spec)


# ----------------------------------------------------------------------------- parent
def print_rows(rows: list[Result]) -> None:
    """The summary table: one row per configuration."""
    lines = []
    for r in rows:
        key = [r["winmode"], r["precision"], r["align"], str(r["batch"])]
        if r.get("status") != "ok":
            lines.append(key + [r.get("status", "?"), (r.get("reason") or "")[:50]] + [""] * 6)
            continue
        split = r.get("split_s") or {}
        split_total = sum(split.values()) / r["batch"] if split else None
        lines.append(key + [fmt(r.get("per_image_s"), 1), fmt(split_total, 1), fmt(r["fit_s"], 1),
                            fmt(r.get("window_bank_mb"), 1), fmt(r["bank_mb"], 1), fmt(r["process_peak_rss_mb"], 0),
                            f'{r["vit_modules"]}/{r["vit_weight_copies"]}', fmt((r.get("load_before") or [None])[0])])
    print(table(["winmode", "precision", "align", "batch", "e2e s/img", "split sum s/img", "fit s", "win bank MB",
                 "bank MB", "peak RSS MB", "ViTs", "load"], lines))


def print_split(r: Result) -> None:
    """Where one configuration's time goes, part by part, against each part's FLOP floor."""
    split, B = r["split_s"], r["batch"]
    total = sum(split.values())
    rows = []
    for part, label in PARTS:
        if part not in split:
            continue
        s, floor = split[part] / B, r["floor_s"].get(part)
        gflop = r["gflop"].get(part)
        rows.append([label, fmt(s, 2), f"{100 * split[part] / total:.0f}%",
                     fmt(gflop / B, 0) if gflop else "-",
                     fmt(floor / B, 2) if floor else "-", fmt(s / (floor / B), 1) if floor else "-"])
    note = ""
    if r["windows_total"] and r["windows_measured"] < r["windows_total"]:
        note = (f" (window encoding/alignment/scorers measured on {r['windows_measured']} of "
                f"{r['windows_total']} windows, extrapolated linearly)")
    rates = ", ".join(f"{k} {v:.0f}" for k, v in r["gemm_gflops"].items())
    print(f"\n### winmode {r['winmode']}, {r['precision']}, alignment {r['align']}, batch {B}: "
          f"{total / B:.1f} s/img{note}; GEMM GFLOP/s {rates}\n")
    print(table(["part", "s/img", "share", "GFLOP/img", "floor s/img", "× floor"], rows))
    if "pixel_crops_s" in r:
        print(f"\nwindow encoding, previous path (conv1 on every pixel crop) {r['pixel_crops_s'] / B:.2f} s/img vs "
              f"current (conv1 once per image, cropped) {r['patch_crops_s'] / B:.2f} s/img, interleaved: "
              f"{r['pixel_crops_s'] / r['patch_crops_s']:.2f}×; largest feature difference "
              f"{r['crops_max_abs_diff']:.1e}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rc = _child_main(argv, _child)
    if rc is not None:
        return rc
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--winmode", nargs="+", default=["nan", "mul"], choices=["nan", "mul", "onlywin"])
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16", "auto"])
    p.add_argument("--align", nargs="+", default=["default"], choices=["default", "fp32", "compute"],
                   help="dtype of the similarity product: the runtime's default, fp32, or the compute dtype")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (figures are per image)")
    p.add_argument("--iters", type=int, default=1, help="timed end-to-end iterations (median reported)")
    p.add_argument("--warmup", type=int, default=0, help="untimed end-to-end iterations first")
    p.add_argument("--no_e2e", dest="e2e", action="store_false", help="skip the end-to-end predict timing")
    p.add_argument("--no_split", dest="split", action="store_false", help="skip the part-by-part split")
    p.add_argument("--lfe_chunks", type=int, default=0,
                   help="split: measure only the first N window chunks and extrapolate (0: all windows)")
    p.add_argument("--bank", default="encoded", choices=["encoded", "synthetic"],
                   help="memory from encoded reference images, or (split-only runs) a window bank of random "
                        "unit tokens of the same shape, which costs the same to search and nothing to build")
    p.add_argument("--compare_pixel_crops", action="store_true",
                   help="split: also time the previous window path (conv1 on every pixel crop), interleaved")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or a CUDA index")
    p.add_argument("--model", default="ViT-L-14-336")
    p.add_argument("--pretrained", default="none", help="'none' = random weights (speed is the same)")
    p.add_argument("--image_size", type=int, default=518)
    p.add_argument("--features", type=int, nargs="+", default=[6, 12, 18, 24])
    p.add_argument("--win_size", type=int, default=13)
    p.add_argument("--win_stride", type=int, default=2)
    p.add_argument("--use_img_idx", type=int, default=0, choices=[0, 1], help="image-feature index alignment")
    p.add_argument("--k_shot", type=int, default=1, help="reference images in the memory bank")
    p.add_argument("--out_size", type=int, default=240, help="anomaly-map evaluation size")
    p.add_argument("--win_batch", type=int, default=16)
    p.add_argument("--bank_dtype", default="auto", choices=["auto", "fp32", "fp16"])
    p.add_argument("--align_chunk_mb", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--metric_maps", type=int, default=1000)
    p.add_argument("--metric_size", type=int, default=240)
    p.add_argument("--metric_iters", type=int, default=3)
    p.add_argument("--skip_metrics", action="store_true", help="do not time aupro / pixel_metrics")
    p.add_argument("--skip_model", action="store_true", help="do not time the model")
    p.add_argument("--child_timeout", type=float, default=3600.0, help="seconds before a child is abandoned")
    p.add_argument("--json", default=None, help="also write all figures to this JSON file")
    p.add_argument("--verbose", action="store_true", help="show the children's stderr (library logs)")
    args = p.parse_args(argv)

    import torch

    threads = args.threads or torch.get_num_threads()
    env = environment(threads, args.device)
    print_environment(env)
    print(f"# model {args.model} @ {args.image_size} px, features {args.features}, pretrained={args.pretrained}, "
          f"NAM on, {args.k_shot}-shot, windows {args.win_size}/{args.win_stride}, win_batch {args.win_batch}, "
          f"maps upsampled to {args.out_size}", flush=True)
    rows: list[Result] = []
    t_start = time.perf_counter()
    if not args.skip_model:
        for winmode in args.winmode:
            for prec in args.precision:
                for align in (args.align if prec != "fp32" else ["default"]):
                    for b in args.batch:
                        spec = {"kind": "model", **{k: getattr(args, k) for k in (
                            "model", "pretrained", "image_size", "features", "k_shot", "out_size", "device",
                            "win_size", "win_stride", "use_img_idx", "win_batch", "bank_dtype", "align_chunk_mb",
                            "iters", "warmup", "e2e", "split", "lfe_chunks", "compare_pixel_crops", "bank")},
                                "threads": threads, "precision": prec, "align": align, "batch": b,
                                "winmode": winmode}
                        print(f"[run] winmode={winmode} precision={prec} align={align} batch={b} ...", end=" ",
                              flush=True)
                        res = spawn(MODULE, spec, args.child_timeout, args.verbose)
                        res.update(winmode=winmode, precision=prec, align=align, batch=b)
                        rows.append(res)
                        print(f"{res['status']} (child {res['wall_s']:.0f} s)", flush=True)
                        if res.get("stderr_tail"):
                            print(res["stderr_tail"], file=sys.stderr)
    metrics = None
    if not args.skip_metrics:
        spec = {"kind": "metrics", "metric_maps": args.metric_maps, "metric_size": args.metric_size,
                "metric_iters": args.metric_iters}
        metrics = spawn(MODULE, spec, args.child_timeout, args.verbose)
    env["load_end"] = loadavg()
    env["wall_s"] = time.perf_counter() - t_start
    if rows:
        print("\n## Per configuration (peak RSS: the whole child, model build and fit included)\n")
        print_rows(rows)
        for r in rows:
            if r.get("status") == "ok" and r.get("split_s"):
                print_split(r)
    if metrics is not None:
        if metrics.get("status") == "ok":
            print(f"\n## Metrics on {metrics['n_maps']} maps of {metrics['size']}² "
                  f"({metrics['anomalous_maps']} with blobs), median of {args.metric_iters}\n")
            print(table(["aupro s", "pixel_metrics (with aupro) s", "pixel_metrics (no aupro) s"],
                        [[fmt(metrics["aupro_s"]), fmt(metrics["pixel_metrics_s"]),
                          fmt(metrics["pixel_metrics_no_aupro_s"])]]))
        else:
            print(f"metrics: {metrics.get('status')}: {metrics.get('reason')}")
    print(f"\n# load average at end {env['load_end']}; total {env['wall_s']:.0f} s")
    write_json(args.json, {"env": env, "args": vars(args), "model": rows, "metrics": metrics})
    bad = [r for r in rows + ([metrics] if metrics else []) if r.get("status") != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
