"""Helpers shared by several test modules."""
import dataclasses

import torch
from torch import nn

from fdsl.config import ModelConfig, RuntimeConfig
from fdsl.model import FDSL
from fdsl.run import resolve_runtime

_RUNTIME_FIELDS = {f.name for f in dataclasses.fields(RuntimeConfig)}


def tiny_lfe_settings(weights, layers=(2, 4), **overrides) -> dict:
    """Flat settings of the tiny CLIP at 112 px (8×8 grid) with LFE `mul` 4/2, from a weights file."""
    kw = dict(model="FDSL-Tiny-ViT", pretrained=str(weights), image_size=112, features_list=list(layers),
              few_shot_features=list(layers), winmode="mul", win_size=4, win_stride=2)
    kw.update(overrides)
    return kw


def build_model(**settings) -> FDSL:
    """An FDSL model from flat command-line-style settings: method ones to ModelConfig, runtime ones
    (win_batch, bank_dtype, align_chunk_mb, precision) resolved on the CPU as a run would."""
    runtime = {k: settings.pop(k) for k in list(settings) if k in _RUNTIME_FIELDS}
    return FDSL.from_config(ModelConfig(**settings), resolve_runtime(RuntimeConfig(device="cpu", **runtime),
                                                                     torch.device("cpu")))


@torch.no_grad()
def liven_head(model: FDSL, refs: torch.Tensor, calib: torch.Tensor) -> FDSL:
    """Give an untrained head data-driven BN statistics and larger logits, so its maps vary visibly.

    A freshly initialised scorer outputs ~0.5 everywhere, which would make map comparisons weak.
    The BN statistics are the cumulative average over one global and one window pass of `calib`
    against a memory of `refs` (both branches, whatever the model's winmode).
    """
    mem = model.make_memory(model.encode_references(refs, windows=True))
    bns = [m for m in model.head.modules() if isinstance(m, nn.BatchNorm1d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration passes
    model.head.train()
    model.head(model.residuals(mem.global_bank, model.extract(calib)))
    model.head(model.residuals(mem.window_bank, model.extract_windows(calib)))
    model.head.eval()
    for bn in bns:
        bn.momentum = 0.1
    for s in model.head.scorers:
        s.proj[9].weight.mul_(5.0)
    model.head.nam.conv2.weight.mul_(3.0)
    return model
