"""`--backend openvino` (fdsl.core.backends): the backbone's passes compiled by OpenVINO give torch's numbers."""
from __future__ import annotations

import csv
import sys

import numpy as np
import pytest
import torch
from fdsl_test_utils import (
    drop_fdsl_log_handlers,
    liven_head,
    save_tiny_checkpoint,
    tiny_data,
    tiny_model_config,
    tiny_test_argv,
)

from fdsl.errors import ConfigError


@pytest.fixture(scope="module")
def backbone():
    from fdsl.core.backbone import CLIPBackbone

    return CLIPBackbone("FDSL-Tiny-ViT", "none", 112, (2, 4))


def test_openvino_passes_equal_torch_and_compile_once_per_shape(backbone):
    from fdsl.core.backends import OpenVINOBackend

    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 112, 112, generator=g)
    crops = backbone.patch_embed(images)[:, :, 2:6, 1:5].contiguous()  # (3, C, 4, 4) window patch grids
    ref_g, ref_w = backbone(images), backbone.forward_patches(crops)
    try:
        backbone.backend = OpenVINOBackend(backbone, threads=1)
        got_g, got_w = backbone(images), backbone.forward_patches(crops)
        for ref, got in ((ref_g, got_g), (ref_w, got_w)):
            assert len(got.tokens) == 2 and got.tokens[0].shape == ref.tokens[0].shape
            for a, b in zip(ref.tokens + [ref.image_embeds], got.tokens + [got.image_embeds]):
                assert float((a - b).abs().max()) < 1e-5
        assert got_w.tokens[0].shape == (3, 16, 64)  # the 4×4 grid got its own positional embedding
        backbone(images[:1])  # another batch size: compiled again, not converted again
        backbone(images)
        assert len(backbone.backend._models) == 2 and len(backbone.backend._compiled) == 3
    finally:
        backbone.backend = None


def _lively_checkpoint(path, data):
    """A checkpoint of the tiny model (TINY_MODEL_ARGS) whose head has data-driven BN statistics: an untrained
    head scores every image about the same, which would make a comparison of scores weak."""
    import dataclasses

    from fdsl.core.model import FDSL
    from fdsl.data.meta import load_meta
    from fdsl.data.shots import load_reference_images
    from fdsl.engine.checkpoint import save_checkpoint

    mcfg = tiny_model_config(winmode="mul", win_size=2, win_stride=1)
    torch.manual_seed(0)
    model = FDSL.from_config(mcfg).eval()
    meta = load_meta(str(data))
    cls = sorted(meta["test"])[0]
    train = [it["img_path"] for it in meta["train"][cls]][:1]
    test = [it["img_path"] for it in meta["test"][cls]]
    liven_head(model, load_reference_images(data, train, 56), load_reference_images(data, test, 56))
    mcfg.winmode = "nan"  # the saved config is the global one; test.py's --winmode switches LFE on
    save_checkpoint(path, model.head, dataclasses.asdict(mcfg), epoch=1)
    return path


def _scores(path):
    with open(path, newline="") as fh:
        return {r["img_path"]: (float(r["patch_score"]), float(r["map_max"])) for r in csv.DictReader(fh)}


@pytest.mark.parametrize("lfe", [False, True])
def test_test_py_engine_openvino_gives_torch_scores(tmp_path, lfe):
    """test.py with --backend openvino: per-image scores equal --backend torch's to 1e-4 (random weights: a
    nearest-neighbour near-tie could flip one; none does here)."""
    from fdsl.cli.jobs import test_main

    data = tiny_data(tmp_path / "data", n_test_good=3, n_test_bad=3)
    ck = _lively_checkpoint(tmp_path / "ck.pth", data)
    extra = ["--winmode", "mul", "--win_size", "2", "--win_stride", "1"] if lfe else []
    for backend in ("torch", "openvino"):
        argv = tiny_test_argv(data, ck, tmp_path / backend, "--backend", backend, "--aupro", "0", *extra)
        assert test_main(argv) == 0
        drop_fdsl_log_handlers()
    ref, got = _scores(tmp_path / "torch" / "scores.csv"), _scores(tmp_path / "openvino" / "scores.csv")
    assert ref.keys() == got.keys() and len(ref) == 6
    assert np.std([v[0] for v in ref.values()]) > 1e-3, "scores should vary, or the comparison says little"
    diff = np.abs(np.array([ref[k] for k in ref]) - np.array([got[k] for k in ref]))
    assert float(diff.max()) < 1e-4, diff.max()


def test_engine_errors_are_one_line_and_name_the_extra(tmp_path, monkeypatch):
    from fdsl.cli.jobs import test_main
    from fdsl.core.backends import check_backend

    with pytest.raises(ConfigError, match="--device"):
        check_backend("openvino", torch.device("cuda:0"), torch.float32)
    with pytest.raises(ConfigError, match="fp32"):
        check_backend("openvino", torch.device("cpu"), torch.bfloat16)
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if the package were not installed
    with pytest.raises(ConfigError, match=r"fdsl\[openvino\]"):
        check_backend("openvino", torch.device("cpu"), torch.float32)
    data = tiny_data(tmp_path / "data")
    ck = save_tiny_checkpoint(tmp_path / "ck.pth")
    assert test_main(tiny_test_argv(data, ck, tmp_path / "r", "--backend", "openvino")) == 2
    drop_fdsl_log_handlers()


def test_train_py_engine_openvino_trains_the_same_head(tmp_path):
    """train.py --backend openvino (frozen backbone through OpenVINO) trains the head torch trains, up to Adam's
    amplification of ~1e-7 feature differences (its normalised steps move weights by up to ~lr on near-zero
    gradients)."""
    from fdsl_test_utils import TINY_MODEL_ARGS

    from fdsl.cli.jobs import train_main

    data = tiny_data(tmp_path / "data", n_test_good=2, n_test_bad=2)
    heads = {}
    for e in ("torch", "openvino"):
        argv = [*TINY_MODEL_ARGS, "--train_data_path", str(data), "--save_path", str(tmp_path / e), "--epoch", "1",
                "--k_shot", "1", "--batch_size", "2", "--num_workers", "0", "--backend", e, "--seed", "0"]
        assert train_main(argv) == 0
        drop_fdsl_log_handlers()
        heads[e] = torch.load(tmp_path / e / "epoch_1.pth", weights_only=True)["head"]
    assert heads["torch"].keys() == heads["openvino"].keys()
    diffs = [float((heads["torch"][k].float() - heads["openvino"][k].float()).abs().max())
             for k in heads["torch"] if heads["torch"][k].is_floating_point()]
    assert max(diffs) < 5e-3


def test_backend_cache_skips_conversion_in_a_later_run(backbone, tmp_path, monkeypatch):
    """--backend_cache: a second backend (a later run) reads the converted pass instead of exporting it again,
    with the same tokens; other weights get another cache entry."""
    import fdsl.core.backends as backends

    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    ref = backbone(x)
    try:
        backbone.backend = backends.OpenVINOBackend(backbone, threads=1, cache=str(tmp_path))
        first = backbone(x)
        assert len(list(tmp_path.glob("*.xml"))) == 1
        monkeypatch.setattr(backends, "convert_to_openvino", lambda *a, **k: pytest.fail("converted again"))
        backbone.backend = backends.OpenVINOBackend(backbone, threads=1, cache=str(tmp_path))
        second = backbone(x)
    finally:
        backbone.backend = None
    for a, b, c in zip(ref.tokens, first.tokens, second.tokens):
        assert float((a - b).abs().max()) < 1e-5 and torch.equal(b, c)
    before = backends.OpenVINOBackend(backbone, threads=1, cache=str(tmp_path)).identity()
    with torch.no_grad():
        backbone.visual.ln_pre.bias.add_(1e-3)  # other weights: another identity, so another cache entry
    try:
        assert backends.OpenVINOBackend(backbone, threads=1, cache=str(tmp_path)).identity() != before
    finally:
        with torch.no_grad():
            backbone.visual.ln_pre.bias.sub_(1e-3)


def test_timm_backbones_run_on_openvino_or_refuse_in_one_line():
    """A timm CNN (EfficientNet-Lite0) gives torch's tokens on OpenVINO; a timm ViT, whose positional grid is
    resampled with an op OpenVINO lacks, is a ConfigError naming the pass, not a traceback."""
    from test_backbone_contract import TINY_VIT

    from fdsl.core.backends import OpenVINOBackend
    from fdsl.core.timm_backbone import TimmBackbone

    cnn = TimmBackbone("timm:tf_efficientnet_lite0", "none", 64, [3, 4]).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    ref = cnn(x)
    cnn.backend = OpenVINOBackend(cnn, threads=1)
    got = cnn(x)
    for a, b in zip(ref.tokens + [ref.image_embeds], got.tokens + [got.image_embeds]):
        assert a.shape == b.shape and float((a - b).abs().max()) < 1e-5
    vit = TimmBackbone("timm:vit_tiny_patch16_224", "none", 96, [1, 3], model_kwargs=TINY_VIT).eval()
    vit.backend = OpenVINOBackend(vit, threads=1)
    with pytest.raises(ConfigError, match="cannot convert the images pass"):
        vit(torch.randn(2, 3, 96, 96))


def test_engine_cache_keys_on_the_pass_outputs_not_on_a_list_of_attributes(tmp_path):
    """--engine_cache with two layer choices of one timm backbone (same weights, same repr): the second run
    converts its own pass and gives its own layers' tokens, instead of reading the first run's model."""
    from fdsl.core.backends import OpenVINOBackend
    from fdsl.core.timm_backbone import TimmBackbone

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    for layers in ([3, 4], [2, 3]):
        cnn = TimmBackbone("timm:tf_efficientnet_lite0", "none", 64, layers).eval()
        ref = cnn(x)
        cnn.backend = OpenVINOBackend(cnn, threads=1, cache=str(tmp_path))
        got = cnn(x)
        assert [t.shape for t in got.tokens] == [t.shape for t in ref.tokens], layers
        for a, b in zip(ref.tokens + [ref.image_embeds], got.tokens + [got.image_embeds]):
            assert float((a - b).abs().max()) < 1e-5, layers
    assert len(list(tmp_path.glob("*_images_*.xml"))) == 2  # one converted pass per layer choice
