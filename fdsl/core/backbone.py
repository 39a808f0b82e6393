"""Frozen CLIP vision tower (open_clip) returning intermediate residual-stream tokens.

The architecture (an open_clip model name) is kept apart from the weights (a pretrained tag,
a local file, or `none`). Only the vision tower is kept in memory. The same weights encode
inputs of any size that is a multiple of the patch size; the positional grid for such a size
is resized from the grid stored in the weights with open_clip's own `resize_pos_embed`, which is
what building a second model at that size would do, without a second copy of the ViT.
"""
from __future__ import annotations

import contextlib
import logging
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from fdsl.core.features import BackboneOutput, state_dict_mismatch, warn_random_weights
from fdsl.data.images import OPENAI, Preprocess
from fdsl.errors import CheckpointError, ConfigError
from fdsl.taps import take_indices

log = logging.getLogger(__name__)

_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
_RANDOM_INIT_SEED = 20250611  # fixed, so that `--pretrained none` builds the same backbone everywhere


def register_model_configs(extra: str | None = None) -> None:
    """Make FDSL's own open_clip configs (and an optional user file or folder) known to open_clip."""
    import open_clip

    if "FDSL-Tiny-ViT" not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)
    if extra:
        if not os.path.exists(extra):
            raise ConfigError(f"--model_config {extra!r} does not exist")
        open_clip.add_model_config(extra)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read an open_clip or OpenAI CLIP weights file safely (no pickled code is executed)."""
    from open_clip.factory import load_state_dict

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            is_torchscript = any(n.endswith("constants.pkl") for n in zf.namelist())
        if is_torchscript:  # OpenAI's original release is a TorchScript archive
            log.info("reading TorchScript CLIP archive %s", path)
            sd = torch.jit.load(path, map_location="cpu").state_dict()
            return {k: v for k, v in sd.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    try:
        return load_state_dict(path, device="cpu", weights_only=True)
    except Exception as exc:  # pickle / format errors
        raise CheckpointError(f"cannot read CLIP weights from {path}: {exc}") from exc


def _resolve_weights(model_name: str, pretrained: str, cache_dir: str | None) -> str | None:
    """Path of the weights file for `pretrained` (a tag is downloaded), or None for random init."""
    import open_clip

    if pretrained.lower() == "none":
        return None
    if os.path.isfile(pretrained):
        return pretrained
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise ConfigError(f"--pretrained {pretrained!r}: no such weights file")
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ConfigError(f"--pretrained {pretrained!r} is neither a weights file nor a tag of {model_name} "
                          f"(tags: {tags or 'none'}); 'none' gives random weights")
    try:
        return open_clip.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as exc:
        from fdsl.presets import offline_hint

        cause = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
        raise ConfigError(
            f"could not fetch the {model_name} '{pretrained}' weights ({cause}); {offline_hint()}, or pass a "
            "local CLIP weights file with --pretrained /path/to/weights.pt (HF_HUB_OFFLINE=1 fails at once "
            "instead of retrying)") from exc


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def _quiet_open_clip():
    """Hide open_clip's 'initialized randomly' warning while we build a model to load ourselves."""
    flt = _DropMessage("No pretrained weights loaded")
    root = logging.getLogger()
    handlers = list(root.handlers) or []
    root.addFilter(flt)
    for h in handlers:
        h.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)
        for h in handlers:
            h.removeFilter(flt)


def _use_sequence_first_attention(visual: nn.Module) -> None:
    """Run the blocks in (N, B, C) layout, which `nn.MultiheadAttention` consumes without copies.

    Under CPU bf16 autocast with batch > 1, the batch-first layout hands attention a non-contiguous
    view and every block copies its weights per token: ViT-L at 224 px, 4 images, went from 0.55 to
    13.9 s per image. open_clip supports both layouts and returns the same (B, N, C) outputs; fp32
    results agree to ~1e-7.
    """
    transformer = visual.transformer
    if hasattr(transformer, "batch_first"):
        transformer.batch_first = False
        for block in transformer.resblocks:
            if isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
                block.attn.batch_first = False


class CLIPBackbone(nn.Module):
    """Frozen CLIP ViT that returns normalised patch tokens of chosen blocks and the image embedding.

    Args:
        model_name: open_clip architecture, e.g. ``ViT-L-14-336``.
        pretrained: tag (``openai``), local weights file, or ``none`` (random weights, loud warning).
        image_size: input size S the model is built at (``force_image_size``); grid G = S / patch.
        layers: 1-based block numbers whose outputs are returned (default 6, 12, 18, 24).
        quick_gelu: QuickGELU (CLIP's native activation) instead of GELU (the released code's choice).
        normalize: L2-normalise each token over channels.
        model_config: optional extra open_clip config file or folder to register.
    """

    def __init__(self, model_name: str = "ViT-L-14-336", pretrained: str = "openai", image_size: int = 518,
                 layers: Sequence[int] = (6, 12, 18, 24), quick_gelu: bool = False, normalize: bool = True,
                 model_config: str | None = None, cache_dir: str | None = None) -> None:
        super().__init__()
        import open_clip

        register_model_configs(model_config)
        if model_name not in open_clip.list_models():
            raise ConfigError(f"--model {model_name!r} is not an open_clip architecture; "
                              "see open_clip.list_models() or register one with --model_config")
        weights = _resolve_weights(model_name, pretrained, cache_dir)
        # Random initialisation is seeded locally, so `--pretrained none` gives the same backbone in
        # train.py and test.py (and leaves the caller's RNG untouched).
        with _quiet_open_clip(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_INIT_SEED)
            model = open_clip.create_model(model_name, pretrained=None, force_image_size=image_size,
                                           force_quick_gelu=quick_gelu)
        visual = model.visual
        del model  # the text tower is never used
        if not hasattr(visual, "conv1") or not hasattr(visual, "positional_embedding"):
            raise ConfigError(f"--model {model_name!r} is not a plain CLIP ViT; FDSL needs one")
        patch = visual.patch_size[0] if isinstance(visual.patch_size, tuple) else int(visual.patch_size)
        if image_size % patch:  # checked before building by Geometry.resolve; kept for direct use
            raise ConfigError(f"--image_size {image_size} is not a multiple of the patch size {patch}")

        act = "QuickGELU" if quick_gelu else "GELU"
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if weights else {}
        if tag_cfg and bool(tag_cfg.get("quick_gelu", False)) != quick_gelu:
            log.warning("activation: %s, while the '%s' weights were trained with %s. This is deliberate: the "
                        "released FDSL code runs %s and the paper's numbers come from it (--quick_gelu switches).",
                        act, pretrained, "QuickGELU" if tag_cfg.get("quick_gelu") else "GELU", act)
        else:
            log.info("activation: %s", act)

        if weights is None:
            warn_random_weights(model_name)
            source_pos = visual.positional_embedding.detach().clone()
        else:
            source_pos = self._load_weights(visual, weights)
            log.info("loaded CLIP weights from %s", weights)

        visual.eval()
        visual.requires_grad_(False)
        _use_sequence_first_attention(visual)
        self.visual = visual
        self.model_name = model_name
        self.pretrained = pretrained
        self.image_size = image_size
        self.patch_size = patch
        self.grid_size = image_size // patch
        self.width = int(visual.conv1.out_channels)
        self.embed_dim = int(visual.proj.shape[1]) if visual.proj is not None else self.width
        self.depth = len(visual.transformer.resblocks)
        self.layers = list(layers)
        self.take_indices = take_indices(self.layers, self.depth, "blocks")
        self.widths = [self.width] * len(self.layers)  # per tapped layer (the output contract)
        self.grids = [self.grid_size] * len(self.layers)
        self.preprocess: Preprocess = OPENAI
        self.normalize = normalize
        # The positional grid as stored in the weights (e.g. 24x24 for OpenAI ViT-L-14-336).
        self.register_buffer("source_pos_embed", source_pos, persistent=False)
        self._pos_cache: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        # Where `forward` and `forward_patches` run: None is PyTorch; otherwise a backend object with
        # ``run(name, fn, x)`` (`fdsl.core.backends.OpenVINOBackend`), set through `FDSL.runtime`.
        self.backend = None

    supports_windows = True  # LFE: patch embeddings can be cropped into windows

    @staticmethod
    def _load_weights(visual: nn.Module, path: str) -> torch.Tensor:
        """Load the vision-tower weights of `path` into `visual`; returns the stored positional grid."""
        from open_clip.model import resize_pos_embed

        sd = _read_state_dict(path)
        if any(k.startswith("visual.") for k in sd):
            sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        if "positional_embedding" not in sd:
            raise CheckpointError(f"{path} holds no CLIP vision weights (no 'visual.positional_embedding' key)")
        source_pos = sd["positional_embedding"].detach().clone().float()
        wrapped = {"visual.positional_embedding": sd["positional_embedding"]}
        resize_pos_embed(wrapped, SimpleNamespace(visual=visual))  # bicubic, antialias, like open_clip
        sd["positional_embedding"] = wrapped["visual.positional_embedding"]
        own = visual.state_dict()
        detail = state_dict_mismatch(own, sd)
        if detail:
            raise CheckpointError(f"CLIP weights {path} do not fit the chosen --model: {detail}")
        visual.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)
        return source_pos

    # ------------------------------------------------------------------ positional grids
    def pos_embed_for(self, grid: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(1 + grid², C) positional embedding for a grid×grid input.

        At the build size this is the model's own (loaded) embedding; other sizes are resized from
        the grid stored in the weights, exactly as open_clip does when loading into a model built
        at that size.
        """
        if grid == self.grid_size:
            return self.visual.positional_embedding
        key = (grid, device, dtype)
        if key not in self._pos_cache:
            from open_clip.model import resize_pos_embed

            wrapped = {"visual.positional_embedding": self.source_pos_embed}
            resize_pos_embed(wrapped, SimpleNamespace(visual=SimpleNamespace(grid_size=(grid, grid))))
            self._pos_cache[key] = wrapped["visual.positional_embedding"].to(device=device, dtype=dtype)
        return self._pos_cache[key]

    def _apply(self, fn, recurse=True):  # keep the pos cache consistent with .to()
        self._pos_cache = {}
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> BackboneOutput:
        """Encode (B, 3, H, W) images, H = W a multiple of the patch size.

        Returns per tapped layer (B, (H/p)², C) tokens and (B, D) image embeddings. With a backend set
        (`fdsl.core.backends`), the pass runs there; `encode_images` is the PyTorch pass it compiles.
        """
        if self.backend is not None:
            self.patch_embed_check(images)
            return self.backend.run("images", self.encode_images, images)
        return self.forward_patches(self.patch_embed(images))

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> BackboneOutput:
        """The PyTorch global pass: (B, 3, H, H) images -> `BackboneOutput` (what `forward` computes), never
        through a backend (the pass a backend or `fdsl export` compiles)."""
        return self.encode_patches(self.patch_embed(images))

    def patch_embed_check(self, images: torch.Tensor) -> None:
        """Raise ConfigError unless `images` is a square (B, 3, H, H) batch, H a multiple of the patch size."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise ConfigError(f"expected square (B, 3, H, H) images, got shape {tuple(images.shape)}")
        side = images.shape[-1]
        if side % self.patch_size:
            raise ConfigError(f"input side {side} is not a multiple of the patch size {self.patch_size}")

    @torch.no_grad()
    def patch_embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, H) images -> (B, C, H/p, H/p) patch embeddings (the ViT's `conv1`, no bias).

        Patches do not overlap, so the embedding of any patch-aligned crop of an image is the same crop
        of the image's embedding: LFE embeds each image once and crops its windows from the result.
        """
        self.patch_embed_check(images)
        conv1 = self.visual.conv1
        return conv1(images.to(conv1.weight.dtype))  # (B, C, g, g)

    @torch.no_grad()
    def forward_patches(self, patches: torch.Tensor) -> BackboneOutput:
        """Encode (B, C, g, g) patch embeddings (`patch_embed` of images, or crops of it).

        Adds the class token and the g×g positional grid (`pos_embed_for`), then runs ln_pre and the
        blocks. Returns per tapped layer (B, g², C) tokens and (B, D) image embeddings. With a backend set,
        the pass runs there (the window pass of LFE); `encode_patches` is the PyTorch pass it compiles.
        """
        if patches.ndim != 4 or patches.shape[1] != self.width or patches.shape[2] != patches.shape[3]:
            raise ConfigError(f"expected square (B, {self.width}, g, g) patch embeddings, "
                              f"got shape {tuple(patches.shape)}")
        if self.backend is not None:
            return self.backend.run("patches", self.encode_patches, patches)
        return self.encode_patches(patches)

    @torch.no_grad()
    def encode_patches(self, patches: torch.Tensor) -> BackboneOutput:
        """The PyTorch pass of `forward_patches` on checked (B, C, g, g) patch embeddings."""
        grid = patches.shape[-1]
        v = self.visual
        x = patches.flatten(2).transpose(1, 2)  # (B, g², C)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + g², C)
        x = x + self.pos_embed_for(grid, x.device, x.dtype).to(x.dtype)
        x = v.patch_dropout(x)
        x = v.ln_pre(x)
        x, inter = v.transformer.forward_intermediates(x, indices=self.take_indices)
        tokens = [t[:, 1:] for t in inter]  # L x (B, g², C), CLS dropped, no ln_post
        pooled, _ = v._pool(x)  # (B, C)
        if v.proj is not None:
            pooled = pooled @ v.proj  # (B, D)
        if self.normalize:
            tokens = [F.normalize(t.float(), dim=-1) for t in tokens]
        else:
            tokens = [t.float() for t in tokens]
        return BackboneOutput(tokens, F.normalize(pooled.float(), dim=-1))
