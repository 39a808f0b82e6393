#!/usr/bin/env python
"""Memory-bank benchmark of FDSL: bank size, search cost, alignment time and peak memory vs k.

For every k in ``--ks`` (1 2 4 8 16), for the global branch and the LFE window branch, with the
dense bank (docs/method.md §3a) and with the image-feature index (§3b), at the default geometry of
ViT-L-14-336 at 518 px (G = 37, N = 1369 tokens, C = 1024, L = 4 layers, D = 768; windows of
13×13 = 169 tokens at stride 2, 169 windows per image), it reports:

* bank bytes: ``MemoryBank.nbytes`` (global, window) and ``FDSLMemory.nbytes`` (total) for each
  ``--bank_dtype`` storage (fp32, fp16); computed on ``meta`` tensors, so they cost nothing;
* bank entries one query token is compared with (``tests.fdsl_test_utils.entries_scanned``) and the
  dense/index ratio;
* alignment time per query image: ``MemoryBank.residuals`` over all L layers for one image's
  tokens (global: 1 × 1369 tokens; windows: 169 windows × 169 tokens, fed ``--win_batch``
  windows per call as ``FDSL.window_maps`` does), median of ``--reps`` runs after a warm-up,
  for every ``--precision`` (fp32; bf16 = bf16 queries and compute);
* memory: each configuration runs in a fresh child process (this script with the hidden
  ``--child`` flag). RSS once the bank and the queries exist ("before"), then the peak RSS during
  alignment (VmHWM, reset through /proc/self/clear_refs just before; ru_maxrss as a fallback)
  and their difference, next to the similarity block the chunk budget ``--align_chunk_mb`` allows.
  On CUDA, ``torch.cuda`` allocated/peak figures are used instead.

Tokens are synthetic (``torch.randn`` then ``F.normalize``): no backbone is built. The cost of a
matrix product, an argmax and a gather does not depend on the values.

Configurations whose dense similarity work exceeds ``--max_dense_flops`` (the dense window
branch: ~6.7 TFLOP per image per reference image) are not run in full. By default they are
*sampled*: the first few query windows -- enough rows to fill one whole similarity chunk, so the
peak memory is the full run's -- are aligned against the full bank and the time is extrapolated
linearly to all windows (the dense cost is linear in the query rows). ``--no_sample`` skips them
instead ("skipped: est. X TFLOP"). Bank bytes and entries scanned are given for every row.

    .venv/bin/python -m benchmarks.bench_memory --json /tmp/bench_memory_cpu.json
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Any

from benchmarks.common import (
    MiB,
    child_main,
    environment,
    gemm_gflops,
    hwm_mb,
    loadavg,
    maxrss_mb,
    mem_available_mb,
    print_environment,
    reset_hwm,
    rss_mb,
    spawn,
    table,
    write_json,
)
from tests.fdsl_test_utils import entries_scanned

MODULE = "benchmarks.bench_memory"  # children run as python -m MODULE --child SPEC
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def _rows_per_chunk(rows: int, cols: int, chunk_mb: int, dtype) -> int:
    """Query rows of one similarity block, as the library's `Alignment.rows_per_chunk`."""
    from fdsl.core.memory import Alignment

    return Alignment(chunk_mb=chunk_mb).rows_per_chunk(rows, cols, dtype)


# ----------------------------------------------------------------------------- geometry and cost
def geometry(a: argparse.Namespace) -> dict[str, int]:
    from fdsl.core.windows import n_windows

    grid = a.image_size // a.patch
    return {"grid": grid, "N": grid * grid, "C": a.width, "L": a.layers, "D": a.embed_dim,
            "win": a.win_size, "stride": a.win_stride, "nw": n_windows(grid, a.win_size, a.win_stride),
            "Nw": a.win_size * a.win_size}


def branch_shape(geo: dict[str, int], branch: str, k: int) -> dict[str, int]:
    """Items stored (K), tokens per item (N) and query items per image (Q) of one branch."""
    if branch == "global":
        return {"K": k, "N": geo["N"], "Q": 1}
    return {"K": k * geo["nw"], "N": geo["Nw"], "Q": geo["nw"]}


def align_flops(geo: dict[str, int], branch: str, k: int, search: str) -> float:
    """Multiply-add FLOPs of the similarity products of one query image, all layers (2 per MAC)."""
    s = branch_shape(geo, branch, k)
    q_tokens = s["Q"] * s["N"]
    if search == "dense":
        return 2.0 * q_tokens * s["K"] * s["N"] * geo["C"] * geo["L"]
    return 2.0 * q_tokens * s["N"] * geo["C"] * geo["L"] + 2.0 * s["Q"] * s["K"] * geo["D"]


def meta_memory(geo: dict[str, int], k: int, dtype_name: str):
    """FDSLMemory of k reference images on the meta device: its byte counts cost nothing."""
    import torch

    from fdsl.core.memory import FDSLMemory, MemoryBank

    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]

    def bank(branch: str) -> MemoryBank:
        s = branch_shape(geo, branch, k)
        toks = [torch.empty(s["K"], s["N"], geo["C"], device="meta") for _ in range(geo["L"])]
        return MemoryBank(toks, torch.empty(s["K"], geo["D"], device="meta"), dtype=dt)

    return FDSLMemory(bank("global"), bank("window"))


# ----------------------------------------------------------------------------- child
def _fill_unit(t, gen, rows: int = 1 << 16) -> None:
    """Fill a (..., C) tensor in place with randn rows, L2-normalised over C, in fp32 blocks."""
    import torch
    import torch.nn.functional as F

    flat = t.view(-1, t.shape[-1])
    for s in range(0, flat.shape[0], rows):
        blk = flat[s:s + rows]
        if blk.dtype == torch.float32:  # in place: no temporaries the size of the bank
            F.normalize(blk.normal_(generator=gen), dim=-1, out=blk)
        else:
            blk.copy_(F.normalize(torch.randn(blk.shape, generator=gen, device=t.device), dim=-1))


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from fdsl.core.memory import Alignment, MemoryBank

    out: dict[str, Any] = {"status": "ok", "load_before": loadavg()}
    torch.set_num_threads(spec["threads"])
    dev = torch.device(spec["device"])
    cuda = dev.type == "cuda"
    dts = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    q_dt = dts[spec["precision"]]
    bank_dt = dts[spec["bank_dtype"]]
    compute_dt = None if q_dt == torch.float32 else q_dt  # as the runtime's align_dtype
    geo, branch, k, search = spec["geo"], spec["branch"], spec["k"], spec["search"]
    strategy = Alignment(spec["align_mode"], True, spec["chunk_mb"], compute_dt, search == "index")
    s = branch_shape(geo, branch, k)
    L, C, D = geo["L"], geo["C"], geo["D"]
    gen = torch.Generator(device=dev).manual_seed(0)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    # The bank: L × (K, N, C) unit tokens, written straight into the storage dtype.
    t0 = time.perf_counter()
    toks = []
    for _ in range(L):
        t = torch.empty(s["K"], s["N"], C, dtype=bank_dt, device=dev)
        _fill_unit(t, gen)
        toks.append(t)
    emb = torch.empty(s["K"], D, dtype=bank_dt, device=dev)
    _fill_unit(emb, gen)
    bank = MemoryBank(toks, emb, dtype=bank_dt)
    del toks, emb
    out["bank_mb"] = bank.nbytes() / MiB
    out["entries_scanned"] = entries_scanned(bank, search == "index")

    # The queries of one image (or of the sampled windows of one image).
    n_items = s["Q"]
    M = s["K"] * s["N"]
    rows_per_chunk = strategy.rows_per_chunk(1 << 62, M, compute_dt or q_dt)
    if spec["sample"]:  # enough windows to fill one whole similarity chunk (same peak as the full run)
        n_items = min(s["Q"], max(1, math.ceil(rows_per_chunk / s["N"])))
    q = []
    for _ in range(L):
        t = torch.empty(n_items, s["N"], C, dtype=torch.float32, device=dev)
        _fill_unit(t, gen)
        q.append(t.to(q_dt))
    q_emb = torch.empty(n_items, D, dtype=torch.float32, device=dev)
    _fill_unit(q_emb, gen)
    q_emb = q_emb.to(q_dt)
    sync()
    out["setup_s"] = time.perf_counter() - t0
    out["query_items"] = n_items
    out["query_items_full"] = s["Q"]
    out["rows_per_chunk"] = int(rows_per_chunk)
    batch = spec["win_batch"] if branch == "window" and spec["win_batch"] > 0 else n_items

    def align() -> None:
        for a in range(0, n_items, batch):  # as FDSL.window_maps: win_batch windows per call
            r = bank.residuals([t[a:a + batch] for t in q], strategy,
                               query_embeds=q_emb[a:a + batch] if search == "index" else None)
            del r
        sync()

    call_rows = min(batch, n_items) * s["N"]  # query rows of one residuals() call
    if search == "dense":
        sim_rows = min(call_rows, rows_per_chunk)
        out["sim_block_mb"] = sim_rows * M * DTYPE_BYTES[spec["compute_name"]] / MiB
    else:
        step_items = max(1, strategy.rows_per_chunk(call_rows, s["N"], compute_dt or q_dt) // s["N"])
        step_items = min(step_items, min(batch, n_items))
        out["sim_block_mb"] = step_items * s["N"] * s["N"] * DTYPE_BYTES[spec["compute_name"]] / MiB

    import gc

    gc.collect()
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out["before_mb"] = torch.cuda.memory_allocated(dev) / MiB
    else:
        out["before_mb"] = rss_mb()
        out["hwm_reset"] = reset_hwm()
    times = []
    with torch.no_grad():
        for _ in range(spec["warmup"]):  # warm-up: one residuals() call on the first query chunk
            bank.residuals([t[:batch] for t in q], strategy, query_embeds=q_emb[:batch] if search == "index" else None)
            sync()
        for _ in range(spec["reps"]):
            t0 = time.perf_counter()
            align()
            times.append(time.perf_counter() - t0)
    if cuda:
        out["peak_mb"] = torch.cuda.max_memory_allocated(dev) / MiB
        out["mem_kind"] = "cuda allocated"
    else:
        out["peak_mb"] = hwm_mb() if out["hwm_reset"] else maxrss_mb()
        out["mem_kind"] = "RSS (VmHWM)" if out["hwm_reset"] else "RSS (ru_maxrss, whole process)"
    out["peak_delta_mb"] = out["peak_mb"] - out["before_mb"] if out["peak_mb"] is not None else None
    out["times_s"] = times
    med = statistics.median(times)
    out["measured_s"] = med
    out["time_per_image_s"] = med * s["Q"] / n_items  # linear extrapolation when sampled
    out["load_after"] = loadavg()
    return out


# ----------------------------------------------------------------------------- parent
def child_mem_estimate_mb(geo: dict[str, int], branch: str, k: int, bank_dtype: str, precision: str,
                          chunk_mb: int, win_batch: int) -> float:
    """Rough resident size of a child: bank + queries + one layer's dtype copy + chunk + outputs."""
    s = branch_shape(geo, branch, k)
    bank = s["K"] * s["N"] * geo["C"] * geo["L"] * DTYPE_BYTES[bank_dtype]
    queries = s["Q"] * s["N"] * geo["C"] * geo["L"] * (4 + DTYPE_BYTES[precision])
    copy = s["K"] * s["N"] * geo["C"] * 4 if bank_dtype != precision else 0  # bank.to(compute dtype)
    per_call = min(s["Q"], win_batch or s["Q"]) * s["N"] * geo["C"] * 4 * 3 * geo["L"]
    return (bank + queries + copy + per_call) / MiB + chunk_mb + 400  # + interpreter and torch


def fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rc = child_main(argv, child)
    if rc is not None:
        return rc
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="reference images per class")
    p.add_argument("--branches", nargs="+", default=["global", "window"], choices=["global", "window"])
    p.add_argument("--search", nargs="+", default=["dense", "index"], choices=["dense", "index"],
                   help="dense bank (§3a) and/or image-feature index (§3b)")
    p.add_argument("--bank_dtype", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16", "bf16"],
                   help="storage dtypes for the bank-bytes table")
    p.add_argument("--time_bank_dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="storage dtype of the timed banks (auto: the compute dtype, as --bank_dtype auto)")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"],
                   help="query and similarity dtype of the timed alignment (fp16 is very slow on CPU)")
    p.add_argument("--align_mode", default="mulmax", choices=["mulmax", "diff2"])
    p.add_argument("--align_chunk_mb", type=int, default=None,
                   help="similarity chunk budget (default: the library's RuntimeConfig.align_chunk_mb)")
    p.add_argument("--win_batch", type=int, default=None,
                   help="windows per residuals() call (default: RuntimeConfig.win_batch; 0 = all at once)")
    p.add_argument("--image_size", type=int, default=518)
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--width", type=int, default=1024, help="token width C")
    p.add_argument("--embed_dim", type=int, default=768, help="global feature width D")
    p.add_argument("--layers", type=int, default=4, help="layers L")
    p.add_argument("--win_size", type=int, default=13)
    p.add_argument("--win_stride", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="timed runs per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed residuals() calls on the first query chunk before the timed runs")
    p.add_argument("--max_dense_flops", type=float, default=1e12,
                   help="dense configurations above this many FLOP per image are sampled (or skipped)")
    p.add_argument("--no_sample", action="store_true",
                   help="skip configurations above --max_dense_flops instead of timing a sample of windows")
    p.add_argument("--max_mem_gb", type=float, default=12.0,
                   help="skip timing when a child would need more (also capped at 85%% of MemAvailable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--child_timeout", type=float, default=900.0)
    p.add_argument("--json", default=None, help="save all figures to this JSON file")
    a = p.parse_args(argv)

    import torch

    from fdsl.config import RuntimeConfig

    dts = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

    defaults = RuntimeConfig()
    chunk_mb = a.align_chunk_mb if a.align_chunk_mb is not None else defaults.align_chunk_mb
    win_batch = a.win_batch if a.win_batch is not None else defaults.win_batch
    threads = a.threads or torch.get_num_threads()
    geo = geometry(a)
    started = time.time()
    env = environment(threads, a.device)
    env.update(mem_available_mb=mem_available_mb(), align_chunk_mb=chunk_mb, win_batch=win_batch,
               align_mode=a.align_mode, geometry=geo,
               data="synthetic: torch.randn tokens L2-normalised with F.normalize; no backbone")
    print_environment(env)
    print(f"# MemAvailable {fmt(env['mem_available_mb'], 0)} MiB")
    print(f"# geometry: G={geo['grid']}, N={geo['N']} tokens/image, C={geo['C']}, L={geo['L']}, D={geo['D']}; "
          f"windows {geo['win']}x{geo['win']} stride {geo['stride']}: {geo['nw']} windows/image of "
          f"{geo['Nw']} tokens")
    print(f"# align_chunk_mb={chunk_mb} (similarity block bound), win_batch={win_batch}, "
          f"align_mode={a.align_mode}")
    print("# data: synthetic random tokens (torch.randn, then F.normalize); no backbone is built")

    # 1. bank bytes (meta tensors, all k)
    bytes_rows, bytes_json = [], []
    for k in a.ks:
        row, rec = [str(k)], {"k": k}
        for dn in a.bank_dtype:
            mem = meta_memory(geo, k, dn)
            g, w, tot = mem.global_bank.nbytes(), mem.window_bank.nbytes(), mem.nbytes()
            row += [fmt(g / MiB), fmt(w / MiB), fmt(tot / MiB)]
            rec[dn] = {"global_bytes": g, "window_bytes": w, "total_bytes": tot}
        bytes_rows.append(row)
        bytes_json.append(rec)
    hdr = ["k"] + [f"{part} {dn} MiB" for dn in a.bank_dtype for part in ("global", "window", "total")]
    print("\n## Bank bytes (MemoryBank.nbytes / FDSLMemory.nbytes; tokens of all L layers + global features)\n")
    print(table(hdr, bytes_rows))

    # 2. entries scanned per query token
    ent_rows, ent_json = [], []
    for branch in a.branches:
        for k in a.ks:
            bank = getattr(meta_memory(geo, k, "fp32"), f"{branch}_bank")
            d, i = entries_scanned(bank, False), entries_scanned(bank, True)
            fd, fi = align_flops(geo, branch, k, "dense"), align_flops(geo, branch, k, "index")
            ent_rows.append([branch, str(k), f"{d:,}", f"{i:,}", f"{d / i:.1f}", fmt(fd / 1e9), fmt(fi / 1e9)])
            ent_json.append({"branch": branch, "k": k, "dense": d, "index": i, "ratio": d / i,
                             "dense_gflop_per_image": fd / 1e9, "index_gflop_per_image": fi / 1e9})
    print("\n## Bank entries scanned per query token (entries_scanned) and similarity GFLOP per "
          "query image (all L layers)\n")
    print(table(["branch", "k", "dense", "index", "dense/index", "dense GFLOP/img", "index GFLOP/img"], ent_rows))

    # 3. alignment time and memory (one child per configuration)
    avail = mem_available_mb()
    mem_cap_mb = a.max_mem_gb * 1024
    if avail is not None:
        mem_cap_mb = min(mem_cap_mb, 0.85 * avail)
    results = []
    for prec in a.precision:
        if prec == "fp16" and a.device == "cpu":
            print("# warning: fp16 matrix products on CPU run at well under 1 GFLOP/s here; expect skips")
        torch.set_num_threads(threads)
        gflops = gemm_gflops(prec)
        bank_dn = prec if a.time_bank_dtype == "auto" else a.time_bank_dtype
        print(f"\n## Alignment per query image: precision {prec}, bank storage {bank_dn} "
              f"(large GEMM: {gflops:.0f} GFLOP/s)\n", flush=True)
        for branch in a.branches:
            for k in a.ks:
                for search in a.search:
                    flops = align_flops(geo, branch, k, search)
                    est_s = flops / (gflops * 1e9)
                    spec = {"geo": geo, "branch": branch, "k": k, "search": search, "precision": prec,
                            "compute_name": prec, "bank_dtype": bank_dn, "chunk_mb": chunk_mb,
                            "win_batch": win_batch, "align_mode": a.align_mode, "device": a.device,
                            "threads": threads, "reps": a.reps, "warmup": a.warmup, "sample": False}
                    rec = {"precision": prec, "bank_dtype": bank_dn, "branch": branch, "k": k, "search": search,
                           "gflop_per_image": flops / 1e9, "est_s": est_s}
                    mbank = getattr(meta_memory(geo, k, bank_dn), f"{branch}_bank")  # known even when skipped
                    rec["bank_mb"] = mbank.nbytes() / MiB
                    rec["entries_scanned"] = entries_scanned(mbank, search == "index")
                    need = child_mem_estimate_mb(geo, branch, k, bank_dn, prec, chunk_mb, win_batch)
                    rec["mem_estimate_mb"] = need
                    if need > mem_cap_mb:
                        rec.update(status="skipped", reason=f"skipped: needs ~{need / 1024:.1f} GiB "
                                                            f"> cap {mem_cap_mb / 1024:.1f} GiB")
                    elif flops > a.max_dense_flops:
                        if a.no_sample:
                            rec.update(status="skipped", reason=f"skipped: est. {flops / 1e12:.1f} TFLOP "
                                                                f"(~{est_s:.0f} s)")
                        else:
                            spec.update(sample=True, reps=1)
                    if rec.get("status") != "skipped":
                        s = branch_shape(geo, branch, k)
                        frac = 1.0
                        if spec["sample"]:
                            rows = _rows_per_chunk(1 << 62, s["K"] * s["N"], chunk_mb, dts[prec])
                            frac = min(s["Q"], max(1, math.ceil(rows / s["N"]))) / s["Q"]
                        print(f"  running {branch} k={k} {search} ({flops / 1e9:,.0f} GFLOP/img, est. "
                              f"{est_s * frac:.1f} s/run{f', sampled {frac:.3f} of it' if spec['sample'] else ''})"
                              " ...", file=sys.stderr, flush=True)
                        res = spawn(MODULE, spec, a.child_timeout)
                        rec.update(res)
                        rec["sampled"] = spec["sample"]
                    results.append(rec)
                    print(f"  {branch:6s} k={k:<2d} {search:5s}: " + (
                        rec.get("reason", "") if rec.get("status") != "ok" else
                        f"{rec['time_per_image_s']:.3f} s/img{' (extrap.)' if rec['sampled'] else ''}, "
                        f"before {fmt(rec['before_mb'], 0)} MiB, peak {fmt(rec['peak_mb'], 0)} MiB "
                        f"(+{fmt(rec['peak_delta_mb'], 0)})"), flush=True)

        rows = []
        for r in results:
            if r["precision"] != prec:
                continue
            ok = r.get("status") == "ok"
            note = r.get("reason", "") if not ok else (
                f"sampled {r['query_items']}/{r['query_items_full']} windows, time extrapolated"
                + (" (per-call bank dtype copy extrapolated too: overestimate)"
                   if r["bank_dtype"] != r["precision"] and r["search"] == "dense" else "")
                if r["sampled"] else "")
            rows.append([r["branch"], str(r["k"]), r["search"], fmt(r["gflop_per_image"], 0),
                         fmt(r["time_per_image_s"], 3) if ok else "-",
                         fmt(r["gflop_per_image"] / r["time_per_image_s"], 0) if ok else "-",
                         f"{r['entries_scanned']:,}", fmt(r.get("bank_mb"), 0),
                         fmt(r.get("before_mb"), 0) if ok else "-", fmt(r.get("peak_mb"), 0) if ok else "-",
                         fmt(r.get("peak_delta_mb"), 0) if ok else "-", fmt(r.get("sim_block_mb"), 0) if ok else "-",
                         note])
        print(f"\n## Alignment per query image, precision {prec}, bank {bank_dn}: median of {a.reps} runs after "
              f"{a.warmup} warm-up call(s) (sampled rows: 1 run); memory in MiB\n")
        print(table(["branch", "k", "search", "GFLOP/img", "s/img", "GFLOP/s", "entries/tok", "bank MiB", "before",
                     "peak", "peak-before", "sim block", "note"], rows))

    env["load_end"] = loadavg()
    env["wall_s"] = time.time() - started
    print(f"\n# load average at end: {env['load_end']}; wall {env['wall_s']:.0f} s")
    print(f"# memory columns: {results[0].get('mem_kind', 'RSS') if results else 'RSS'}; 'before' = bank + "
          "queries resident; 'sim block' = the largest similarity block the chunk budget allows for that call")
    write_json(a.json, {"env": env, "args": vars(a), "bank_bytes": bytes_json, "entries_scanned": ent_json,
                        "alignment": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
