"""Tests for fdsl.core.backbone on the tiny random CLIP (FDSL-Tiny-ViT: patch 14, width 64, 4 blocks).

The weights are written by the tests themselves, so the real file-loading path is exercised,
and the reference for every number is open_clip itself (a model built at the same size and
loaded from the same file).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import resize_pos_embed
from open_clip.transformer import QuickGELU
from torch import nn

from fdsl.core.backbone import CLIPBackbone, register_model_configs
from fdsl.errors import CheckpointError, ConfigError

MODEL = "FDSL-Tiny-ViT"
PATCH = 14
BUILD = 112  # grid 8


def _open_clip_model(size: int, weights: Path | None = None, quick_gelu: bool = False) -> nn.Module:
    """open_clip's own model built at `size`, optionally loaded from `weights` (open_clip resizes the grid)."""
    register_model_configs()
    model = open_clip.create_model(MODEL, pretrained=None, force_image_size=size, force_quick_gelu=quick_gelu)
    if weights is not None:
        open_clip.load_checkpoint(model, str(weights))
    return model.eval()


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("clip_weights")


@pytest.fixture(scope="module")
def weights_112(weights_dir) -> Path:
    """A full open_clip state dict saved from a model built at the build size (stored grid 8x8)."""
    torch.manual_seed(0)
    path = weights_dir / "tiny112.pt"
    torch.save(_open_clip_model(BUILD).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def weights_224(weights_dir) -> Path:
    """A full open_clip state dict saved from a model built at 224 px: stored grid 16x16 != build grid 8x8."""
    torch.manual_seed(1)
    path = weights_dir / "tiny224.pt"
    torch.save(_open_clip_model(224).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def visual_only_112(weights_dir, weights_112) -> Path:
    """The same weights as `weights_112`, but only the vision tower, without the 'visual.' prefix."""
    sd = torch.load(weights_112, weights_only=True)
    path = weights_dir / "tiny112_visual.pt"
    torch.save({k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}, path)
    return path


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randn(2, 3, BUILD, BUILD, generator=g)


def _backbone(weights, layers=(1, 2, 3, 4), size=BUILD, **kw) -> CLIPBackbone:
    return CLIPBackbone(MODEL, str(weights), size, layers, **kw)


def _ref_intermediates(model: nn.Module, x: torch.Tensor, layers) -> tuple[list, torch.Tensor]:
    """open_clip's own (normalised) intermediates and normalised image features."""
    with torch.no_grad():
        out = model.visual.forward_intermediates(x, indices=[layer - 1 for layer in layers], output_fmt="NLC")
    toks = [F.normalize(t, dim=-1) for t in out["image_intermediates"]]
    return toks, F.normalize(out["image_features"], dim=-1)


# ---------------------------------------------------------------------------- output contract
@pytest.mark.parametrize("layers", [[1, 2, 3, 4], [2, 4], [3]])
@pytest.mark.parametrize("normalize", [True, False])
def test_output_contract(weights_112, images, layers, normalize) -> None:
    bb = _backbone(weights_112, layers, normalize=normalize)
    assert (bb.grid_size, bb.patch_size, bb.width, bb.depth) == (8, PATCH, 64, 4)
    out = bb(images)
    assert len(out.tokens) == len(layers)
    for t in out.tokens:
        assert t.shape == (2, 8 * 8, 64)  # (B, G², C): CLS dropped
        assert t.dtype == torch.float32
        norms = t.norm(dim=-1)
        if normalize:
            torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
        else:
            assert (norms - 1).abs().max() > 1e-2  # raw residual stream is not unit-norm
    assert out.image_embeds.shape == (2, bb.embed_dim) == (2, 32)  # (B, D)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)


def test_equals_open_clip_forward_intermediates(weights_112, images) -> None:
    layers = [1, 2, 3, 4]
    bb = _backbone(weights_112, layers)
    ours = bb(images)
    ref_toks, ref_feat = _ref_intermediates(_open_clip_model(BUILD, weights_112), images, layers)
    assert len(ours.tokens) == len(ref_toks)
    for a, b in zip(ours.tokens, ref_toks):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.image_embeds, ref_feat, atol=1e-5, rtol=1e-5)
    # and the image embedding is the model's own encode_image, normalised
    with torch.no_grad():
        enc = F.normalize(_open_clip_model(BUILD, weights_112).encode_image(images), dim=-1)
    torch.testing.assert_close(ours.image_embeds, enc, atol=1e-5, rtol=1e-5)
    # the tapped layers really differ from each other (the comparison above is not vacuous)
    assert (ours.tokens[0] - ours.tokens[-1]).abs().max() > 1e-2


def test_visual_only_weights_file_loads_the_same(weights_112, visual_only_112, images) -> None:
    a = _backbone(weights_112, [2, 4])(images)
    b = _backbone(visual_only_112, [2, 4])(images)
    for x, y in zip(a.tokens, b.tokens):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    torch.testing.assert_close(a.image_embeds, b.image_embeds, atol=0, rtol=0)


def test_weights_are_really_loaded(weights_112, images) -> None:
    sd = torch.load(weights_112, weights_only=True)
    bb = _backbone(weights_112)
    for k, v in bb.visual.state_dict().items():
        torch.testing.assert_close(v, sd["visual." + k], atol=0, rtol=0, msg=f"visual.{k} not loaded")
    # a randomly initialised backbone gives different tokens
    torch.manual_seed(99)
    rnd = CLIPBackbone(MODEL, "none", BUILD, [4])(images).tokens[0]
    assert (rnd - bb(images).tokens[-1]).abs().max() > 1e-2


def test_layers_are_one_based(weights_112, images) -> None:
    """Layer 1 is the output of block index 0 (a manual pass through open_clip's modules)."""
    bb = _backbone(weights_112, [1])
    v = bb.visual
    with torch.no_grad():
        x = v._embeds(images).transpose(0, 1)  # (1 + G², B, C): the backbone runs blocks sequence-first
        x0 = v.transformer.resblocks[0](x).transpose(0, 1)  # block index 0 -> (B, 1 + G², C)
        x1 = v.transformer.resblocks[1](x0.transpose(0, 1)).transpose(0, 1)
    expected = F.normalize(x0[:, 1:], dim=-1)
    got = bb(images).tokens[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - F.normalize(x1[:, 1:], dim=-1)).abs().max() > 1e-2  # not block index 1


def test_layers_must_be_increasing_and_distinct(weights_112) -> None:
    """open_clip returns tapped blocks in block order, so a shuffled or repeated list is refused."""
    with pytest.raises(ConfigError, match="increasing"):
        _backbone(weights_112, [4, 1])
    with pytest.raises(ConfigError, match="repeats"):
        _backbone(weights_112, [2, 2])


def test_each_token_tensor_belongs_to_its_block(weights_112, images) -> None:
    bb = _backbone(weights_112, [1, 4])
    toks = bb(images).tokens
    single = {layer: _backbone(weights_112, [layer])(images).tokens[0] for layer in (1, 4)}
    for layer, t in zip(bb.layers, toks):
        torch.testing.assert_close(t, single[layer], atol=1e-6, rtol=0,
                                   msg=f"tokens for layer {layer} do not belong to block {layer}")


# ---------------------------------------------------------------------------- other input sizes
def test_smaller_input_matches_open_clip_built_at_that_size(weights_112) -> None:
    """56 px (grid 4) through the 112-px backbone == open_clip built at 56 px loading the same file."""
    layers = [2, 4]
    bb = _backbone(weights_112, layers)
    x = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    out = bb(x)
    assert [t.shape for t in out.tokens] == [(3, 16, 64)] * 2
    assert out.image_embeds.shape == (3, 32)

    # the positional grid is open_clip's resize_pos_embed of the stored grid
    wrapped = {"visual.positional_embedding": bb.source_pos_embed.clone()}
    resize_pos_embed(wrapped, SimpleNamespace(visual=SimpleNamespace(grid_size=(4, 4))))
    pos = bb.pos_embed_for(4, torch.device("cpu"), torch.float32)
    assert pos.shape == (17, 64)
    torch.testing.assert_close(pos, wrapped["visual.positional_embedding"], atol=1e-6, rtol=0)

    ref = _open_clip_model(56, weights_112)
    torch.testing.assert_close(pos, ref.visual.positional_embedding.detach(), atol=1e-6, rtol=0)
    ref_toks, ref_feat = _ref_intermediates(ref, x, layers)
    for a, b in zip(out.tokens, ref_toks):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.image_embeds, ref_feat, atol=1e-5, rtol=1e-5)

    # the build size still uses the model's own grid afterwards (cache does not leak across sizes)
    assert bb.pos_embed_for(8, torch.device("cpu"), torch.float32) is bb.visual.positional_embedding


def test_window_path_resizes_from_the_stored_grid_not_the_build_grid(weights_224) -> None:
    """Weights saved at 224 px (stored grid 16); backbone built at 112 px (grid 8); input 56 px (grid 4).

    The right grid-4 embedding is resize(16 -> 4), what open_clip gives a model built at 56 px.
    resize(resize(16 -> 8) -> 4) is different, and must not be used.
    """
    layers = [1, 3]
    bb = _backbone(weights_224, layers)
    stored = torch.load(weights_224, weights_only=True)["visual.positional_embedding"]
    assert stored.shape == (1 + 16 * 16, 64)
    torch.testing.assert_close(bb.source_pos_embed, stored, atol=0, rtol=0)
    assert bb.visual.positional_embedding.shape == (1 + 8 * 8, 64)

    ref = _open_clip_model(56, weights_224)
    right = ref.visual.positional_embedding.detach()  # 16 -> 4
    wrong = {"visual.positional_embedding": bb.visual.positional_embedding.detach().clone()}
    resize_pos_embed(wrong, SimpleNamespace(visual=SimpleNamespace(grid_size=(4, 4))))  # 16 -> 8 -> 4
    assert (right - wrong["visual.positional_embedding"]).abs().max() > 1e-3  # the check can discriminate

    pos = bb.pos_embed_for(4, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(pos, right, atol=1e-6, rtol=0)

    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(6))
    out = bb(x)
    ref_toks, ref_feat = _ref_intermediates(ref, x, layers)
    for a, b in zip(out.tokens, ref_toks):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.image_embeds, ref_feat, atol=1e-5, rtol=1e-5)

    # and at the build size it equals open_clip built at 112 from the same file (16 -> 8)
    x112 = torch.randn(2, 3, BUILD, BUILD, generator=torch.Generator().manual_seed(7))
    ref_toks, _ = _ref_intermediates(_open_clip_model(BUILD, weights_224), x112, layers)
    for a, b in zip(bb(x112).tokens, ref_toks):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 3, 50, 50), (1, 3, 56, 42), (1, 1, 56, 56), (3, 56, 56)])
def test_bad_input_shape_is_an_error(weights_112, shape) -> None:
    bb = _backbone(weights_112, [1])
    with pytest.raises(ConfigError):
        bb(torch.zeros(shape))


# ---------------------------------------------------------------------------- errors
def test_weights_of_another_width_raise_checkpoint_error(tmp_path) -> None:
    cfg_path = Path(__file__).resolve().parents[2] / "fdsl" / "core" / "model_configs" / f"{MODEL}.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["vision_cfg"]["width"] = 32
    cfg_file = tmp_path / "FDSL-Test-W32.json"
    cfg_file.write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_file)
    narrow = open_clip.create_model("FDSL-Test-W32", pretrained=None)
    assert narrow.visual.conv1.out_channels == 32
    path = tmp_path / "w32.pt"
    torch.save(narrow.state_dict(), path)
    with pytest.raises(CheckpointError) as exc:
        _backbone(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "32" in msg and "64" in msg  # both widths appear in the shape report


def test_weights_file_without_clip_vision_keys(tmp_path) -> None:
    path = tmp_path / "not_clip.pt"
    torch.save({"foo": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="positional_embedding"):
        _backbone(path)


def test_garbage_weights_file(tmp_path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="garbage.pt"):
        _backbone(path)


def test_unknown_tag_is_config_error() -> None:
    with pytest.raises(ConfigError) as exc:
        CLIPBackbone(MODEL, "laion2b_nonsense", BUILD, [1])
    msg = str(exc.value)
    assert "laion2b_nonsense" in msg
    assert "none" in msg  # tells the user about the random-weight option


def test_nonexistent_weights_file_is_config_error(tmp_path) -> None:
    missing = tmp_path / "missing" / "weights.pt"
    with pytest.raises(ConfigError) as exc:
        CLIPBackbone(MODEL, str(missing), BUILD, [1])
    assert str(missing) in str(exc.value)


def test_unknown_architecture_is_config_error() -> None:
    with pytest.raises(ConfigError, match="ViT-Nope"):
        CLIPBackbone("ViT-Nope", "none", BUILD, [1])


@pytest.mark.parametrize("layers", [[5], [1, 5], [0], [4, 0]])
def test_layer_out_of_range_is_config_error(layers) -> None:
    with pytest.raises(ConfigError) as exc:
        CLIPBackbone(MODEL, "none", BUILD, layers)
    bad = [x for x in layers if not 1 <= x <= 4]
    assert str(bad) in str(exc.value)
    assert "4 blocks" in str(exc.value)


@pytest.mark.parametrize("size", [100, 113, 120])
def test_image_size_not_multiple_of_patch(size) -> None:
    with pytest.raises(ConfigError, match=str(size)):
        CLIPBackbone(MODEL, "none", size, [1])


# ---------------------------------------------------------------------------- activation, frozen
def _acts(bb: CLIPBackbone) -> list:
    return [blk.mlp.gelu for blk in bb.visual.transformer.resblocks]


def test_quick_gelu_switch_changes_modules_and_outputs(weights_112, images) -> None:
    plain = _backbone(weights_112, [4], quick_gelu=False)
    quick = _backbone(weights_112, [4], quick_gelu=True)
    assert len(_acts(plain)) == 4
    assert all(type(a) is nn.GELU for a in _acts(plain))
    assert all(isinstance(a, QuickGELU) for a in _acts(quick))
    a, b = plain(images), quick(images)
    assert (a.tokens[0] - b.tokens[0]).abs().max() > 1e-3
    # QuickGELU output equals open_clip's own QuickGELU model loaded from the same file
    ref_toks, _ = _ref_intermediates(_open_clip_model(BUILD, weights_112, quick_gelu=True), images, [4])
    torch.testing.assert_close(b.tokens[0], ref_toks[0], atol=1e-5, rtol=1e-5)


def test_backbone_is_frozen(weights_112, images) -> None:
    bb = _backbone(weights_112, [2, 4])
    params = list(bb.parameters())
    assert params, "the backbone should hold the ViT parameters"
    assert not any(p.requires_grad for p in params)
    assert not bb.visual.training
    out = bb(images.requires_grad_(True))
    assert not out.tokens[0].requires_grad and not out.image_embeds.requires_grad


def test_no_text_tower_kept(weights_112) -> None:
    bb = _backbone(weights_112, [1])
    n_visual = sum(p.numel() for p in bb.visual.parameters())
    assert sum(p.numel() for p in bb.parameters()) == n_visual
    assert not any(name.startswith(("transformer.", "token_embedding", "text")) for name, _ in bb.named_parameters())


def test_blocks_run_sequence_first_with_the_same_outputs(weights_112, images) -> None:
    """The (N, B, C) block layout (fast under CPU bf16 autocast) gives open_clip's batch-first outputs."""
    bb = _backbone(weights_112, [2, 4])
    assert bb.visual.transformer.batch_first is False
    assert all(blk.attn.batch_first is False for blk in bb.visual.transformer.resblocks)
    fresh = _backbone(weights_112, [2, 4])
    fresh.visual.transformer.batch_first = True
    for blk in fresh.visual.transformer.resblocks:
        blk.attn.batch_first = True
    for a, b in zip(bb(images).tokens, fresh(images).tokens):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_random_weights_are_the_same_in_every_process() -> None:
    """`--pretrained none` must give train.py and test.py the same backbone, whatever the global RNG."""
    torch.manual_seed(1)
    a = CLIPBackbone(MODEL, "none", BUILD, [1])
    torch.manual_seed(2)
    state = torch.random.get_rng_state()
    b = CLIPBackbone(MODEL, "none", BUILD, [1])
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
