"""Shared by `bench_precision.py` and `gpu_check.py`: random-weight sets and precision drift against fp32.

A *set* is a seeded synthetic MVTec-layout dataset, a seeded random-weight CLIP saved to a file, and a
head with data-driven BatchNorm statistics (an untrained head scores ~0.5 everywhere, which would hide
any drift), saved as a checkpoint so the real `Evaluator` can load it.

Drift of a runtime setting is measured against fp32 on the same images and memory:

* ``nn_flip_global`` / ``nn_flip_window``: per layer, the share of query tokens whose nearest normal
  token (the alignment's argmax) differs from fp32's;
* ``max_map_diff``: max |anomaly map − fp32 anomaly map| over all test pixels (maps at ``cal_size``);
* ``d_pixel_auroc`` / ``d_image_auroc``: metric change against fp32 (evaluation's normalised image score).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch

from fdsl.config import ModelConfig, RuntimeConfig, config_to_dict
from fdsl.core.backbone import register_model_configs
from fdsl.core.features import BackboneOutput
from fdsl.core.memory import FDSLMemory, MemoryBank, nearest_normal
from fdsl.core.model import FDSL
from fdsl.core.runtime import resolve_runtime
from fdsl.data.datasets import AnomalyDataset
from fdsl.data.meta import load_meta
from fdsl.data.shots import load_reference_images, sample_k_shot
from fdsl.data.synthetic import make_synthetic_dataset
from fdsl.engine.checkpoint import save_checkpoint
from fdsl.engine.evaluation import normalised_image_scores
from fdsl.metrics import metrics
from tests.fdsl_test_utils import liven_head


@dataclass(frozen=True)
class SetSpec:
    """One random-weight set: architecture, geometry and synthetic data (one class)."""

    key: str
    model: str
    image_size: int
    features: tuple
    win_size: int
    win_stride: int
    n_train: int
    n_good: int
    n_bad: int
    data_size: int = 128
    cls: str = "brick_syn"
    k_shot: int = 1
    cal_size: int = 240

    def model_config(self, weights: Path, winmode: str = "nan") -> ModelConfig:
        return ModelConfig(model=self.model, pretrained=str(weights), image_size=self.image_size,
                           features_list=list(self.features), few_shot_features=list(self.features),
                           winmode=winmode, win_size=self.win_size, win_stride=self.win_stride)


# The demo's tiny smoke geometry (FDSL-Tiny-ViT at 112 px, blocks 1-4) on a test set the size of the demo's.
TINY = SetSpec("tiny", "FDSL-Tiny-ViT", 112, (1, 2, 3, 4), 4, 2, n_train=4, n_good=8, n_bad=16)
# ViT-L-14-336 at the paper's 518 px, 1 reference and 2 query images (one normal, one defective).
# LFE is made affordable on a CPU by the window stride: 13-patch windows at stride 8 give 4×4 = 16
# windows per image instead of the default stride 2's 13×13 = 169.
VITL = SetSpec("vitl", "ViT-L-14-336", 518, (6, 12, 18, 24), 13, 8, n_train=1, n_good=1, n_bad=1, data_size=256)
SETS = {s.key: s for s in (TINY, VITL)}


@dataclass
class BuiltSet:
    spec: SetSpec
    data: Path
    weights: Path
    checkpoint: Path




def build_set(spec: SetSpec, folder: Path, seed: int = 0, device: torch.device | None = None) -> BuiltSet:
    """Write (or reuse) the data, the seeded random weights and the livened head of `spec` under `folder`.

    The head's statistics are computed on `device` (default the CPU), in fp32.
    """
    folder = Path(folder) / spec.key
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    if not (data / "meta.json").is_file():
        make_synthetic_dataset(data, classes=(spec.cls,), n_train=spec.n_train, n_test_good=spec.n_good,
                               n_test_bad=spec.n_bad, image_size=spec.data_size, seed=seed + 1)
    weights, ckpt = folder / "weights.pt", folder / "head.pth"
    if not weights.is_file() or not ckpt.is_file():
        register_model_configs()
        torch.manual_seed(seed)
        torch.save(open_clip.create_model(spec.model, pretrained=None).state_dict(), weights)
        mcfg = spec.model_config(weights)
        torch.manual_seed(seed + 1)
        model = FDSL.from_config(mcfg).eval().to(device or torch.device("cpu"))
        meta = load_meta(data)
        refs = load_reference_images(data, sample_k_shot(meta, spec.cls, spec.k_shot, seed), spec.image_size)
        ds = AnomalyDataset(data, "test", [spec.cls], spec.image_size, spec.cal_size, meta=meta)
        calib = torch.stack([ds[i]["image"] for i in range(min(len(ds), 4))])
        liven_head(model, refs, calib)
        save_checkpoint(ckpt, model.head.cpu(), config_to_dict(mcfg), epoch=1)
    return BuiltSet(spec, data, weights, ckpt)


def load_model(built: BuiltSet, winmode: str, device: torch.device) -> FDSL:
    """The set's model with its livened head, on `device`."""
    from fdsl.core.checkpoint_io import load_head

    model = FDSL.from_config(built.spec.model_config(built.weights, winmode))
    load_head(model.head, built.checkpoint, len(built.spec.features), True)
    return model.to(device).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class PassResult:
    """One precision setting's pass over a set's test images."""

    maps: np.ndarray  # (n, cal, cal)
    scores: np.ndarray  # (n,) normalised image scores
    patch: np.ndarray
    nn_global: list[torch.Tensor]  # per layer, (n·N,) nearest-normal indices
    nn_window: list[torch.Tensor]  # per layer, (n·nw·W²,) (empty without LFE)
    pixel_auroc: float
    image_auroc: float
    seconds_per_image: float  # model.predict only (backbone + alignment + head + upsampling)


def _nearest(bank: MemoryBank, feats: BackboneOutput, align) -> list[torch.Tensor]:
    """Per layer, the alignment's nearest-normal index of every query token (dense search)."""
    out = []
    for i, q in enumerate(feats.tokens):
        b, sq = bank.searchable(i, align, q.dtype)
        out.append(nearest_normal(q.reshape(-1, q.shape[-1]), b, align, sq).cpu())
    return out


@torch.no_grad()
def run_pass(model: FDSL, built: BuiltSet, runtime_cfg: RuntimeConfig, device: torch.device,
             batch: int = 8, with_nn: bool = True) -> PassResult:
    """Score the set's test images with `model` under `runtime_cfg` (resolved as a run would)."""
    spec = built.spec
    model.runtime = resolve_runtime(runtime_cfg, device, spec.cal_size)
    meta = load_meta(built.data)
    refs = load_reference_images(built.data, sample_k_shot(meta, spec.cls, spec.k_shot, 0), spec.image_size)
    memory: FDSLMemory = model.make_memory(model.encode_references(refs))
    ds = AnomalyDataset(built.data, "test", [spec.cls], spec.image_size, spec.cal_size, meta=meta)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    masks = np.stack([ds[i]["mask"][0].numpy() > 0.5 for i in range(len(ds))])
    labels = np.array([int(ds[i]["anomaly"]) for i in range(len(ds))])
    maps, patch, secs = [], [], 0.0
    nn_g: list[torch.Tensor] = []
    nn_w: list[torch.Tensor] = []
    recorded: list[BackboneOutput] = []  # global features of the batch (FDSL.extract)
    recorded_w: list[BackboneOutput] = []  # window feature chunks of the batch (FDSL.window_chunks)
    if with_nn:  # keep the features predict computes, to read its nearest-normal decisions afterwards
        def extract(x: torch.Tensor, patches: torch.Tensor | None = None) -> BackboneOutput:
            out = FDSL.extract(model, x, patches)
            recorded.append(out)
            return out

        def window_chunks(x: torch.Tensor, patches: torch.Tensor | None = None):
            for chunk in FDSL.window_chunks(model, x, patches):
                recorded_w.append(chunk)
                yield chunk
        model.extract = extract  # type: ignore[method-assign]
        model.window_chunks = window_chunks  # type: ignore[method-assign]
    try:
        for s in range(0, len(images), batch):
            x = images[s:s + batch].to(device)
            recorded.clear()
            recorded_w.clear()
            sync(device)
            t = time.perf_counter()
            out = model.predict(x, [memory], spec.cal_size)[0]
            sync(device)
            secs += time.perf_counter() - t
            maps.append(out.anomaly_map.float().cpu().numpy())
            patch.append(out.patch_score.double().cpu().numpy())
            if with_nn:
                if model.cfg.winmode != "onlywin":
                    part = _nearest(memory.global_bank, recorded[0], model.alignment_for(window=False))
                    nn_g = part if not nn_g else [torch.cat([a, b]) for a, b in zip(nn_g, part)]
                for chunk in recorded_w if model.use_windows else []:
                    part = _nearest(memory.window_bank, chunk, model.alignment_for(window=True))
                    nn_w = part if not nn_w else [torch.cat([a, b]) for a, b in zip(nn_w, part)]
    finally:
        model.__dict__.pop("extract", None)
        model.__dict__.pop("window_chunks", None)
    if with_nn and model.use_windows and not nn_w:
        raise RuntimeError("no window features passed through FDSL.window_chunks during predict; "
                           "update precision_common.run_pass to where window features are computed now")
    amap, ps = np.concatenate(maps), np.concatenate(patch)
    score = normalised_image_scores(ps, amap.reshape(len(amap), -1).max(axis=1).astype(np.float64))
    pix = metrics.pixel_metrics(masks, amap, with_aupro=False)["pixel_auroc"]
    img = metrics.image_metrics(labels, score)["image_auroc"]
    return PassResult(amap, score, ps, nn_g, nn_w, float(pix), float(img), secs / len(images))


@torch.no_grad()
def near_ties(model: FDSL, built: BuiltSet, device: torch.device, gap: float = 2 ** -8) -> list[float]:
    """Per layer, the share of fp32 global-branch query tokens whose best and second-best similarity to
    the memory differ by less than `gap` (2⁻⁸: bf16's relative rounding step), i.e. decisions a
    reduced-precision product can flip."""
    spec = built.spec
    model.runtime = resolve_runtime(runtime_cfg(str(device)), device, spec.cal_size)
    meta = load_meta(built.data)
    refs = load_reference_images(built.data, sample_k_shot(meta, spec.cls, spec.k_shot, 0), spec.image_size)
    bank = model.make_memory(model.encode_references(refs, windows=False)).global_bank
    ds = AnomalyDataset(built.data, "test", [spec.cls], spec.image_size, spec.cal_size, meta=meta)
    feats = model.extract(torch.stack([ds[i]["image"] for i in range(len(ds))]))
    out = []
    for i, q in enumerate(feats.tokens):
        sim = q.reshape(-1, q.shape[-1]).float() @ bank.flat(i).float().T  # (Q·N, K·N)
        top = sim.topk(2, dim=-1).values
        out.append(float(((top[:, 0] - top[:, 1]) < gap).float().mean()))
    return out


def drift(run: PassResult, ref: PassResult) -> dict[str, object]:
    """Drift of `run` against the fp32 pass `ref` (see the module docstring)."""
    def flips(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float] | None:
        return [float((x != y).float().mean()) for x, y in zip(a, b)] if a else None

    return {"nn_flip_global": flips(run.nn_global, ref.nn_global),
            "nn_flip_window": flips(run.nn_window, ref.nn_window),
            "max_map_diff": float(np.abs(run.maps - ref.maps).max()),
            "max_score_diff": float(np.abs(run.scores - ref.scores).max()),
            "d_pixel_auroc": run.pixel_auroc - ref.pixel_auroc,
            "d_image_auroc": run.image_auroc - ref.image_auroc}


def runtime_cfg(device: str, precision: str = "fp32", align_precision: str = "fp32", **kw) -> RuntimeConfig:
    cfg = RuntimeConfig(device=device, precision=precision, align_precision=align_precision, **kw)
    cfg.validate()
    return cfg


def precision_rows(model: FDSL, built: BuiltSet, winmode: str, settings: list[str], device: torch.device,
                   batch: int = 8) -> list[dict]:
    """One row per ``precision/align_precision`` setting of `model` (built with `winmode`): time and drift
    against the fp32/fp32 pass, which always runs first. With winmode nan the align precision changes
    nothing, so one row per distinct precision runs."""
    settings = ["fp32/fp32"] + [s for s in settings if s != "fp32/fp32"]
    if winmode == "nan":
        settings = list(dict.fromkeys(f"{s.split('/')[0]}/fp32" for s in settings))
    ref, rows = None, []
    for s in settings:
        prec, align = s.split("/")
        res = run_pass(model, built, runtime_cfg(str(device), prec, align), device, batch)
        ref = ref or res
        rows.append({"set": built.spec.key, "model": built.spec.model, "image_size": built.spec.image_size,
                     "win": f"{built.spec.win_size}/{built.spec.win_stride}", "winmode": winmode,
                     "precision": prec, "align_precision": align, "n_test": len(res.scores),
                     "s_per_img": res.seconds_per_image, "pixel_auroc": res.pixel_auroc,
                     "image_auroc": res.image_auroc, **drift(res, ref)})
    return rows


DRIFT_HEADER = ("| set | winmode | precision | align | s/img | NN flips global % (per layer) | NN flips window % "
                "| max abs map diff | max score diff | Δ pixel AUROC | Δ image AUROC |\n"
                "|---|---|---|---|---:|---|---|---:|---:|---:|---:|")


def drift_line(r: dict) -> str:
    return (f"| {r['set']} | {r['winmode']} | {r['precision']} | {r['align_precision']} | {r['s_per_img']:.3f} "
            f"| {fmt_flips(r['nn_flip_global'])} | {fmt_flips(r['nn_flip_window'])} | {r['max_map_diff']:.2e} "
            f"| {r['max_score_diff']:.2e} | {r['d_pixel_auroc']:+.4f} | {r['d_image_auroc']:+.4f} |")


def fmt_flips(v: list[float] | None) -> str:
    return "–" if v is None else " / ".join(f"{100 * x:.2f}" for x in v)
