"""Memory banks of normal tokens and feature-discrepancy alignment (METHOD.md §2–3).

Alignment is, per layer, a chunked matrix product, an argmax and a gather: never a Python loop
over patches. Chunks bound the size of the similarity block whatever the bank size.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from .errors import ConfigError

_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}


def _row_chunk(rows: int, cols: int, budget_mb: int, dtype: torch.dtype) -> int:
    """How many query rows fit a (rows × cols) similarity block of `budget_mb` MiB."""
    per_row = max(1, cols) * _BYTES.get(dtype, 4)
    return max(1, min(rows, (budget_mb * 2 ** 20) // per_row))


def nearest_normal(query: torch.Tensor, bank: torch.Tensor, mode: str = "mulmax",
                   chunk_mb: int = 256, compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Index of each query token's nearest bank token.

    Args:
        query: (Q, C) tokens.
        bank: (M, C) normal tokens.
        mode: ``mulmax`` (argmax of the dot product) or ``diff2`` (argmin of the L2 distance).
        chunk_mb: bound on the (rows × M) similarity block held at once.
        compute_dtype: dtype of the similarity product (default: the query's).
    Returns:
        (Q,) long indices into `bank`.
    """
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise ConfigError(f"alignment needs (Q, C) queries and an (M, C) bank, got {tuple(query.shape)} "
                          f"and {tuple(bank.shape)}")
    if mode not in ("mulmax", "diff2"):
        raise ConfigError(f"--align_mode {mode!r} is not one of mulmax, diff2")
    dt = compute_dtype or query.dtype
    b = bank.to(dt)
    bias = None
    if mode == "diff2":  # argmin |q-b|² = argmax (2 q·b - |b|²); |q|² is constant per row
        bias = bank.float().pow(2).sum(-1).to(dt)  # (M,)
    step = _row_chunk(query.shape[0], bank.shape[0], chunk_mb, dt)
    out = torch.empty(query.shape[0], dtype=torch.long, device=query.device)
    for s in range(0, query.shape[0], step):  # chunks of rows, not patches: bounded memory
        sim = query[s:s + step].to(dt) @ b.T  # (rows, M)
        if bias is not None:
            sim = 2 * sim - bias
        out[s:s + step] = sim.argmax(dim=-1)
    return out


def residual(query: torch.Tensor, bank: torch.Tensor, mode: str = "mulmax", use_abs: bool = True,
             chunk_mb: int = 256, compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Feature discrepancy r = |f - f̂| of (Q, C) queries against an (M, C) bank; returns (Q, C)."""
    idx = nearest_normal(query, bank, mode, chunk_mb, compute_dtype)
    diff = query - bank[idx].to(query.dtype)  # (Q, C)
    return diff.abs() if use_abs else diff


class MemoryBank(nn.Module):
    """Normalised tokens of the k reference images of one class, per layer.

    Buffers (they move with ``.to()`` and are saved in ``state_dict``):
        tokens_{l}: (k, N, C) tokens of layer l, kept per image.
        image_embeds: (k, D) global image features (for the image-index bank).
    """

    def __init__(self, tokens: Sequence[torch.Tensor], image_embeds: torch.Tensor,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if not tokens:
            raise ConfigError("a memory bank needs at least one layer of tokens")
        k = tokens[0].shape[0]
        for i, t in enumerate(tokens):
            if t.ndim != 3 or t.shape[0] != k:
                raise ConfigError(f"bank layer {i}: expected (k={k}, N, C) tokens, got {tuple(t.shape)}")
        self.num_layers = len(tokens)
        for i, t in enumerate(tokens):
            self.register_buffer(f"tokens_{i}", t.detach().to(dtype or t.dtype).contiguous())
        self.register_buffer("image_embeds", image_embeds.detach().float().contiguous())

    @property
    def k(self) -> int:
        """Number of reference images."""
        return int(self.tokens_0.shape[0])

    def layer(self, i: int) -> torch.Tensor:
        """(k, N, C) tokens of layer i."""
        return getattr(self, f"tokens_{i}")

    def flat(self, i: int) -> torch.Tensor:
        """(k·N, C) tokens of layer i: the dense bank."""
        t = self.layer(i)
        return t.reshape(-1, t.shape[-1])  # (k·N, C)

    def nbytes(self) -> int:
        """Bytes held by the bank's tensors."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def residuals(self, tokens: List[torch.Tensor], mode: str = "mulmax", use_abs: bool = True,
                  chunk_mb: int = 256, compute_dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
        """Residuals of query tokens, per layer: L × (B, N, C) -> L × (B, N, C)."""
        if len(tokens) != self.num_layers:
            raise ConfigError(f"{len(tokens)} query layers against a bank of {self.num_layers}")
        out = []
        for i, q in enumerate(tokens):
            B, N, C = q.shape
            r = residual(q.reshape(B * N, C), self.flat(i), mode, use_abs, chunk_mb, compute_dtype)
            out.append(r.reshape(B, N, C))  # (B, N, C)
        return out
