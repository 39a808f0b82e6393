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
                   chunk_mb: int = 64, compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
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
            sim.mul_(2).sub_(bias)  # in place: no extra similarity-sized blocks
        out[s:s + step] = sim.argmax(dim=-1)
    return out


def residual(query: torch.Tensor, bank: torch.Tensor, mode: str = "mulmax", use_abs: bool = True,
             chunk_mb: int = 64, compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Feature discrepancy r = |f - f̂| of (Q, C) queries against an (M, C) bank; returns (Q, C)."""
    idx = nearest_normal(query, bank, mode, chunk_mb, compute_dtype)
    diff = query - bank[idx].to(query.dtype)  # (Q, C)
    return diff.abs() if use_abs else diff


def nearest_in_items(query: torch.Tensor, items: torch.Tensor, sel: torch.Tensor, mode: str = "mulmax",
                     chunk_mb: int = 64, compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Per query item, the nearest token within one chosen bank item (image-index search).

    Args:
        query: (Q, N, C) tokens of Q query items (images or windows).
        items: (K, M, C) bank tokens of K stored items.
        sel: (Q,) index of the bank item each query item is aligned against.
    Returns:
        (Q, N, C) the chosen nearest bank tokens, in the bank's dtype.
    """
    if mode not in ("mulmax", "diff2"):
        raise ConfigError(f"--align_mode {mode!r} is not one of mulmax, diff2")
    Q, N, C = query.shape
    dt = compute_dtype or query.dtype
    step = max(1, _row_chunk(Q * N, items.shape[1], chunk_mb, dt) // max(N, 1))
    out = torch.empty(Q, N, C, dtype=items.dtype, device=query.device)
    for s in range(0, Q, step):  # chunks of query items, bounded memory
        cand = items[sel[s:s + step]]  # (q, M, C)
        sim = torch.bmm(query[s:s + step].to(dt), cand.to(dt).transpose(1, 2))  # (q, N, M)
        if mode == "diff2":
            sim.mul_(2).sub_(cand.float().pow(2).sum(-1).to(dt).unsqueeze(1))
        idx = sim.argmax(dim=-1)  # (q, N)
        out[s:s + step] = torch.gather(cand, 1, idx.unsqueeze(-1).expand(-1, -1, C))  # (q, N, C)
    return out


class MemoryBank(nn.Module):
    """Normalised tokens of the reference items of one class, per layer.

    An item is a reference image (global branch) or a reference window (LFE branch).

    Buffers (they move with ``.to()`` and are saved in ``state_dict``):
        tokens_{l}: (K, N, C) tokens of layer l, kept per item.
        image_embeds: (K, D) L2-normalised global features of the items (image-index search).
    """

    def __init__(self, tokens: Sequence[torch.Tensor], image_embeds: torch.Tensor,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if not tokens:
            raise ConfigError("a memory bank needs at least one layer of tokens")
        k = tokens[0].shape[0]
        for i, t in enumerate(tokens):
            if t.ndim != 3 or t.shape[0] != k:
                raise ConfigError(f"bank layer {i}: expected (K={k}, N, C) tokens, got {tuple(t.shape)}")
        if image_embeds.ndim != 2 or image_embeds.shape[0] != k:
            raise ConfigError(f"bank embeddings: expected ({k}, D), got {tuple(image_embeds.shape)}")
        self.num_layers = len(tokens)
        for i, t in enumerate(tokens):
            self.register_buffer(f"tokens_{i}", t.detach().to(dtype or t.dtype).contiguous())
        self.register_buffer("image_embeds", image_embeds.detach().to(dtype or image_embeds.dtype).contiguous())

    @property
    def k(self) -> int:
        """Number of stored items (reference images, or reference windows)."""
        return int(self.tokens_0.shape[0])

    @property
    def tokens_per_item(self) -> int:
        return int(self.tokens_0.shape[1])

    def layer(self, i: int) -> torch.Tensor:
        """(K, N, C) tokens of layer i."""
        return getattr(self, f"tokens_{i}")

    def flat(self, i: int) -> torch.Tensor:
        """(K·N, C) tokens of layer i: the dense bank."""
        t = self.layer(i)
        return t.reshape(-1, t.shape[-1])  # (K·N, C)

    def nbytes(self) -> int:
        """Bytes held by the bank's tensors."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def entries_scanned(self, use_index: bool) -> int:
        """Bank entries one query token is compared with: K·N densely, K embeddings + N with the index."""
        return self.k + self.tokens_per_item if use_index else self.k * self.tokens_per_item

    def select(self, query_embeds: torch.Tensor) -> torch.Tensor:
        """(Q, D) query global features -> (Q,) index of the most similar stored item."""
        return (query_embeds.float() @ self.image_embeds.float().T).argmax(dim=-1)  # (Q,)

    def residuals(self, tokens: List[torch.Tensor], mode: str = "mulmax", use_abs: bool = True,
                  chunk_mb: int = 64, compute_dtype: Optional[torch.dtype] = None,
                  query_embeds: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """Residuals of query tokens per layer: L × (Q, N, C) -> L × (Q, N, C).

        Dense search over all K·N tokens by default; with `query_embeds` (Q, D), each query item is
        aligned only against its most similar stored item (image-feature index, METHOD.md §3b).
        """
        if len(tokens) != self.num_layers:
            raise ConfigError(f"{len(tokens)} query layers against a bank of {self.num_layers}")
        sel = self.select(query_embeds) if query_embeds is not None else None
        out = []
        for i, q in enumerate(tokens):
            Q, N, C = q.shape
            if sel is None:
                idx = nearest_normal(q.reshape(Q * N, C), self.flat(i), mode, chunk_mb, compute_dtype)
                nn_tok = self.flat(i)[idx].reshape(Q, N, C)  # (Q, N, C)
            else:
                nn_tok = nearest_in_items(q, self.layer(i), sel, mode, chunk_mb, compute_dtype)
            diff = q - nn_tok.to(q.dtype)
            out.append(diff.abs() if use_abs else diff)
        return out


class FDSLMemory(nn.Module):
    """The memory of one class: the global bank and, with LFE on, the window bank."""

    def __init__(self, global_bank: MemoryBank, window_bank: Optional[MemoryBank] = None) -> None:
        super().__init__()
        self.global_bank = global_bank
        self.window_bank = window_bank

    def nbytes(self) -> int:
        """Bytes held by both banks."""
        return self.global_bank.nbytes() + (self.window_bank.nbytes() if self.window_bank is not None else 0)
