"""Tests for the image-feature index memory bank (``--use_img_idx``, docs/method.md §3b), bank storage
dtype and memory accounting (``memory_bank_bytes``).

References are independent brute force in float64 with explicit per-item loops; the model-level
tests use the tiny random CLIP (FDSL-Tiny-ViT at 112 px: grid 8, patch 14, width 64, embed 32).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fdsl_test_utils import build_model, entries_scanned, fit_memory, liven_head, tiny_lfe_settings

import fdsl.core.memory as memory_mod
from fdsl.config import ModelConfig, config_to_dict
from fdsl.config import TestConfig as EvalConfig
from fdsl.core.memory import Alignment, FDSLMemory, MemoryBank, nearest_in_items
from fdsl.core.model import FDSL
from fdsl.engine.checkpoint import save_checkpoint

MODEL = "FDSL-Tiny-ViT"
SIZE, GRID, WIDTH, EMBED = 112, 8, 64, 32
LAYERS = [2, 4]
TINY_WEIGHTS_SEED = 21  # the `tiny_weights` fixture (conftest.py) saves the tiny CLIP built with this seed


# ---------------------------------------------------------------------------- helpers
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bank_data(K: int, N: int, C: int, D: int, L: int, seed: int, unit: bool = False):
    """L × (K, N, C) bank tokens and (K, D) unit item embeddings; tokens of widely varying norm unless `unit`."""
    g = _gen(seed)
    tokens = []
    for _ in range(L):
        t = torch.randn(K, N, C, generator=g)
        t = F.normalize(t, dim=-1) if unit else t * torch.rand(K, N, 1, generator=g).mul(4).add(0.2)
        tokens.append(t)
    embeds = F.normalize(torch.randn(K, D, generator=g), dim=-1)
    return tokens, embeds


def _query_data(Q: int, N: int, C: int, D: int, L: int, seed: int, unit: bool = False):
    return _bank_data(Q, N, C, D, L, seed, unit)


def _brute_select(query_embeds: torch.Tensor, item_embeds: torch.Tensor) -> list[int]:
    out = []
    for q in query_embeds.double():
        dots = [float((q * g).sum()) for g in item_embeds.double()]
        out.append(max(range(len(dots)), key=dots.__getitem__))
    return out


def _brute_indexed_residuals(q_tokens: list[torch.Tensor], bank_tokens: list[torch.Tensor], sel: list[int],
                             mode: str) -> list[torch.Tensor]:
    """Each query item aligned only against its selected bank item, one item at a time (float64 search)."""
    out = []
    for q, b in zip(q_tokens, bank_tokens):
        res = torch.empty_like(q)
        for i, item in enumerate(sel):
            cand = b[item]  # (M, C)
            if mode == "mulmax":
                idx = (q[i].double() @ cand.double().T).argmax(dim=1)
            else:
                idx = torch.cdist(q[i].double(), cand.double()).argmin(dim=1)
            res[i] = (q[i] - cand[idx]).abs()
        out.append(res)
    return out


def _brute_dense_residuals(q_tokens: list[torch.Tensor], bank_tokens: list[torch.Tensor],
                           mode: str) -> list[torch.Tensor]:
    out = []
    for q, b in zip(q_tokens, bank_tokens):
        flat = b.reshape(-1, b.shape[-1])
        qf = q.reshape(-1, q.shape[-1])
        if mode == "mulmax":
            idx = (qf.double() @ flat.double().T).argmax(dim=1)
        else:
            idx = torch.cdist(qf.double(), flat.double()).argmin(dim=1)
        out.append((qf - flat[idx]).abs().reshape(q.shape))
    return out


# ---------------------------------------------------------------------------- select
@pytest.mark.parametrize("store", [torch.float32, torch.float16])
def test_select_picks_the_item_with_the_highest_dot_product(store) -> None:
    _, item_embeds = _bank_data(K=7, N=4, C=8, D=16, L=1, seed=1, unit=True)
    bank = MemoryBank([torch.zeros(7, 4, 8)], item_embeds, dtype=store)
    query = F.normalize(torch.randn(60, 16, generator=_gen(2)), dim=-1)
    sel = bank.select(query)
    assert sel.dtype == torch.long and sel.shape == (60,)
    want = _brute_select(query, bank.image_embeds.float())
    assert sel.tolist() == want
    assert len(set(want)) >= 5  # the queries really spread over the items


# ---------------------------------------------------------------------------- indexed alignment
@pytest.mark.parametrize("mode", ["mulmax", "diff2"])
def test_indexed_residuals_align_only_within_the_selected_item(mode) -> None:
    K, N, C, D, L, Q = 5, 16, 8, 12, 2, 9
    bank_tokens, item_embeds = _bank_data(K, N, C, D, L, seed=3)
    q_tokens, q_embeds = _query_data(Q, N, C, D, L, seed=4)
    bank = MemoryBank(bank_tokens, item_embeds)
    sel = _brute_select(q_embeds, item_embeds)
    assert len(set(sel)) >= 3
    got = bank.residuals(q_tokens, Alignment(mode, use_index=True), q_embeds)
    want = _brute_indexed_residuals(q_tokens, bank_tokens, sel, mode)
    dense = _brute_dense_residuals(q_tokens, bank_tokens, mode)
    for g, w, d in zip(got, want, dense):
        assert g.shape == (Q, N, C)
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0)
        assert (g - d).abs().max() > 1e-2  # restricting the search to one item really changes the result
    # without query_embeds the same bank searches densely
    for g, d in zip(bank.residuals(q_tokens, Alignment(mode)), dense):
        torch.testing.assert_close(g, d, atol=1e-6, rtol=0)


def test_mulmax_and_diff2_pick_differently_within_items() -> None:
    K, N, C, D, Q = 3, 16, 8, 12, 6
    bank_tokens, item_embeds = _bank_data(K, N, C, D, 1, seed=5)
    q_tokens, q_embeds = _query_data(Q, N, C, D, 1, seed=6)
    bank = MemoryBank(bank_tokens, item_embeds)
    a = bank.residuals(q_tokens, Alignment("mulmax", use_index=True), q_embeds)[0]
    b = bank.residuals(q_tokens, Alignment("diff2", use_index=True), q_embeds)[0]
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["mulmax", "diff2"])
@pytest.mark.parametrize("chunk_mb", [0, 1])
def test_nearest_in_items_chunking_gives_identical_results(mode, chunk_mb) -> None:
    K, N, C, D, Q = 6, 64, 8, 12, 100
    bank_tokens, item_embeds = _bank_data(K, N, C, D, 1, seed=7)
    q_tokens, q_embeds = _query_data(Q, N, C, D, 1, seed=8)
    bank = MemoryBank(bank_tokens, item_embeds)
    sel = bank.select(q_embeds)
    items_per_chunk = max(1, Alignment(chunk_mb=chunk_mb).rows_per_chunk(Q * N, N, torch.float32) // N)
    assert items_per_chunk < Q  # the small budget really splits the work
    whole = nearest_in_items(q_tokens[0], bank.layer(0), sel, Alignment(mode, chunk_mb=4096))
    chunked = nearest_in_items(q_tokens[0], bank.layer(0), sel, Alignment(mode, chunk_mb=chunk_mb))
    torch.testing.assert_close(chunked, whole, atol=0, rtol=0)
    for a, b in zip(bank.residuals(q_tokens, Alignment(mode, chunk_mb=chunk_mb, use_index=True), q_embeds),
                    bank.residuals(q_tokens, Alignment(mode, chunk_mb=4096, use_index=True), q_embeds)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # the chosen tokens are members of the selected item
    for i in range(0, Q, 17):
        item = bank.layer(0)[sel[i]]  # (M, C)
        assert (chunked[i][:, None, :] == item[None, :, :]).all(dim=-1).any(dim=1).all()


def test_big_k_bank_alignment_is_chunked_and_bounded(monkeypatch) -> None:
    """k = 64 items: a 1 MiB budget splits the similarity block, never exceeds it, and changes nothing."""
    K, N, C, D, Q = 64, 64, 8, 12, 8
    bank_tokens, item_embeds = _bank_data(K, N, C, D, 1, seed=9, unit=True)
    q_tokens, q_embeds = _query_data(Q, N, C, D, 1, seed=10, unit=True)
    bank = MemoryBank(bank_tokens, item_embeds)
    ref_dense = bank.residuals(q_tokens, Alignment(chunk_mb=4096))
    ref_index = bank.residuals(q_tokens, Alignment(chunk_mb=4096, use_index=True), q_embeds)

    blocks: list[int] = []
    real_argmax = torch.Tensor.argmax

    def spy(self, *args, **kwargs):
        blocks.append(self.numel() * self.element_size())
        return real_argmax(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "argmax", spy)
    dense = bank.residuals(q_tokens, Alignment(chunk_mb=1))
    n_dense_blocks = len(blocks)
    index = bank.residuals(q_tokens, Alignment(chunk_mb=0, use_index=True), q_embeds)  # one query item at a time
    monkeypatch.undo()

    assert n_dense_blocks == (Q * N * K * N * 4) // 2 ** 20  # 2 MiB of similarities in 1 MiB blocks
    assert max(blocks) <= 2 ** 20
    torch.testing.assert_close(dense[0], ref_dense[0], atol=0, rtol=0)
    torch.testing.assert_close(index[0], ref_index[0], atol=0, rtol=0)
    torch.testing.assert_close(dense[0], _brute_dense_residuals(q_tokens, bank_tokens, "mulmax")[0],
                               atol=1e-6, rtol=0)


def test_k1_indexed_equals_dense_on_a_bank() -> None:
    bank_tokens, item_embeds = _bank_data(1, 16, 8, 12, 2, seed=11)
    q_tokens, q_embeds = _query_data(5, 16, 8, 12, 2, seed=12)
    bank = MemoryBank(bank_tokens, item_embeds)
    for mode in ("mulmax", "diff2"):
        indexed = bank.residuals(q_tokens, Alignment(mode, use_index=True), q_embeds)
        for a, b in zip(indexed, bank.residuals(q_tokens, Alignment(mode))):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---------------------------------------------------------------------------- model level
@pytest.fixture(scope="module")
def imgs() -> torch.Tensor:
    return torch.randn(8, 3, SIZE, SIZE, generator=_gen(22))


def _cfg(weights: Path, **overrides) -> ModelConfig:
    return ModelConfig(**tiny_lfe_settings(weights, LAYERS, **overrides))


def _liven(model: FDSL, imgs: torch.Tensor) -> FDSL:
    return liven_head(model, imgs[:2], imgs[2:5])


def _models(weights: Path, imgs: torch.Tensor, *overrides: dict) -> list[FDSL]:
    models = []
    for o in overrides:
        torch.manual_seed(23)
        models.append(build_model(**tiny_lfe_settings(weights, LAYERS, **o)).eval())
    _liven(models[0], imgs)
    for m in models[1:]:
        m.head.load_state_dict(models[0].head.state_dict())
    return models


@pytest.mark.parametrize("winmode", ["nan", "onlywin", "mul"])
def test_k1_indexed_and_dense_models_give_identical_maps(tiny_weights, imgs, winmode) -> None:
    """k = 1 and one window per image (win = grid): every search has a single item, so the index is a no-op."""
    dense, indexed = _models(tiny_weights, imgs, dict(winmode=winmode, win_size=GRID, use_img_idx=False),
                             dict(winmode=winmode, win_size=GRID, use_img_idx=True))
    ref, queries = imgs[:1], imgs[5:8]
    mem_d, mem_i = dense.make_memory(dense.encode_references(ref)), indexed.make_memory(indexed.encode_references(ref))
    assert mem_d.global_bank.k == 1 and (winmode == "nan" or mem_d.window_bank.k == 1)
    feats = dense.extract(queries)
    for a, b in zip(dense.residuals(mem_d.global_bank, feats), indexed.residuals(mem_i.global_bank, feats)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    out_d = dense.predict(queries, [mem_d], 32)[0]
    out_i = indexed.predict(queries, [mem_i], 32)[0]
    assert out_d.anomaly_map.std() > 1e-2
    for a, b in zip(out_d, out_i):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_k1_global_branch_identical_with_several_windows(tiny_weights, imgs) -> None:
    """k = 1, win 4 stride 2: the global branch is identical; the window branch picks one of the 9 reference
    windows per query window (docs/method.md §3b), which equals a brute-force search inside that window."""
    dense, indexed = _models(tiny_weights, imgs, dict(use_img_idx=False), dict(use_img_idx=True))
    ref, queries = imgs[:1], imgs[5:7]
    mem = dense.make_memory(dense.encode_references(ref))
    feats = dense.extract(queries)
    for a, b in zip(dense.residuals(mem.global_bank, feats), indexed.residuals(mem.global_bank, feats)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    wq = indexed.extract_windows(queries)  # L × (2·9, 16, C)
    wb = mem.window_bank
    assert wb.k == 9
    sel = _brute_select(wq.image_embeds, wb.image_embeds)
    got = indexed.residuals(wb, wq)
    want = _brute_indexed_residuals(wq.tokens, [wb.layer(i) for i in range(len(LAYERS))], sel, "mulmax")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0)
    dense_res = dense.residuals(wb, wq)
    assert any((g - d).abs().max() > 1e-3 for g, d in zip(got, dense_res))


def test_k4_index_scans_about_4x_fewer_entries(tiny_weights, imgs, monkeypatch) -> None:
    """Entries one query token is compared with: dense k·N; indexed k (embeddings) + N (one image's tokens)."""
    dense, indexed = _models(tiny_weights, imgs, dict(winmode="nan"), dict(winmode="nan", use_img_idx=True))
    mem = dense.make_memory(dense.encode_references(imgs[:4]))
    bank = mem.global_bank
    N = GRID * GRID
    assert bank.k == 4 and bank.tokens_per_item == N
    assert entries_scanned(bank, False) == 4 * N
    assert entries_scanned(bank, True) == 4 + N
    ratio = entries_scanned(bank, False) / entries_scanned(bank, True)
    assert 3.5 < ratio <= 4.0

    # and that is what the alignment really does: count the similarity columns per query token
    seen = []
    real_nn, real_items = memory_mod.nearest_normal, memory_mod.nearest_in_items

    def spy_nn(query, bank_tokens, *a, **k):
        seen.append(("dense", bank_tokens.shape[0]))
        return real_nn(query, bank_tokens, *a, **k)

    def spy_items(query, items, sel, *a, **k):
        seen.append(("index", items.shape[1]))
        return real_items(query, items, sel, *a, **k)

    monkeypatch.setattr(memory_mod, "nearest_normal", spy_nn)
    monkeypatch.setattr(memory_mod, "nearest_in_items", spy_items)
    feats = dense.extract(imgs[5:7])
    dense.residuals(bank, feats)
    indexed.residuals(bank, feats)
    monkeypatch.undo()
    assert seen == [("dense", 4 * N)] * len(LAYERS) + [("index", N)] * len(LAYERS)


@pytest.mark.parametrize("use_img_idx", [False, True])
def test_fp16_bank_storage_halves_bytes_and_barely_moves_maps(tiny_weights, imgs, use_img_idx) -> None:
    m32, m16 = _models(tiny_weights, imgs, dict(bank_dtype="fp32", use_img_idx=use_img_idx),
                       dict(bank_dtype="fp16", use_img_idx=use_img_idx))
    refs, queries = imgs[:2], imgs[5:8]
    mem32 = m32.make_memory(m32.encode_references(refs))
    mem16 = m16.make_memory(m16.encode_references(refs))
    bufs = dict(mem16.named_buffers())
    assert any(n.startswith("window_bank.") for n in bufs) and any(n.startswith("global_bank.") for n in bufs)
    assert all(b.dtype == torch.float16 for b in bufs.values()), {n: b.dtype for n, b in bufs.items()}
    assert all(b.dtype == torch.float32 for b in mem32.buffers())
    assert mem16.nbytes() * 2 == mem32.nbytes()
    out32 = m32.predict(queries, [mem32], 32)[0]
    out16 = m16.predict(queries, [mem16], 32)[0]
    assert out32.anomaly_map.std() > 1e-2
    for a, b in zip(out16, out32):
        assert a.dtype == torch.float32
        assert (a - b).abs().max() < 1e-2  # stated tolerance for fp16 storage


# ---------------------------------------------------------------------------- memory accounting
def _expected_bytes(k: int, nw: int, win: int, elem: int, L: int = len(LAYERS)) -> int:
    glob = L * k * GRID * GRID * WIDTH + k * EMBED
    wind = L * k * nw * win * win * WIDTH + k * nw * EMBED
    return (glob + wind) * elem


def test_fdsl_memory_nbytes_moves_with_to_and_is_in_state_dict(tiny_weights, imgs) -> None:
    (model,) = _models(tiny_weights, imgs, dict(bank_dtype="fp32"))
    mem = fit_memory(model, imgs[:3])
    bufs = list(mem.buffers())
    assert mem.nbytes() == sum(b.element_size() * b.numel() for b in bufs)
    assert mem.nbytes() == _expected_bytes(3, 9, 4, 4)
    assert mem.nbytes() == mem.global_bank.nbytes() + mem.window_bank.nbytes()

    sd = mem.state_dict()
    want_keys = {f"{b}.tokens_{i}" for b in ("global_bank", "window_bank") for i in range(len(LAYERS))}
    want_keys |= {"global_bank.image_embeds", "window_bank.image_embeds"}
    assert set(sd) == want_keys
    assert not any(k.startswith("memory.") for k in model.state_dict())  # the memory is the caller's
    # a memory of the same shapes restored from the state dict is the same memory
    blank = FDSLMemory(MemoryBank([torch.zeros_like(mem.global_bank.layer(i)) for i in range(len(LAYERS))],
                                  torch.zeros_like(mem.global_bank.image_embeds)),
                       MemoryBank([torch.zeros_like(mem.window_bank.layer(i)) for i in range(len(LAYERS))],
                                  torch.zeros_like(mem.window_bank.image_embeds)))
    blank.load_state_dict(sd)
    for a, b in zip(blank.buffers(), mem.buffers()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)

    before = mem.nbytes()
    mem.to(torch.float64)
    assert all(b.dtype == torch.float64 for b in mem.buffers())
    assert mem.nbytes() == 2 * before
    mem.to(torch.float16)
    assert mem.nbytes() == before // 2
    mem.to("meta")  # a device move: every buffer follows, the byte count does not change
    assert all(b.device.type == "meta" for b in mem.buffers())
    assert mem.nbytes() == before // 2


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")  # aupro=False leaves AUPRO NaN
def test_results_json_reports_memory_bank_bytes(tiny_weights, tmp_path) -> None:
    from fdsl.data.shots import load_reference_images, read_k_shot_file
    from fdsl.data.synthetic import make_synthetic_dataset
    from fdsl.engine.evaluation import Evaluator

    data = make_synthetic_dataset(tmp_path / "data", ("carpet_syn", "wood_syn"), n_train=4, n_test_good=2,
                                  n_test_bad=3, image_size=64, seed=3)
    cfg = EvalConfig(model=MODEL, pretrained=str(tiny_weights), image_size=SIZE, features_list=list(LAYERS),
                     few_shot_features=list(LAYERS), winmode="mul", win_size=4, win_stride=2, bank_dtype="fp16",
                     use_img_idx=True, data_path=str(data), checkpoint_path=str(tmp_path / "head.pth"),
                     save_path=str(tmp_path / "run"), device="cpu", precision="fp32", num_workers=0,
                     batch_size=4, k_shot=2, seed=5, cal_image_size=32, aupro=False)
    torch.manual_seed(24)
    head_model = FDSL.from_config(_cfg(tiny_weights))
    save_checkpoint(tmp_path / "head.pth", head_model.head, config_to_dict(_cfg(tiny_weights)), epoch=0)

    ev = Evaluator(cfg)
    res = ev.run()[5]
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["memory_bank_bytes"] == res["memory_bank_bytes"]
    assert set(on_disk["memory_bank_bytes"]) == {"carpet_syn", "wood_syn"}
    refs = read_k_shot_file(tmp_path / "run" / "k_shot.txt", ev.meta, ev.classes, 2)
    for cls, reported in on_disk["memory_bank_bytes"].items():
        images = load_reference_images(data, refs[cls], SIZE)
        mem = ev.model.make_memory(ev.model.encode_references(images))
        assert reported == mem.nbytes() == _expected_bytes(2, 9, 4, 2)
        per_class = json.loads((tmp_path / "run" / "per_class" / f"{cls}.json").read_text())
        assert per_class["memory_bank_bytes"] == reported
