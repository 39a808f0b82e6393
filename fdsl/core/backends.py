"""Backends: where the backbone's passes run. ``torch`` (default) or ``openvino`` (docs/method.md §11).

With ``--backend openvino`` the backbone's global pass (`forward`, images -> tokens) and its window pass
(`forward_patches`, LFE window crops -> tokens) run as OpenVINO models compiled for the CPU in fp32; the
alignment, scorers, NAM and stitching stay in PyTorch. A pass is exported once per input geometry with
``torch.export`` (dynamic batch) and converted by ``openvino.convert_model``; a compiled model is cached per
input shape for the life of the backbone. (The ``example_input`` tracing path of ``convert_model`` fails on
open_clip's attention; ``torch.export`` works.)

The backend wraps a backbone's public passes only: any backbone whose ``forward(images)`` and
``forward_patches(patches)`` dispatch to ``backend.run(name, fn, x)`` with ``fn`` its own PyTorch pass
returning a `BackboneOutput` is supported.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fdsl.config import BACKENDS
from fdsl.core.features import BackboneOutput
from fdsl.errors import ConfigError

log = logging.getLogger(__name__)

OPENVINO_EXTRA = "pip install 'fdsl[openvino]' (openvino==2026.4.1)"
DEFAULT_CACHE_MAX_MB = 400  # fp32 weights: Lite0 (14 MB) and ViT-B (350 MB) are cached by default, ViT-L is not
_OFF = ("none", "off", "0", "")


def default_cache_dir() -> Path:
    """The user cache folder of converted passes (`fdsl.openvino_core.default_cache_dir`)."""
    from fdsl.openvino_core import default_cache_dir as user_cache

    return user_cache()


def resolve_cache(cache: str | None, backbone: nn.Module) -> str | None:
    """The engine cache folder: `cache` (``--engine_cache``; 'none' is off); by default the user cache folder
    for backbones whose fp32 weights are under `DEFAULT_CACHE_MAX_MB` (their converted passes are that size
    on disk, per input geometry), none for larger ones or when $FDSL_ENGINE_CACHE is 'off'."""
    if cache is not None:
        return None if str(cache).strip().lower() in _OFF else str(cache)
    if os.environ.get("FDSL_ENGINE_CACHE", "on").strip().lower() in _OFF:
        return None
    mb = sum(p.numel() * 4 for p in backbone.parameters()) / 2 ** 20
    return str(default_cache_dir()) if mb <= DEFAULT_CACHE_MAX_MB else None


def check_backend(backend: str, device: torch.device, compute_dtype: torch.dtype) -> None:
    """Raise ConfigError unless `backend` can run on `device` in `compute_dtype` (and its package is there)."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return
    if device.type != "cpu":
        raise ConfigError(f"--backend openvino runs on the CPU, not on --device {device}; use --device cpu "
                          "or --backend torch")
    if compute_dtype != torch.float32:
        raise ConfigError("--backend openvino runs in fp32; drop --precision bf16/fp16 or use --backend torch")
    try:
        import openvino  # noqa: F401
    except ImportError:
        raise ConfigError(f"--backend openvino needs the OpenVINO runtime: {OPENVINO_EXTRA}") from None


class _Pass(nn.Module):
    """A backbone pass as a module returning a flat tuple: (L tokens (B, N, C) ..., (B, D) embeddings)."""

    def __init__(self, owner: nn.Module, fn: Callable[[torch.Tensor], BackboneOutput]) -> None:
        super().__init__()
        self.owner = owner  # registered, so its weights are the exported program's parameters
        self.fn = fn

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.fn(x)
        return (*out.tokens, out.image_embeds)


def convert_to_openvino(module: nn.Module, example: torch.Tensor, dynamic_batch: bool = True):
    """An `openvino.Model` of `module` (fp32, CPU tensors) exported by ``torch.export`` on `example`.

    The first dimension is dynamic when `dynamic_batch`; the others are those of `example`. The module runs
    once eagerly first, so caches it fills on first use (the backbone's resized positional grids) hold
    constants, not the ops that computed them.
    """
    import openvino as ov

    shapes = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic_batch else None
    with torch.no_grad():
        module.eval()(example)
        program = torch.export.export(module.eval(), (example,), dynamic_shapes=shapes)
    model = ov.convert_model(program)
    dims = [-1 if (dynamic_batch and i == 0) else int(d) for i, d in enumerate(example.shape)]
    model.reshape({model.inputs[0]: ov.PartialShape(dims)})
    return model


class OpenVINOBackend:
    """Runs named backbone passes as OpenVINO CPU models in fp32, compiled once per input shape.

    Args:
        owner: the backbone module (its weights are exported with each pass).
        threads: CPU threads for inference (None: OpenVINO's default).
    """

    name = "openvino"

    def __init__(self, owner: nn.Module, threads: int | None = None, cache: str | None = None) -> None:
        from fdsl.openvino_core import openvino_core

        self.owner = owner
        self.core = openvino_core()
        self.config: dict[str, object] = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self.cache = Path(cache).expanduser() if cache else None
        if self.cache is not None:
            self.cache.mkdir(parents=True, exist_ok=True)
            self.config["CACHE_DIR"] = str(self.cache / "compiled")  # OpenVINO's own cache of compiled blobs
        self._identity: str | None = None
        self._models: dict[tuple[str, tuple[int, ...]], object] = {}  # per (pass, non-batch shape): ov.Model
        self._compiled: dict[tuple[str, tuple[int, ...]], object] = {}  # per (pass, full shape): compiled model
        self.seconds_compiling = 0.0

    def compiled(self, name: str, fn: Callable[[torch.Tensor], BackboneOutput], x: torch.Tensor):
        """The compiled model of pass `name` for inputs of x's shape (exported and compiled on first use)."""
        import openvino as ov

        key = (name, tuple(x.shape))
        if key not in self._compiled:
            t0 = time.perf_counter()
            base_key = (name, tuple(x.shape[1:]))
            if base_key not in self._models:
                self._models[base_key] = self._converted(name, fn, x)
            model = self._models[base_key].clone()
            model.reshape({model.inputs[0]: ov.PartialShape(list(x.shape))})
            self._compiled[key] = self.core.compile_model(model, "CPU", self.config)
            dt = time.perf_counter() - t0
            self.seconds_compiling += dt
            log.info("openvino: compiled the %s pass for input %s in %.1f s", name, tuple(x.shape), dt)
        return self._compiled[key]

    def identity(self) -> str:
        """A digest of the backbone's weights and buffers, its structure and the torch, OpenVINO and fdsl
        versions (computed once). Settings that change a pass without changing a weight (which layers are
        tapped, token normalisation, ...) are in `pass_key`, through the pass's own outputs."""
        if self._identity is None:
            import openvino as ov

            from fdsl import __version__

            h = hashlib.sha256()
            for key in (type(self.owner).__qualname__, repr(self.owner), torch.__version__, ov.__version__,
                        __version__):
                h.update(key.encode())
            for k, t in sorted({**dict(self.owner.named_parameters()), **dict(self.owner.named_buffers())}.items()):
                h.update(k.encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
            self._identity = h.hexdigest()
        return self._identity

    @torch.no_grad()
    def pass_key(self, name: str, fn: Callable[[torch.Tensor], BackboneOutput], x: torch.Tensor) -> str:
        """The cache key of pass `name` at x's non-batch shape: `identity`, the input shape, and the pass's own
        PyTorch outputs on a fixed probe input (their count, shapes, and values rounded to fp16).

        Whatever the pass's output depends on (tapped layers, normalisation, any attribute added later) is in
        its outputs, so no list of attributes has to be kept current; a rounding that differs by a thread
        count only costs a conversion, never a wrong model.
        """
        h = hashlib.sha256(f"{self.identity()}|{name}|{tuple(x.shape[1:])}".encode())
        probe = torch.randn(1, *x.shape[1:], generator=torch.Generator().manual_seed(0)).to(x.dtype)
        out = fn(probe)
        for t in (*out.tokens, out.image_embeds):
            h.update(repr(tuple(t.shape)).encode())
            h.update(t.detach().float().cpu().to(torch.float16).contiguous().numpy().tobytes())
        return h.hexdigest()[:24]

    def _converted(self, name: str, fn: Callable[[torch.Tensor], BackboneOutput], x: torch.Tensor):
        """The `openvino.Model` of pass `name` at x's non-batch shape: read from the cache folder when a run
        with the same identity wrote it, otherwise exported, converted (and written there)."""
        import openvino as ov

        path = None
        if self.cache is not None:
            shape = "x".join(map(str, x.shape[1:]))
            path = self.cache / f"{type(self.owner).__name__}_{self.pass_key(name, fn, x)}_{name}_{shape}.xml"
            if path.is_file() and path.with_suffix(".bin").is_file():
                log.info("openvino: the %s pass for %s comes from the cache %s", name, tuple(x.shape[1:]), path)
                return self.core.read_model(str(path))
        # an example batch of 2: a batch of 1 would be specialised, not dynamic
        example = x[:1].expand(2, *x.shape[1:]).contiguous().float()
        log.info("openvino: converting the %s pass of %s for input %s; this usually takes 5-60 s on a CPU "
                 "(minutes for ViT-L)%s", name, getattr(self.owner, "model_name", type(self.owner).__name__),
                 tuple(x.shape[1:]), f", kept in {self.cache} for later runs" if self.cache is not None else
                 "; --backend_cache DIR keeps the converted pass for later runs")
        t0 = time.perf_counter()
        try:
            model = convert_to_openvino(_Pass(self.owner, fn), example)
        except Exception as exc:  # torch.export or the OpenVINO frontend: an op it cannot take
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            detail = next((ln for ln in lines if "conversion rule" in ln or "aten." in ln), lines[-1] if lines else "")
            raise ConfigError(f"--backend openvino cannot convert the {name} pass of this "
                              f"{getattr(self.owner, 'model_name', type(self.owner).__name__)} backbone "
                              f"({type(exc).__name__}: {detail[:200]}); use --backend torch") from exc
        log.info("openvino: converted the %s pass in %.1f s", name, time.perf_counter() - t0)
        if path is not None:
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.xml")
            ov.save_model(model, str(tmp), compress_to_fp16=False)
            os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))  # weights first: the .xml marks done
            os.replace(tmp, path)
        return model

    @torch.no_grad()
    def run(self, name: str, fn: Callable[[torch.Tensor], BackboneOutput], x: torch.Tensor) -> BackboneOutput:
        """`fn(x)` computed by the compiled model of pass `name`: L × (B, N, C) tokens, (B, D) embeddings."""
        if x.device.type != "cpu":
            raise ConfigError(f"--backend openvino runs on the CPU; got an input on {x.device}")
        req = self.compiled(name, fn, x)
        out = req(np.ascontiguousarray(x.detach().float().numpy()), share_outputs=False)  # copies: req is reused
        arrays: list[torch.Tensor] = [torch.from_numpy(np.asarray(out[o])) for o in req.outputs]
        return BackboneOutput(arrays[:-1], arrays[-1])


def make_backend(backend: str, backbone: nn.Module, cache: str | None = None):
    """The backend object for `backbone` (None for PyTorch); `cache` is ``--backend_cache`` (`resolve_cache`)."""
    if backend == "torch":
        return None
    if backend == "openvino":
        return OpenVINOBackend(backbone, threads=torch.get_num_threads(), cache=resolve_cache(cache, backbone))
    raise ConfigError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
