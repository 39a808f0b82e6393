"""Wall time of the paper's protocol in one run (shots × seeds) against one single run.

What it measures (figures in benchmarks/README.md):

* on a synthetic set (``fdsl.data.synthetic.make_synthetic_dataset``, ``--n_train`` normal train images and
  ``--n_good`` + ``--n_bad`` test images per class), the wall time of ``Evaluator.run`` for
  - one single run (``--single_k``, default 1, seed = the first of ``--seeds``), and
  - the full protocol (``--shots`` 1 2 4 × ``--seeds`` 10 11 12 13 14) in one run,
  both with the same model object (built once, before timing), in this process, one after the other;
* the split of each: reference encoding, test backbone (``FDSL.extract`` on test images, windows
  included with LFE), scoring (alignment + scorers + NAM + upsampling: ``predict`` minus its
  backbone time) and the rest (data loading, metrics, files);
* the floor (test + distinct references) / (test + 1): the backbone passes a protocol cannot avoid,
  relative to one 1-shot run;
* analytically (FLOP counts, no timing), the cost of the LFE branch at ViT-L-14-336 / 518 px: its
  window backbone, its dense window alignment (which grows with Σ_seeds max k) and the ratio it
  implies for the protocol.

Random weights (``--pretrained none``) do not change speed.

    .venv/bin/python -m benchmarks.bench_protocol --model FDSL-Tiny-ViT --image_size 112 --features_list 1 2 3 4
    .venv/bin/python -m benchmarks.bench_protocol --model ViT-L-14-336 --image_size 518
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from fdsl.config import ModelConfig, TestConfig, config_to_dict
from fdsl.core.backbone import register_model_configs
from fdsl.core.memory import MemorySet
from fdsl.core.model import FDSL
from fdsl.core.windows import n_windows
from fdsl.data.synthetic import make_synthetic_dataset
from fdsl.engine.checkpoint import save_checkpoint
from fdsl.engine.evaluation import Evaluator


class Timers:
    """Accumulated wall time of the model's backbone calls and predictions (patched methods)."""

    def __init__(self) -> None:
        self.encode = self.extract = self.predict = 0.0
        self.extract_in_predict = 0.0
        self._in_predict = False
        self._in_encode = False

    def install(self) -> None:
        extract, predict, encode = FDSL.extract, FDSL.predict, FDSL.encode_references
        timers = self

        def t_extract(model, images, patches=None):
            t0 = time.perf_counter()
            out = extract(model, images, patches)
            dt = time.perf_counter() - t0
            if timers._in_predict:
                timers.extract_in_predict += dt
            return out

        def t_predict(model, images, memories, out_size=None):
            timers._in_predict = True
            t0 = time.perf_counter()
            try:
                return predict(model, images, memories, out_size)
            finally:
                timers.predict += time.perf_counter() - t0
                timers._in_predict = False

        def t_encode(model, images, batch_size=8, windows=None):
            t0 = time.perf_counter()
            try:
                return encode(model, images, batch_size, windows)
            finally:
                timers.encode += time.perf_counter() - t0

        FDSL.extract, FDSL.predict, FDSL.encode_references = t_extract, t_predict, t_encode

    def snapshot(self) -> dict:
        return {"encode": self.encode, "predict": self.predict, "extract_in_predict": self.extract_in_predict}


def _timed_run(cfg: TestConfig, model: FDSL, timers: Timers) -> dict:
    before = timers.snapshot()
    t0 = time.perf_counter()
    ev = Evaluator(cfg, model=model)
    ev.run()
    wall = time.perf_counter() - t0
    after = timers.snapshot()
    d = {k: after[k] - before[k] for k in after}
    distinct = sum(len({p for r in ev.runs for p in ev.refs[r][c]}) for c in ev.classes)
    return {"wall_s": wall, "refs_s": d["encode"], "test_backbone_s": d["extract_in_predict"],
            "scoring_s": d["predict"] - d["extract_in_predict"],
            "rest_s": wall - d["encode"] - d["predict"], "distinct_refs": distinct, "runs": len(ev.runs)}


def per_image(model: FDSL, shots, seeds, batch: int = 1, repeats: int = 2) -> dict:
    """Per test image: backbone seconds, and scoring seconds against 1 memory (k=1) and against every
    (k, seed) memory of the protocol (nested per seed, as `Evaluator.memories` builds them).

    The banks hold random unit tokens of the model's real shapes (no reference images are encoded), so
    this measures the test-image side only, cheaply enough for ViT-L on a loaded CPU. Each figure is the
    minimum over `repeats` (the first repeat includes warm-up).
    """
    from fdsl.core.features import BackboneOutput
    from fdsl.core.model import RefFeatures, combine_layers

    g = torch.Generator().manual_seed(0)
    u = max(shots) * len(seeds)
    images = torch.randn(batch, 3, model.cfg.image_size, model.cfg.image_size, generator=g)
    with torch.no_grad():
        feats = model.extract(images[:1])
    toks = [torch.nn.functional.normalize(torch.randn(u, *t.shape[1:], generator=g), dim=-1) for t in feats.tokens]
    emb = torch.nn.functional.normalize(torch.randn(u, feats.image_embeds.shape[1], generator=g), dim=-1)
    refs = RefFeatures(BackboneOutput(toks, emb), None)
    mems = MemorySet()  # nested per seed, as the evaluator builds them
    for j, _ in enumerate(seeds):
        base = model.make_memory(refs, list(range(j * max(shots), (j + 1) * max(shots))))
        for k in shots:
            mems.add_prefix(base, k)
    single = [model.make_memory(refs, [0])]
    out = {"backbone_s": [], "score_1_s": [], "score_all_s": []}
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            f = model.extract(images)
            out["backbone_s"].append((time.perf_counter() - t0) / batch)
            for key, m in (("score_1_s", single), ("score_all_s", mems)):
                t0 = time.perf_counter()
                for _pos, res in model.iter_residuals(f, m):  # what predict does after the backbone
                    combine_layers([x[:, 1] for x in model.head(res)[1]], model.runtime.out_size)
                out[key].append((time.perf_counter() - t0) / batch)
    return {k: min(v) for k, v in out.items()} | {"memories": len(mems), "bank_units": u}


def flop_analysis(width: int = 1024, depth: int = 24, grid: int = 37, layers: int = 4, win: int = 13,
                 stride: int = 2, shots=(1, 2, 4), n_seeds: int = 5, test: int = 60, distinct: int = 20,
                 hidden=(512, 128, 32)) -> dict:
    """FLOP model (2 per multiply-add) of one test image at ViT-L-14-336 / 518 px, per part, global and LFE.

    Backbone per pass of T tokens: depth·T·(24·C² + 4·T·C). Dense alignment per (query token, bank token,
    layer): 2·C. Scorer per token and layer: 2·(C·h1 + h1·h2 + h2·h3 + h3·2).
    """
    C = width
    N = grid * grid
    nw = n_windows(grid, win, stride)
    Tw = win * win

    def vit(T: int) -> float:
        return depth * T * (24 * C * C + 4 * T * C)

    scorer = 2 * (C * hidden[0] + hidden[0] * hidden[1] + hidden[1] * hidden[2] + hidden[2] * 2) * layers
    g_backbone, w_backbone = vit(N + 1), nw * vit(Tw + 1)
    g_align_unit = N * N * 2 * C * layers  # one reference image in the bank
    w_align_unit = (nw * Tw) * (nw * Tw) * 2 * C * layers
    n_runs = len(shots) * n_seeds
    units = n_seeds * max(shots)  # nested banks share the similarity against each seed's largest bank
    single = {"backbone": g_backbone + w_backbone, "align": g_align_unit + w_align_unit,
              "scorers": scorer * (N + nw * Tw)}
    proto = {"backbone": g_backbone + w_backbone, "align": units * (g_align_unit + w_align_unit),
             "scorers": n_runs * scorer * (N + nw * Tw)}
    per_img_single, per_img_proto = sum(single.values()), sum(proto.values())
    ref_cost = g_backbone + w_backbone
    ratio = (test * per_img_proto + distinct * ref_cost) / (test * per_img_single + ref_cost)
    g_single = g_backbone + g_align_unit + scorer * N
    g_proto = g_backbone + units * g_align_unit + n_runs * scorer * N
    return {"global_branch": {
                "tflop_per_test_image_single_k1": g_single / 1e12, "tflop_per_test_image_protocol": g_proto / 1e12,
                "per_test_image_ratio": g_proto / g_single,
                "protocol_over_single": (test * g_proto + distinct * g_backbone) / (test * g_single + g_backbone)},
            "tflop_per_test_image_single_k1": {k: v / 1e12 for k, v in single.items()},
            "tflop_per_test_image_protocol": {k: v / 1e12 for k, v in proto.items()},
            "window_alignment_share_of_protocol": test * units * w_align_unit / (test * per_img_proto
                                                                                 + distinct * ref_cost),
            "window_alignment_share_of_single": test * w_align_unit / (test * per_img_single + ref_cost),
            "protocol_over_single_lfe": ratio,
            "protocol_over_single_lfe_without_nesting": (
                test * (per_img_proto + (sum(shots) * n_seeds - units) * (g_align_unit + w_align_unit))
                + distinct * ref_cost) / (test * per_img_single + ref_cost)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="FDSL-Tiny-ViT")
    p.add_argument("--image_size", type=int, default=112)
    p.add_argument("--features_list", type=int, nargs="+", default=None)
    p.add_argument("--pretrained", default="none")
    p.add_argument("--classes", type=int, default=1, help="number of synthetic classes")
    p.add_argument("--n_train", type=int, default=20)
    p.add_argument("--n_good", type=int, default=16)
    p.add_argument("--n_bad", type=int, default=44)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12, 13, 14])
    p.add_argument("--single_k", type=int, default=1)
    p.add_argument("--winmode", default="nan")
    p.add_argument("--win_size", type=int, default=13)
    p.add_argument("--win_stride", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--per_image_only", action="store_true",
                   help="only the per-test-image split (backbone, scoring vs 1 and vs all memories), no runs")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    register_model_configs()
    layers = a.features_list or [6, 12, 18, 24]
    tmp = Path(tempfile.mkdtemp(prefix="bench_protocol_"))
    names = tuple(f"c{i}_syn" for i in range(a.classes))
    data = make_synthetic_dataset(tmp / "data", classes=names, n_train=a.n_train, n_test_good=a.n_good,
                                  n_test_bad=a.n_bad, image_size=128, seed=0)
    mcfg = ModelConfig(model=a.model, pretrained=a.pretrained, image_size=a.image_size, features_list=layers,
                       few_shot_features=layers, winmode=a.winmode, win_size=a.win_size, win_stride=a.win_stride)
    t0 = time.perf_counter()
    model = FDSL.from_config(mcfg).eval()
    build_s = time.perf_counter() - t0
    ckpt = tmp / "head.pth"
    save_checkpoint(ckpt, model.head, config_to_dict(mcfg), epoch=0)
    common = dict(model=a.model, pretrained=a.pretrained, image_size=a.image_size, features_list=layers,
                  few_shot_features=layers, winmode=a.winmode, win_size=a.win_size, win_stride=a.win_stride,
                  data_path=str(data), checkpoint_path=str(ckpt), batch_size=a.batch_size, num_workers=0,
                  device="cpu", precision="fp32")
    if a.per_image_only:
        pi = per_image(model, a.shots, a.seeds)
        test, u = a.n_good + a.n_bad, len(a.seeds) * max(a.shots)
        b, s1, sa = pi["backbone_s"], pi["score_1_s"], pi["score_all_s"]
        print(f"{a.model} @ {a.image_size}px, {a.threads} threads, per test image: backbone {b:.2f} s, "
              f"scoring vs 1 memory {s1:.3f} s, vs {pi['memories']} memories {sa:.3f} s")
        for distinct in sorted({1, u * 2 // 3, u}):
            est = (test * (b + sa) + distinct * b) / (test * (b + s1) + b)
            print(f"  estimated protocol / single for {test} test images and {distinct} distinct references: "
                  f"{est:.2f}× (floor {(test + distinct) / (test + 1):.2f}×)")
        if a.json:
            Path(a.json).write_text(json.dumps({"model": a.model, "image_size": a.image_size, **pi}, indent=1))
        return
    timers = Timers()
    timers.install()
    single = _timed_run(TestConfig(save_path=str(tmp / "single"), k_shot=a.single_k, seed=a.seeds[0], **common),
                        model, timers)
    proto = _timed_run(TestConfig(save_path=str(tmp / "protocol"), k_shot=list(a.shots), seeds=list(a.seeds),
                                  **common), model, timers)
    test = a.classes * (a.n_good + a.n_bad)
    floor = (test + proto["distinct_refs"]) / (test + a.classes)
    out = {"model": a.model, "image_size": a.image_size, "winmode": a.winmode, "threads": a.threads,
           "classes": a.classes, "test_images": test, "n_train": a.n_train, "shots": a.shots, "seeds": a.seeds,
           "model_build_s": build_s, "single": single, "protocol": proto,
           "ratio": proto["wall_s"] / single["wall_s"], "floor": floor, "vit_l_flop_analysis": flop_analysis(
               n_seeds=len(a.seeds), shots=tuple(a.shots), test=test, distinct=proto["distinct_refs"])}
    print(f"{a.model} @ {a.image_size}px, winmode {a.winmode}, {a.threads} threads; {a.classes} class(es), "
          f"{test} test images, {a.n_train} normal train images per class")
    print("| run | wall s | refs s | test backbone s | scoring s | rest s | distinct refs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in ((f"single (k={a.single_k}, seed {a.seeds[0]})", single),
                    (f"protocol ({len(a.shots)} shots × {len(a.seeds)} seeds)", proto)):
        print(f"| {name} | {r['wall_s']:.1f} | {r['refs_s']:.1f} | {r['test_backbone_s']:.1f} | "
              f"{r['scoring_s']:.1f} | {r['rest_s']:.1f} | {r['distinct_refs']} |")
    print(f"protocol / single = {out['ratio']:.2f}×; floor (test + distinct refs) / (test + 1) = "
          f"{test} + {proto['distinct_refs']} / {test} + {a.classes} = {floor:.2f}×")
    print("ViT-L-14-336 / 518, global and LFE (analytical):", json.dumps(out["vit_l_flop_analysis"], indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
