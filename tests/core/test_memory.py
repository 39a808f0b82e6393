"""Tests for fdsl.core.memory: nearest-normal search, residuals and the memory-bank module (docs/method.md §2–3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fdsl.core.memory import Alignment, MemoryBank, nearest_normal, residual
from fdsl.errors import ConfigError


def _data(q: int, m: int, c: int, seed: int, unit: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(q, c, generator=g)
    bank = torch.randn(m, c, generator=g)
    if unit:
        query, bank = F.normalize(query, dim=-1), F.normalize(bank, dim=-1)
    else:  # widely varying norms: dot-product and L2 neighbours disagree
        query = query * torch.rand(q, 1, generator=g).mul(5).add(0.1)
        bank = bank * torch.rand(m, 1, generator=g).mul(5).add(0.1)
    return query, bank


def _brute(query: torch.Tensor, bank: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent reference in float64: (indices, the score matrix used to pick them)."""
    q, b = query.double(), bank.double()
    if mode == "mulmax":
        score = q @ b.T  # (Q, M) dot products, higher is nearer
        return score.argmax(dim=1), score
    dist = torch.cdist(q, b)  # (Q, M) L2 distances, lower is nearer
    return dist.argmin(dim=1), -dist


def _assert_same_neighbours(idx: torch.Tensor, ref_idx: torch.Tensor, score: torch.Tensor) -> None:
    assert idx.dtype == torch.long and idx.shape == ref_idx.shape
    rows = torch.arange(len(idx))
    # the picked neighbour is as near as the true nearest (robust to exact ties) ...
    torch.testing.assert_close(score[rows, idx], score[rows, ref_idx], atol=1e-5, rtol=1e-6)
    # ... and on this seeded data it is the very same index
    assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("mode", ["mulmax", "diff2"])
@pytest.mark.parametrize("unit", [True, False])
def test_nearest_normal_equals_brute_force(mode: str, unit: bool) -> None:
    query, bank = _data(300, 500, 24, seed=1 if unit else 2, unit=unit)
    ref_idx, score = _brute(query, bank, mode)
    _assert_same_neighbours(nearest_normal(query, bank, Alignment(mode)), ref_idx, score)


def test_mulmax_and_diff2_differ_on_unnormalised_data() -> None:
    # worked by hand: q = (1, 0); bank (10, 10) has the larger dot product (10 vs 0.9),
    # bank (0.9, 0) is the closer point (distance 0.1 vs ~13.5).
    q = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[10.0, 10.0], [0.9, 0.0], [-1.0, 0.0]])
    assert nearest_normal(q, bank, Alignment("mulmax")).tolist() == [0]
    assert nearest_normal(q, bank, Alignment("diff2")).tolist() == [1]
    # and on random unnormalised data the two modes disagree for many rows
    query, bank = _data(300, 500, 24, seed=3, unit=False)
    a, b = nearest_normal(query, bank, Alignment("mulmax")), nearest_normal(query, bank, Alignment("diff2"))
    assert (a != b).float().mean() > 0.2


def test_modes_agree_on_unit_vectors() -> None:
    # for unit-norm tokens argmax dot == argmin L2 (the default setting relies on it)
    query, bank = _data(200, 300, 16, seed=4, unit=True)
    by_dot = nearest_normal(query, bank, Alignment("mulmax"))
    assert torch.equal(by_dot, nearest_normal(query, bank, Alignment("diff2")))


@pytest.mark.parametrize("mode", ["mulmax", "diff2"])
@pytest.mark.parametrize("chunk_mb", [0, 1])
def test_chunking_gives_identical_indices(mode: str, chunk_mb: int) -> None:
    # 4000 bank rows x 4 bytes = 16000 B per query row: chunk_mb=1 -> 65 rows per chunk (several chunks),
    # chunk_mb=0 -> one row at a time.
    query, bank = _data(150, 4000, 8, seed=5, unit=False)
    whole = nearest_normal(query, bank, Alignment(mode, chunk_mb=4096))
    chunked = nearest_normal(query, bank, Alignment(mode, chunk_mb=chunk_mb))
    assert torch.equal(whole, chunked)
    ref_idx, score = _brute(query, bank, mode)
    _assert_same_neighbours(chunked, ref_idx, score)


def test_exact_match_is_its_own_neighbour() -> None:
    _, bank = _data(1, 400, 32, seed=6, unit=True)
    pick = torch.tensor([7, 0, 399, 123])
    for mode in ("mulmax", "diff2"):
        assert torch.equal(nearest_normal(bank[pick], bank, Alignment(mode)), pick)


@pytest.mark.parametrize("mode", ["mulmax", "diff2"])
def test_residual_abs_and_signed(mode: str) -> None:
    query, bank = _data(64, 200, 12, seed=7, unit=False)
    ref_idx, _ = _brute(query, bank, mode)
    expected_signed = query - bank[ref_idx]  # (Q, C)
    torch.testing.assert_close(residual(query, bank, Alignment(mode)), expected_signed.abs(), atol=0, rtol=0)
    torch.testing.assert_close(residual(query, bank, Alignment(mode, use_abs=False)), expected_signed, atol=0, rtol=0)
    assert (residual(query, bank, Alignment(mode, use_abs=False)) < 0).any()  # the signed variant really is signed


@pytest.mark.parametrize("q_shape, b_shape", [((5, 8), (7, 9)), ((5,), (7, 5)), ((2, 5, 8), (7, 8))])
def test_shape_mismatch_is_config_error(q_shape, b_shape) -> None:
    with pytest.raises(ConfigError):
        nearest_normal(torch.zeros(q_shape), torch.zeros(b_shape))


def test_unknown_mode_is_config_error() -> None:
    with pytest.raises(ConfigError, match="cosine"):
        nearest_normal(torch.zeros(2, 3), torch.zeros(4, 3), Alignment("cosine"))


# ---------------------------------------------------------------------------- MemoryBank
def _bank_inputs(k=2, n=9, c=8, d=4, layers=3, seed=8):
    g = torch.Generator().manual_seed(seed)
    toks = [F.normalize(torch.randn(k, n, c, generator=g), dim=-1) for _ in range(layers)]
    emb = F.normalize(torch.randn(k, d, generator=g), dim=-1)
    return toks, emb


def test_bank_buffers_state_dict_and_to() -> None:
    toks, emb = _bank_inputs()
    bank = MemoryBank(toks, emb)
    sd = bank.state_dict()
    assert set(sd) == {"tokens_0", "tokens_1", "tokens_2", "image_embeds"}
    for i, t in enumerate(toks):
        torch.testing.assert_close(sd[f"tokens_{i}"], t, atol=0, rtol=0)
        assert bank.layer(i).shape == (2, 9, 8)
        assert bank.flat(i).shape == (18, 8)
    assert bank.k == 2 and bank.num_layers == 3
    # buffers move with .to(): device (meta needs no accelerator) and dtype
    moved = MemoryBank(toks, emb).to("meta")
    assert all(b.device.type == "meta" for b in moved.buffers())
    assert moved.layer(0).device.type == "meta"
    doubled = MemoryBank(toks, emb).to(torch.float64)
    assert all(b.dtype == torch.float64 for b in doubled.buffers())
    # a state dict loads into a fresh bank
    other = MemoryBank([torch.zeros_like(t) for t in toks], torch.zeros_like(emb))
    other.load_state_dict(sd)
    torch.testing.assert_close(other.flat(1), bank.flat(1), atol=0, rtol=0)


def test_bank_nbytes() -> None:
    toks, emb = _bank_inputs(k=3, n=16, c=8, d=4, layers=2)
    fp32 = MemoryBank(toks, emb)
    token_bytes = sum(t.numel() * 4 for t in toks)
    emb_bytes = emb.numel() * 4
    assert fp32.nbytes() == token_bytes + emb_bytes == sum(b.numel() * b.element_size() for b in fp32.buffers())
    fp16 = MemoryBank(toks, emb, dtype=torch.float16)
    assert fp16.layer(0).dtype == torch.float16
    assert fp16.image_embeds.dtype == torch.float16
    # fp16 storage halves every stored tensor
    assert fp16.nbytes() * 2 == fp32.nbytes()


@pytest.mark.parametrize("mode", ["mulmax", "diff2"])
@pytest.mark.parametrize("use_abs", [True, False])
def test_bank_residuals_per_layer(mode: str, use_abs: bool) -> None:
    toks, emb = _bank_inputs(k=2, n=9, c=8, layers=3)
    bank = MemoryBank(toks, emb)
    g = torch.Generator().manual_seed(9)
    queries = [F.normalize(torch.randn(4, 9, 8, generator=g), dim=-1) for _ in range(3)]
    out = bank.residuals(queries, Alignment(mode, use_abs))
    assert len(out) == 3
    for i, (q, r) in enumerate(zip(queries, out)):
        assert r.shape == (4, 9, 8)  # (B, N, C)
        flat_bank = toks[i].reshape(-1, 8)  # this layer's bank only
        ref_idx, _ = _brute(q.reshape(-1, 8), flat_bank, mode)
        diff = (q.reshape(-1, 8) - flat_bank[ref_idx]).reshape(4, 9, 8)
        torch.testing.assert_close(r, diff.abs() if use_abs else diff, atol=1e-6, rtol=0)


def test_bank_residual_of_a_reference_is_zero() -> None:
    toks, emb = _bank_inputs(k=2, n=9, c=8, layers=2)
    bank = MemoryBank(toks, emb)
    out = bank.residuals([t[1:2] for t in toks])  # reference image 1 as the query
    for r in out:
        assert r.abs().max() == 0


def test_fp16_bank_residuals_close_to_fp32() -> None:
    toks, emb = _bank_inputs(k=2, n=16, c=8, layers=1)
    q = [F.normalize(torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(10)), dim=-1)]
    r32 = MemoryBank(toks, emb).residuals(q)[0]
    r16 = MemoryBank(toks, emb, dtype=torch.float16).residuals(q)[0]
    assert r16.dtype == torch.float32  # residuals keep the query dtype
    torch.testing.assert_close(r16, r32, atol=2e-3, rtol=0)


def test_bank_rejects_bad_inputs() -> None:
    toks, emb = _bank_inputs(layers=2)
    with pytest.raises(ConfigError):
        MemoryBank([], emb)
    with pytest.raises(ConfigError):
        MemoryBank([toks[0], toks[1][:1]], emb)  # different k per layer
    with pytest.raises(ConfigError):
        MemoryBank([toks[0].reshape(-1, 8)], emb)  # not (k, N, C)
    bank = MemoryBank(toks, emb)
    with pytest.raises(ConfigError):
        bank.residuals([toks[0]])  # one query layer for a two-layer bank
