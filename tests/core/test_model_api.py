"""The model's API (#15 §4): one maps path for both branches, the patch embedding once per image with LFE,
a memory-set object for nested banks, and the detector scoring with the model's pred_score."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from fdsl_test_utils import global_maps
from PIL import Image

from fdsl.config import ModelConfig
from fdsl.core.backbone import register_model_configs
from fdsl.core.memory import MemorySet
from fdsl.core.model import FDSL
from fdsl.inspect.detector import Detector


@pytest.fixture(scope="module")
def lfe_model():
    register_model_configs()
    cfg = ModelConfig(model="FDSL-Tiny-ViT", pretrained="none", image_size=112, features_list=[2, 4],
                      few_shot_features=[2, 4], winmode="mul", win_size=4, win_stride=2, use_nam=True)
    torch.manual_seed(0)
    return FDSL.from_config(cfg).eval()


def _images(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


class ConvSpy:
    """Counts the images the ViT's patch embedding (conv1) sees."""

    def __init__(self, model: FDSL) -> None:
        self.images = 0
        self.handle = model.backbone.visual.conv1.register_forward_hook(self.hook)

    def hook(self, module, inputs, output) -> None:
        self.images += inputs[0].shape[0]


def test_patch_embedding_runs_once_per_image_with_lfe_mul(lfe_model):
    spy = ConvSpy(lfe_model)
    try:
        refs = lfe_model.encode_references(_images(1, 2))
        assert spy.images == 2  # both banks from one patch embedding per reference image
        memory = lfe_model.make_memory(refs)
        spy.images = 0
        lfe_model.predict(_images(2, 3), [memory], 28)
        assert spy.images == 3  # global branch and every window from one patch embedding per query
    finally:
        spy.handle.remove()


def test_shared_patch_embedding_gives_the_separate_results(lfe_model):
    refs = _images(3, 2)
    memory = lfe_model.make_memory(lfe_model.encode_references(refs))
    q = _images(4, 2)
    out = lfe_model.predict(q, [memory], 28)[0]
    # By hand, each branch encoding on its own: global features from the images, windows from their own conv1.
    glob = global_maps(lfe_model, lfe_model.extract(q), memory)
    wins = lfe_model.window_maps(q, [memory])[0]
    from fdsl.core.model import combine_layers

    g_map, g_patch = combine_layers(glob, 28)
    w_map, w_patch = combine_layers(wins, 28)
    torch.testing.assert_close(out.anomaly_map, 0.5 * g_map + 0.5 * w_map, atol=0, rtol=0)
    torch.testing.assert_close(out.patch_score, 0.5 * g_patch + 0.5 * w_patch, atol=0, rtol=0)


def test_memory_set_groups_nested_memories_and_scores_them_like_separate_ones(lfe_model):
    base = lfe_model.make_memory(lfe_model.encode_references(_images(5, 3)))
    other = lfe_model.make_memory(lfe_model.encode_references(_images(6, 1)))
    mems = MemorySet()
    assert mems.add_prefix(base, 1) == 0 and mems.add(other) == 1 and mems.add_prefix(base, 3) == 2
    groups = mems.groups()
    assert [(b is base, pos) for b, pos in groups] == [(True, [0, 2]), (False, [1])]
    assert not hasattr(mems[0], "nested_in")  # nesting lives in the set, not on the memories
    q = _images(7, 2)
    together = lfe_model.predict(q, mems, 28)
    alone = [lfe_model.predict(q, [m], 28)[0] for m in (base.prefix(1), other, base)]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a.anomaly_map, b.anomaly_map, atol=0, rtol=0)
        torch.testing.assert_close(a.pred_score, b.pred_score, atol=0, rtol=0)


def test_detector_scores_are_the_models_pred_score(lfe_model):
    memory = lfe_model.make_memory(lfe_model.encode_references(_images(8, 1)))
    det = Detector(lfe_model, memory, {"cal_image_size": 28})
    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(2)]
    preds = det.score_images(pics)
    from fdsl.data.images import image_transform

    batch = torch.stack([image_transform(112)(p) for p in pics])
    want = lfe_model.predict(batch, [memory], 28)[0].pred_score
    assert [p.score for p in preds] == [float(x) for x in want]
