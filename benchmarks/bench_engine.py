"""`--backend torch` against `--backend openvino`, side by side, and the exported model (fdsl export + fdsl.deploy).

    python -m benchmarks.bench_engine                       # every section (slow on a busy 2-core CPU)
    python -m benchmarks.bench_engine --configs vitb224 --skip_whole

Sections, each in fresh child processes (common.py), fp32, CPU, RANDOM WEIGHTS (`--pretrained none`: the
figures are about speed only):

1. *Parts, interleaved in one process*: per configuration (ViT-B-16 @224 global; ViT-L-14-336 @518 global;
   ViT-L-14-336 @518 LFE 13/2), the global backbone pass of one image and the window encoding of a chunk of
   `--win_chunk` windows, timed torch, openvino, torch, openvino, ... (`--reps` each; medians), plus one
   end-to-end `FDSL.predict` per image with each backend (1-shot memory). Compile time is reported apart.
   Window encoding per image = the chunk's time × n_windows / chunk (extrapolated, marked so).
2. *Exported model*: a ViT-B-16 @224 detector exported to OpenVINO; latency per image and peak RSS of
   `fdsl.deploy` (no torch in that process) against `Detector.predict` with torch, each in its own process.
3. *Whole processes*: `test.py --backend torch` and `--backend openvino` alternately on a small synthetic
   held-out set (ViT-B-16 @224, global branch), wall time and per-image score agreement.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ROOT,
    child_main,
    environment,
    fmt,
    hwm_mb,
    maxrss_mb,
    print_environment,
    spawn,
    table,
    write_json,
)

CONFIGS = {
    "vitb224": dict(model="ViT-B-16", image_size=224, layers=[3, 6, 9, 12], winmode="nan"),
    "vitl518": dict(model="ViT-L-14-336", image_size=518, layers=[6, 12, 18, 24], winmode="nan"),
    "vitl518_lfe": dict(model="ViT-L-14-336", image_size=518, layers=[6, 12, 18, 24], winmode="mul"),
}


def _model(c: dict[str, Any], backend: str = "torch"):
    import torch

    from fdsl.config import ModelConfig, RuntimeConfig
    from fdsl.core.model import FDSL
    from fdsl.core.runtime import resolve_runtime

    cfg = ModelConfig(model=c["model"], pretrained="none", image_size=c["image_size"], features_list=c["layers"],
                      few_shot_features=c["layers"], winmode=c["winmode"], win_size=13, win_stride=2)
    rc = RuntimeConfig(device="cpu", precision="fp32", backend=backend, win_batch=c.get("win_batch", 16))
    rt = resolve_runtime(rc, torch.device("cpu"))
    return FDSL.from_config(cfg, rt).eval()


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_parts(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: one configuration, torch and openvino interleaved in this process."""
    import torch

    from fdsl.core.backends import OpenVINOBackend
    from fdsl.core.windows import n_windows, split_windows

    torch.set_num_threads(spec["threads"])
    c = dict(CONFIGS[spec["config"]], win_batch=spec["win_chunk"])
    model = _model(c)
    bb = model.backbone
    ov = OpenVINOBackend(bb, threads=spec["threads"])
    g = torch.Generator().manual_seed(0)
    S = c["image_size"]
    x = torch.randn(1, 3, S, S, generator=g)
    lfe = c["winmode"] != "nan"
    # the LFE configuration times the window pass only: its global pass is the global configuration's
    parts = {} if lfe else {"global": (lambda: bb(x), "images")}
    if lfe:
        crops = split_windows(bb.patch_embed(x), 1, 13, 2)[:spec["win_chunk"]].contiguous()  # (chunk, C, 13, 13)
        parts["windows"] = (lambda: bb.forward_patches(crops), "patches")
    res: dict[str, Any] = {"status": "ok", "config": spec["config"], "threads": spec["threads"]}
    for name, (fn, _) in parts.items():
        ref = fn()
        bb.backend = ov
        res[f"{name}_compile_s"] = _timed(fn)  # export + convert + compile, first call
        got = fn()
        bb.backend = None
        res[f"{name}_max_token_diff"] = max(float((a - b).abs().max()) for a, b in zip(ref.tokens, got.tokens))
        t_torch, t_ov = [], []
        for _ in range(spec["reps"]):  # interleaved: the machine's load hits both alike
            t_torch.append(_timed(fn))
            bb.backend = ov
            t_ov.append(_timed(fn))
            bb.backend = None
        res[f"{name}_torch_s"], res[f"{name}_openvino_s"] = statistics.median(t_torch), statistics.median(t_ov)
    if lfe:
        nw = n_windows(bb.grid_size, 13, 2)
        for e in ("torch", "openvino"):
            res[f"windows_per_image_{e}_s"] = res[f"windows_{e}_s"] * nw / spec["win_chunk"]  # extrapolated
        res["n_windows"] = nw
    if spec["e2e"] and not lfe:  # LFE end to end is 169 window passes per image: its parts are timed above
        ref_img = torch.randn(1, 3, S, S, generator=g)
        memory = model.make_memory(model.encode_references(ref_img))
        t: dict[str, list[float]] = {"torch": [], "openvino": []}
        for _ in range(spec["reps"]):  # interleaved, as the parts
            for e in ("torch", "openvino"):
                bb.backend = ov if e == "openvino" else None
                t[e].append(_timed(lambda: model(x, memory)))
        bb.backend = None
        res["e2e_torch_s"], res["e2e_openvino_s"] = statistics.median(t["torch"]), statistics.median(t["openvino"])
    res["peak_rss_mb"] = maxrss_mb()
    return res


def make_detector(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: a ViT-B-16 @224 detector file (random weights, 1 shot) and its OpenVINO export."""
    import dataclasses

    import torch

    from fdsl.inspect.detector import Detector
    from fdsl.inspect.detector_file import FORMAT, FORMAT_VERSION, backbone_identity
    from fdsl.inspect.export import export_detector

    torch.set_num_threads(spec["threads"])
    model = _model(CONFIGS["vitb224"])
    memory = model.make_memory(model.encode_references(torch.randn(1, 3, 224, 224)))
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_config": dataclasses.asdict(model.cfg),
            "backbone": backbone_identity(model.cfg), "checkpoint": {}, "normal_images": [], "cal_image_size": 240,
            "thresholds": {"image": None, "pixel": None}}
    det = Detector(model, memory, info)
    det.save(Path(spec["dir"]) / "part.fdsl")
    t = _timed(lambda: export_detector(det, Path(spec["dir"]) / "exported", "openvino"))
    t_onnx = _timed(lambda: export_detector(det, Path(spec["dir"]) / "exported_onnx", "onnx"))
    return {"status": "ok", "export_s": t, "export_onnx_s": t_onnx}


def run_latency(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: per-image latency and peak RSS of one way to run the detector (deploy, or torch)."""
    from PIL import Image

    rng = __import__("numpy").random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype="uint8")) for _ in range(spec["n"] + 1)]
    if spec["how"].startswith("deploy"):
        from fdsl.deploy import load_exported

        t0 = time.perf_counter()
        folder = "exported_onnx" if spec["how"] == "deploy-onnx" else "exported"
        det = load_exported(Path(spec["dir"]) / folder, threads=spec["threads"])
        load_s = time.perf_counter() - t0
        heavy = [m for m in ("torch", "open_clip", "cv2") if m in sys.modules]
    else:
        import torch

        from fdsl.config import RuntimeConfig
        from fdsl.inspect.detector import Detector

        torch.set_num_threads(spec["threads"])
        t0 = time.perf_counter()
        det = Detector.load(Path(spec["dir"]) / "part.fdsl", runtime=RuntimeConfig(device="cpu", precision="fp32"))
        load_s = time.perf_counter() - t0
        heavy = []
    det.score_images(ims[:1])  # warm-up
    times = [_timed(lambda im=im: det.score_images([im])) for im in ims[1:]]
    # VmHWM of this process's own address space (ru_maxrss may carry the spawning parent's peak across exec)
    return {"status": "ok", "how": spec["how"], "load_s": load_s, "latency_s": statistics.median(times),
            "peak_rss_mb": hwm_mb() or maxrss_mb(), "heavy_modules": heavy}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    return {"parts": run_parts, "detector": make_detector, "latency": run_latency}[spec["kind"]](spec)


def whole_processes(args, work: Path) -> dict[str, Any]:
    """test.py --backend torch / openvino, alternately, as whole processes."""
    import csv

    import torch

    from fdsl.config import ModelConfig
    from fdsl.core.model import FDSL
    from fdsl.data.shots import load_reference_images
    from fdsl.data.synthetic import make_synthetic_dataset
    from fdsl.engine.checkpoint import save_checkpoint
    from tests.fdsl_test_utils import liven_head

    data = make_synthetic_dataset(work / "data", classes=("carpet_syn",), n_train=2, n_test_good=args.n_whole // 2,
                                  n_test_bad=args.n_whole - args.n_whole // 2, image_size=224, seed=0)
    c = CONFIGS["vitb224"]
    mcfg = ModelConfig(model=c["model"], pretrained="none", image_size=224, features_list=c["layers"],
                       few_shot_features=c["layers"])
    torch.manual_seed(0)
    ck = work / "ck.pth"
    model = FDSL.from_config(mcfg).eval()
    # data-driven BN statistics: an untrained head scores every image alike, which would hide differences
    cls_dir = data / "carpet_syn"
    rel = sorted(str(p.relative_to(data)) for p in cls_dir.rglob("*.png") if "ground_truth" not in str(p))
    liven_head(model, load_reference_images(data, [r for r in rel if "/train/" in r][:1], 224),
               load_reference_images(data, [r for r in rel if "/test/" in r][:8], 224))
    save_checkpoint(ck, model.head, __import__("dataclasses").asdict(mcfg), epoch=1)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    walls: dict[str, list[float]] = {"torch": [], "openvino": []}
    scores = {}
    for i in range(args.whole_reps):
        for e in ("torch", "openvino"):
            out = work / f"run_{e}_{i}"
            cmd = [sys.executable, str(ROOT / "test.py"), "--model", c["model"], "--pretrained", "none",
                   "--image_size", "224", "--features_list", *map(str, c["layers"]), "--few_shot_features",
                   *map(str, c["layers"]), "--data_path", str(data), "--checkpoint_path", str(ck), "--save_path",
                   str(out), "--k_shot", "1", "--device", "cpu", "--backend", e, "--aupro", "0", "--num_workers", "0"]
            if e == "openvino" and args.whole_cache:  # the first openvino run fills the cache, later ones read it
                cmd += ["--backend_cache", str(work / "backend_cache")]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True)
            walls[e].append(time.perf_counter() - t0)
            with open(out / "scores.csv", newline="") as fh:
                scores[e] = {r["img_path"]: (float(r["patch_score"]), float(r["map_max"]))
                             for r in csv.DictReader(fh)}
    diff = max(abs(a - b) for k in scores["torch"] for a, b in zip(scores["torch"][k], scores["openvino"][k]))
    spread = statistics.pstdev(v[0] for v in scores["torch"].values())
    return {"n_images": len(scores["torch"]), "torch_s": walls["torch"], "openvino_s": walls["openvino"],
            "patch_score_std": spread,
            "speedup": statistics.median(walls["torch"]) / statistics.median(walls["openvino"]),
            "max_score_diff": diff}


def main() -> int:
    code = child_main(sys.argv[1:], run)
    if code is not None:
        return code
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions per part and backend")
    p.add_argument("--win_chunk", type=int, default=8, help="windows encoded at once (timed chunk)")
    p.add_argument("--no_e2e", action="store_true", help="skip the end-to-end predict per image")
    p.add_argument("--skip_export", action="store_true")
    p.add_argument("--skip_parts", action="store_true")
    p.add_argument("--skip_whole", action="store_true")
    p.add_argument("--n_whole", type=int, default=24, help="held-out images of the whole-process check")
    p.add_argument("--whole_reps", type=int, default=2)
    p.add_argument("--whole_cache", action="store_true",
                   help="give the openvino runs an --backend_cache (the first run fills it, later runs read it)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    env = environment(args.threads, "cpu")
    print_environment(env)
    print("RANDOM WEIGHTS (--pretrained none): speed figures only. Torch and OpenVINO are interleaved in one "
          "process; the machine may be shared, so read the ratios, not the absolute times.\n")
    out: dict[str, Any] = {"environment": env, "parts": [], "latency": [], "whole": None}
    script = "benchmarks.bench_engine"
    rows = []
    for name in [] if args.skip_parts else args.configs:
        r = spawn(script, {"kind": "parts", "config": name, "threads": args.threads, "reps": args.reps,
                           "win_chunk": args.win_chunk, "e2e": not args.no_e2e}, args.timeout)
        out["parts"].append(r)
        if r.get("status") != "ok":
            print(f"{name}: {r.get('status')} {r.get('reason', '')} {r.get('stderr_tail', '')[-800:]}")
            continue
        labels = (("global", "global backbone / image"), ("windows", f"window encoding / {args.win_chunk} windows"),
                  ("windows_per_image", "window encoding / image (extrapolated)"), ("e2e", "predict / image"))
        for part, label in labels:
            if f"{part}_torch_s" in r:
                t, o = r[f"{part}_torch_s"], r[f"{part}_openvino_s"]
                rows.append([name, label, fmt(t), fmt(o), fmt(t / o), fmt(r.get(f"{part}_compile_s")),
                             fmt(r.get(f"{part}_max_token_diff"), 8)])
    if rows:
        print(table(["config", "part", "torch s", "openvino s", "speed-up", "compile s", "max token diff"], rows))
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_export:
            d = spawn(script, {"kind": "detector", "dir": tmp, "threads": args.threads}, args.timeout)
            out["export"] = d
            lat_rows = []
            for how in ("torch", "deploy", "deploy-onnx"):
                r = spawn(script, {"kind": "latency", "how": how, "dir": tmp, "threads": args.threads, "n": 5},
                          args.timeout)
                out["latency"].append(r)
                if r.get("status") == "ok":
                    lat_rows.append([how, fmt(r["load_s"]), fmt(r["latency_s"], 3), fmt(r["peak_rss_mb"], 0),
                                     ",".join(r["heavy_modules"]) or "none"])
                else:
                    print(how, r)
            print(f"\nExported ViT-B-16 @224 global (export: OpenVINO {fmt(d.get('export_s'))} s, "
                  f"ONNX {fmt(d.get('export_onnx_s'))} s):")
            print(table(["run by", "load s", "s / image", "peak RSS MiB", "torch/open_clip/cv2 loaded"], lat_rows))
        if not args.skip_whole:
            w = whole_processes(args, Path(tmp))
            out["whole"] = w
            cached = " (openvino with --backend_cache: first run cold)" if args.whole_cache else ""
            print(f"\ntest.py as whole processes, ViT-B-16 @224 global, {w['n_images']} images, alternated{cached}:")
            print(table(["backend", "wall s (each run)"], [[e, ", ".join(fmt(x, 1) for x in w[f"{e}_s"])]
                                                          for e in ("torch", "openvino")]))
            print(f"speed-up (median walls) {w['speedup']:.2f}x; max per-image score difference "
                  f"{w['max_score_diff']:.2e} (patch-score spread {w['patch_score_std']:.2e})")
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
