"""Memory banks of normal tokens and feature-discrepancy alignment (docs/method.md §2–3).

Alignment is, per layer, a chunked matrix product, an argmax and a gather: never a Python loop
over patches. Chunks bound the size of the similarity block whatever the bank size.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fdsl.config import ALIGN_MODES
from fdsl.errors import ConfigError

_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}


@dataclass(frozen=True)
class Alignment:
    """How query tokens are matched to normal tokens (docs/method.md §2–3): one object instead of loose arguments.

    Attributes:
        mode: ``mulmax`` (argmax of the dot product) or ``diff2`` (argmin of the L2 distance).
        use_abs: residual ``|f - f̂|`` (default) or the signed ``f - f̂``.
        chunk_mb: bound, in MiB, on the similarity block held at once.
        compute_dtype: dtype of the similarity product and argmax; None computes in the query's dtype.
        use_index: image-feature index (§3b): align each query item only against its most similar
            stored item, chosen by global features.
        distance: return the FD distance (..., 1) instead of the residual (the training-free scorer,
            docs/method.md §11): ``1 - cos(f, f̂)`` for mulmax, ``‖f - f̂‖₂`` for diff2.
        fused: return both, the residual with the FD distance appended as one more channel, (..., C + 1)
            (``--scorer fused``: the learned head reads the first C channels, the merge the last).
    """

    mode: str = "mulmax"
    use_abs: bool = True
    chunk_mb: int = 64
    compute_dtype: torch.dtype | None = None
    use_index: bool = False
    distance: bool = False
    fused: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ALIGN_MODES:
            raise ConfigError(f"--align_mode {self.mode!r} is not one of {', '.join(ALIGN_MODES)}")

    def dtype_for(self, query: torch.Tensor) -> torch.dtype:
        """The dtype the similarity of `query` is computed in."""
        return self.compute_dtype or query.dtype

    def rows_per_chunk(self, rows: int, cols: int, dtype: torch.dtype) -> int:
        """How many query rows fit a (rows × cols) similarity block of `chunk_mb` MiB (at least one)."""
        per_row = max(1, cols) * _BYTES.get(dtype, 4)
        return max(1, min(rows, (self.chunk_mb * 2 ** 20) // per_row))

    def residual(self, query: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """``|f - f̂|`` (or the signed difference) of (..., C) queries and their nearest normal tokens, same shape.

        With `distance`, the FD distance instead, of shape (..., 1): ``1 - cos`` (mulmax) or the L2 norm (diff2).
        """
        nearest = nearest.to(query.dtype)
        if self.distance or self.fused:
            if self.mode == "mulmax":
                dist = 1.0 - F.cosine_similarity(query.float(), nearest.float(), dim=-1).unsqueeze(-1)  # (..., 1)
            else:
                dist = (query.float() - nearest.float()).norm(dim=-1, keepdim=True)  # (..., 1)
            if not self.fused:
                return dist
        diff = query - nearest
        diff = diff.abs() if self.use_abs else diff
        return torch.cat([diff, dist.to(diff.dtype)], dim=-1) if self.fused else diff  # (..., C [+ 1])


DENSE = Alignment()


def _sq_norms(bank: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., M) squared L2 norms of (..., M, C) tokens, summed in fp32, cast to `dtype`."""
    return bank.float().pow(2).sum(-1).to(dtype)


def nearest_normal(query: torch.Tensor, bank: torch.Tensor, align: Alignment = DENSE,
                   sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Index of each query token's nearest bank token.

    Args:
        query: (Q, C) tokens.
        bank: (M, C) normal tokens, ideally already in the compute dtype (otherwise cast here).
        align: the alignment strategy (mode, chunk bound, compute dtype).
        sq_norms: (M,) precomputed ``|b|²`` in the compute dtype for ``diff2`` (computed here if None).
    Returns:
        (Q,) long indices into `bank`.
    """
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise ConfigError(f"alignment needs (Q, C) queries and an (M, C) bank, got {tuple(query.shape)} "
                          f"and {tuple(bank.shape)}")
    dt = align.dtype_for(query)
    b = bank if bank.dtype == dt else bank.to(dt)
    bias = None
    if align.mode == "diff2":  # argmin |q-b|² = argmax (2 q·b - |b|²); |q|² is constant per row
        bias = sq_norms if sq_norms is not None else _sq_norms(bank, dt)  # (M,)
    step = align.rows_per_chunk(query.shape[0], bank.shape[0], dt)
    out = torch.empty(query.shape[0], dtype=torch.long, device=query.device)
    # One similarity block, reused by every chunk: a fresh block per chunk costs page faults on the CPU
    # (≈9% of a dense window alignment), and the product written into it is the same.
    block = torch.empty(step, bank.shape[0], dtype=dt, device=query.device)  # (step, M)
    for s in range(0, query.shape[0], step):  # chunks of rows, not patches: bounded memory
        q = query[s:s + step].to(dt)  # (rows, C)
        sim = torch.mm(q, b.T, out=block[:q.shape[0]])  # (rows, M)
        if bias is not None:
            sim.mul_(2).sub_(bias)  # in place: no extra similarity-sized blocks
        out[s:s + step] = sim.argmax(dim=-1)
    return out


def residual(query: torch.Tensor, bank: torch.Tensor, align: Alignment = DENSE) -> torch.Tensor:
    """Feature discrepancy r = |f - f̂| of (Q, C) queries against an (M, C) bank; returns (Q, C)."""
    return align.residual(query, bank[nearest_normal(query, bank, align)])


def nearest_in_items(query: torch.Tensor, items: torch.Tensor, sel: torch.Tensor,
                     align: Alignment = DENSE) -> torch.Tensor:
    """Per query item, the nearest token within one chosen bank item (image-index search).

    Args:
        query: (Q, N, C) tokens of Q query items (images or windows).
        items: (K, M, C) bank tokens of K stored items.
        sel: (Q,) index of the bank item each query item is aligned against.
        align: the alignment strategy (mode, chunk bound, compute dtype).
    Returns:
        (Q, N, C) the chosen nearest bank tokens, in the bank's dtype.
    """
    Q, N, C = query.shape
    dt = align.dtype_for(query)
    step = max(1, align.rows_per_chunk(Q * N, items.shape[1], dt) // max(N, 1))
    out = torch.empty(Q, N, C, dtype=items.dtype, device=query.device)
    for s in range(0, Q, step):  # chunks of query items, bounded memory
        cand = items[sel[s:s + step]]  # (q, M, C)
        sim = torch.bmm(query[s:s + step].to(dt), cand.to(dt).transpose(1, 2))  # (q, N, M)
        if align.mode == "diff2":
            sim.mul_(2).sub_(_sq_norms(cand, dt).unsqueeze(1))
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
                 dtype: torch.dtype | None = None) -> None:
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
        # Per (layer, dtype): the dense bank in that compute dtype and its |b|² (diff2), prepared once.
        self._search: dict[tuple[int, torch.dtype, str], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._prefixes: dict[int, MemoryBank] = {}  # views of the first k items (`prefix`), not sub-modules

    def _apply(self, fn, recurse=True):  # a device or dtype move invalidates the prepared search tensors
        self._search = {}
        self._prefixes = {}
        return super()._apply(fn, recurse)

    @property
    def k(self) -> int:
        """Number of stored items (reference images, or reference windows)."""
        return int(self.tokens_0.shape[0])

    @property
    def tokens_per_item(self) -> int:
        """Tokens per item of the first layer (every layer's for a ViT; timm CNN stages differ per layer)."""
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

    def searchable(self, i: int, align: Alignment, query_dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer i's dense (K·N, C) bank in the compute dtype and, for diff2, its (K·N,) ``|b|²``.

        Both are computed once per (layer, dtype, mode) and kept, so repeated alignments against this
        bank never copy it again. When the storage dtype is the compute dtype, no copy is made at all.
        """
        dt = align.compute_dtype or query_dtype
        key = (i, dt, align.mode)
        if key not in self._search:
            flat = self.flat(i)
            cast = flat if flat.dtype == dt else flat.to(dt)
            self._search[key] = (cast, _sq_norms(flat, dt) if align.mode == "diff2" else None)
        return self._search[key]

    def prefix(self, k: int) -> MemoryBank:
        """The bank of the first `k` items; its tensors are views of this bank's (no copy), cached."""
        if not 1 <= k <= self.k:
            raise ConfigError(f"a prefix of {k} items of a bank of {self.k}")
        if k not in self._prefixes:
            self._prefixes[k] = MemoryBank([self.layer(i)[:k] for i in range(self.num_layers)],
                                           self.image_embeds[:k])
        return self._prefixes[k]

    def nested_residuals(self, tokens: list[torch.Tensor], sizes: Sequence[int], align: Alignment = DENSE,
                         query_embeds: torch.Tensor | None = None) -> list[list[torch.Tensor]]:
        """Residuals against each prefix bank ``prefix(m)``, m in `sizes`: per size, L × (Q, N, C).

        Equal to ``[self.prefix(m).residuals(tokens, align, query_embeds) for m in sizes]``, but the dense
        similarity is computed once, against this (largest) bank: each prefix's nearest token is the
        argmax over the first ``m·N`` columns (first maximum on ties, as a separate search gives).
        """
        if align.use_index or len(sizes) == 1:
            return [self.prefix(m).residuals(tokens, align, query_embeds) for m in sizes]
        if len(tokens) != self.num_layers:
            raise ConfigError(f"{len(tokens)} query layers against a bank of {self.num_layers}")
        out: list[list[torch.Tensor]] = [[] for _ in sizes]
        for i, q in enumerate(tokens):
            Q, N, C = q.shape
            n_tok = self.layer(i).shape[1]  # tokens per item of this layer (layers may differ in grid)
            bank, sq = self.searchable(i, align, q.dtype)  # (K·N, C), (K·N,) for diff2
            dt = align.dtype_for(q)
            flat_q = q.reshape(Q * N, C)
            idx = [torch.empty(Q * N, dtype=torch.long, device=q.device) for _ in sizes]
            step = align.rows_per_chunk(Q * N, bank.shape[0], dt)
            for s in range(0, Q * N, step):  # chunks of rows: bounded memory
                sim = flat_q[s:s + step].to(dt) @ bank.T  # (rows, K·N)
                if sq is not None:
                    sim.mul_(2).sub_(sq)
                for j, m in enumerate(sizes):
                    idx[j][s:s + step] = sim[:, :m * n_tok].argmax(dim=-1)
            flat = self.flat(i)
            for j in range(len(sizes)):
                out[j].append(align.residual(q, flat[idx[j]].reshape(Q, N, C)))  # (Q, N, C)
        return out

    def select(self, query_embeds: torch.Tensor) -> torch.Tensor:
        """(Q, D) query global features -> (Q,) index of the most similar stored item."""
        return (query_embeds.float() @ self.image_embeds.float().T).argmax(dim=-1)  # (Q,)

    def residuals(self, tokens: list[torch.Tensor], align: Alignment = DENSE,
                  query_embeds: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Residuals of query tokens per layer: L × (Q, N, C) -> L × (Q, N, C).

        Dense search over all K·N tokens by default; with ``align.use_index`` each query item is
        aligned only against its most similar stored item, chosen by `query_embeds` (Q, D)
        (image-feature index, docs/method.md §3b).
        """
        if len(tokens) != self.num_layers:
            raise ConfigError(f"{len(tokens)} query layers against a bank of {self.num_layers}")
        if align.use_index and query_embeds is None:
            raise ConfigError("image-index alignment needs the queries' global features (query_embeds)")
        sel = self.select(query_embeds) if align.use_index else None
        out = []
        for i, q in enumerate(tokens):
            Q, N, C = q.shape
            if sel is None:
                bank, sq = self.searchable(i, align, q.dtype)
                idx = nearest_normal(q.reshape(Q * N, C), bank, align, sq)
                nn_tok = self.flat(i)[idx].reshape(Q, N, C)  # (Q, N, C)
            else:
                nn_tok = nearest_in_items(q, self.layer(i), sel, align)
            out.append(align.residual(q, nn_tok))
        return out


class FDSLMemory(nn.Module):
    """The memory of one class: the global bank and, with LFE on, the window bank."""

    def __init__(self, global_bank: MemoryBank, window_bank: MemoryBank | None = None) -> None:
        super().__init__()
        self.global_bank = global_bank
        self.window_bank = window_bank

    def nbytes(self) -> int:
        """Bytes held by both banks."""
        return self.global_bank.nbytes() + (self.window_bank.nbytes() if self.window_bank is not None else 0)

    def prefix(self, n_images: int) -> FDSLMemory:
        """The memory of the first `n_images` reference images: views of this memory's banks, no copy.

        Add it to a `MemorySet` with ``add_prefix`` to have its similarities computed with the base's.
        """
        if not 1 <= n_images <= self.global_bank.k:
            raise ConfigError(f"a prefix of {n_images} images of a memory of {self.global_bank.k}")
        win = None
        if self.window_bank is not None:
            win = self.window_bank.prefix(n_images * (self.window_bank.k // self.global_bank.k))
        return FDSLMemory(self.global_bank.prefix(n_images), win)


class MemorySet:
    """The memories one batch of images is scored against, in order, and how they nest.

    A memory added with `add_prefix` holds the first n reference images of a base memory (views of its
    banks); `groups` gathers the memories nested in one base, so `FDSL.predict` computes their similarities
    once, against the base (equal to aligning against each separately). Other memories stand alone.
    """

    def __init__(self, memories: Sequence[FDSLMemory] = ()) -> None:
        self._items: list[FDSLMemory] = []
        self._bases: list[FDSLMemory | None] = []
        for m in memories:
            self.add(m)

    @classmethod
    def of(cls, memories: MemorySet | Sequence[FDSLMemory]) -> MemorySet:
        """`memories` itself if it is a set, else a set of independent memories."""
        return memories if isinstance(memories, MemorySet) else cls(memories)

    def add(self, memory: FDSLMemory) -> int:
        """Add an independent memory; returns its position."""
        self._items.append(memory)
        self._bases.append(None)
        return len(self._items) - 1

    def add_prefix(self, base: FDSLMemory, n_images: int) -> int:
        """Add the memory of `base`'s first `n_images` reference images (`FDSLMemory.prefix`); returns its position."""
        self._items.append(base.prefix(n_images))
        self._bases.append(base)
        return len(self._items) - 1

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, pos: int) -> FDSLMemory:
        return self._items[pos]

    def __iter__(self) -> Iterator[FDSLMemory]:
        return iter(self._items)

    def groups(self) -> list[tuple[FDSLMemory | None, list[int]]]:
        """[(base or None, positions)], in order of first appearance; a standalone memory has base None."""
        groups: dict[int, tuple[FDSLMemory | None, list[int]]] = {}
        for pos, base in enumerate(self._bases):
            key = id(base) if base is not None else -1 - pos
            groups.setdefault(key, (base, []))[1].append(pos)
        return list(groups.values())
