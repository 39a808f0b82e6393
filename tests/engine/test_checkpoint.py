"""Tests for fdsl.engine.checkpoint: the released ``{'trainable_RR': ...}`` format (docs/method.md §4) and our own."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from fdsl.config import ModelConfig, config_to_dict
from fdsl.core.checkpoint_io import load_head, read_checkpoint
from fdsl.core.head import FDSLHead
from fdsl.engine.checkpoint import save_checkpoint
from fdsl.errors import CheckpointError

C = 64  # tiny backbone width
L = 4  # released models score 4 layers
BN = ("weight", "bias", "running_mean", "running_var")


def _released_state(c: int = C, layers: int = L, nam: bool = True, seed: int = 0) -> dict:
    """A released-code state dict, written from the docs/method.md §4 key table, with random values."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    def bn(prefix: str, n: int) -> dict:
        return {f"{prefix}.weight": rnd(n), f"{prefix}.bias": rnd(n),
                f"{prefix}.running_mean": rnd(n), f"{prefix}.running_var": rnd(n).abs() + 0.1,
                f"{prefix}.num_batches_tracked": torch.randint(1, 1000, (), generator=g)}

    sd: dict = {}
    for layer in range(layers):
        p = f"clsList.{layer}"
        sd.update(bn(f"{p}.fbatchNorm", c))
        sd[f"{p}.proj.0.weight"] = rnd(512, c)
        sd.update(bn(f"{p}.proj.1", 512))
        sd[f"{p}.proj.3.weight"] = rnd(128, 512)
        sd.update(bn(f"{p}.proj.4", 128))
        sd[f"{p}.proj.6.weight"] = rnd(32, 128)
        sd.update(bn(f"{p}.proj.7", 32))
        sd[f"{p}.proj.9.weight"] = rnd(2, 32)
        sd[f"{p}.proj.9.bias"] = rnd(2)
    if nam:
        sd["convRes.conv.weight"] = rnd(6, 2, 5, 5)
        sd["convRes.conv.bias"] = rnd(6)
        sd["convRes.conv2.weight"] = rnd(2, 6, 5, 5)
        sd["convRes.conv2.bias"] = rnd(2)
    # keys of unused options, to be ignored
    for i in range(layers):
        sd[f"adapterList.{i}.fc.weight"] = rnd(c, c)
        sd[f"adapterList.{i}.fc.bias"] = rnd(c)
    sd["zeroClsModule.weight"] = rnd(3, c)
    return sd


def _save_released(path: Path, state: dict) -> Path:
    torch.save({"trainable_RR": state}, path)
    return path


def _fresh_head(c: int = C, layers: int = L, use_nam: bool = True) -> FDSLHead:
    torch.manual_seed(123)
    return FDSLHead(c, layers, use_nam=use_nam)


def _expected_location(head: FDSLHead) -> dict:
    """Released key -> the tensor in our head that must hold its value, written out independently."""
    where = {}
    for layer, s in enumerate(head.scorers):
        p = f"clsList.{layer}"
        for k in BN + ("num_batches_tracked",):
            where[f"{p}.fbatchNorm.{k}"] = getattr(s.fbatchNorm, k)
            for i in (1, 4, 7):
                where[f"{p}.proj.{i}.{k}"] = getattr(s.proj[i], k)
        for i in (0, 3, 6, 9):
            where[f"{p}.proj.{i}.weight"] = s.proj[i].weight
        where[f"{p}.proj.9.bias"] = s.proj[9].bias
    where["convRes.conv.weight"] = head.nam.conv.weight
    where["convRes.conv.bias"] = head.nam.conv.bias
    where["convRes.conv2.weight"] = head.nam.conv2.weight
    where["convRes.conv2.bias"] = head.nam.conv2.bias
    return where


def test_released_checkpoint_every_tensor_lands_in_place(tmp_path: Path) -> None:
    state = _released_state()
    path = _save_released(tmp_path / "released.pth", state)
    head = _fresh_head()
    meta = load_head(head, path, num_layers=L, use_nam=True)
    assert meta["format"] == "released"
    where = _expected_location(head)
    used = [k for k in state if not k.startswith(("adapterList.", "zeroClsModule."))]
    assert set(used) == set(where)  # the table covers every used key, and nothing else
    for k, target in where.items():
        assert target.dtype == state[k].dtype, k
        torch.testing.assert_close(target.detach(), state[k], atol=0, rtol=0, msg=f"{k} not loaded in place")


def test_released_checkpoint_with_module_prefix(tmp_path: Path) -> None:
    state = _released_state(seed=1)
    path = _save_released(tmp_path / "ddp.pth", {"module." + k: v for k, v in state.items()})
    head = _fresh_head()
    load_head(head, path, num_layers=L, use_nam=True)
    torch.testing.assert_close(head.scorers[2].proj[6].weight.detach(), state["clsList.2.proj.6.weight"])


def test_released_loaded_head_scores_like_the_weights_say(tmp_path: Path) -> None:
    """A forward pass through the loaded scorer equals the same network computed from the raw tensors."""
    state = _released_state(seed=2)
    head = _fresh_head()
    load_head(head, _save_released(tmp_path / "r.pth", state), num_layers=L, use_nam=True)
    head.eval()
    r = torch.rand(1, 9, C, generator=torch.Generator().manual_seed(3))
    x = r.reshape(9, C)

    def bn(x, p):
        return (x - state[f"{p}.running_mean"]) / torch.sqrt(state[f"{p}.running_var"] + 1e-5) \
            * state[f"{p}.weight"] + state[f"{p}.bias"]

    p = "clsList.1"
    x = bn(x, f"{p}.fbatchNorm")
    for lin, norm in ((0, 1), (3, 4), (6, 7)):
        x = torch.relu(bn(x @ state[f"{p}.proj.{lin}.weight"].T, f"{p}.proj.{norm}"))
    x = (x @ state[f"{p}.proj.9.weight"].T + state[f"{p}.proj.9.bias"]).softmax(-1)
    with torch.no_grad():
        got = head.scorers[1](r)[0]
    torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-4)


def test_own_checkpoint_roundtrip(tmp_path: Path) -> None:
    head = _fresh_head(layers=2)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p))
        head.scorers[0].fbatchNorm.running_mean.add_(3.0)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3, betas=(0.5, 0.999))
    loss = sum(s(torch.rand(2, 4, C)).sum() for s in head.scorers)
    loss.backward()
    opt.step()
    mcfg = config_to_dict(ModelConfig(model="FDSL-Tiny-ViT", features_list=[2, 4], few_shot_features=[2, 4]))
    path = tmp_path / "run" / "epoch_3.pth"
    save_checkpoint(path, head, mcfg, epoch=3, optimizer=opt)
    assert [p.name for p in path.parent.iterdir()] == ["epoch_3.pth"]  # no temp file left

    raw = torch.load(path, map_location="cpu", weights_only=True)  # safe loading works
    assert raw["epoch"] == 3 and raw["model_config"] == mcfg and raw["optimizer"] is not None

    other = FDSLHead(C, 2, use_nam=True)
    meta = load_head(other, path, num_layers=2, use_nam=True)
    assert {k: meta[k] for k in ("format", "epoch", "model_config")} == {"format": "fdsl", "epoch": 3,
                                                                          "model_config": mcfg}
    # resuming restores the optimizer from the same read
    assert meta["optimizer"]["param_groups"] == raw["optimizer"]["param_groups"]
    assert meta["optimizer"]["state"].keys() == raw["optimizer"]["state"].keys() != set()
    sd_a, sd_b = head.state_dict(), other.state_dict()
    assert set(sd_a) == set(sd_b)
    for k in sd_a:
        torch.testing.assert_close(sd_b[k], sd_a[k], atol=0, rtol=0, msg=k)


def test_wrong_width_names_key_and_shapes(tmp_path: Path) -> None:
    path = _save_released(tmp_path / "c32.pth", _released_state(c=32))
    head = _fresh_head(c=C)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(CheckpointError) as exc:
        load_head(head, path, num_layers=L, use_nam=True)
    msg = str(exc.value)
    assert str(path) in msg
    # some mis-shaped key is named together with its checkpoint shape and model shape
    own = head.state_dict()
    ck = _released_state(c=32)
    reported = []
    for k, v in own.items():
        rel = k.replace("scorers.", "clsList.", 1).replace("nam.", "convRes.", 1)
        if rel in ck and tuple(ck[rel].shape) != tuple(v.shape):
            suffix = k.split(".", 1)[1]  # e.g. "0.fbatchNorm.bias", shared by both namings
            if suffix in msg and str(tuple(ck[rel].shape)) in msg and str(tuple(v.shape)) in msg:
                reported.append(k)
    assert reported, f"no mis-shaped key with both shapes in: {msg}"
    for k, v in head.state_dict().items():  # nothing half-loaded
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


def test_missing_key_is_named(tmp_path: Path) -> None:
    state = _released_state()
    del state["clsList.1.proj.3.weight"]
    path = _save_released(tmp_path / "missing.pth", state)
    with pytest.raises(CheckpointError) as exc:
        load_head(_fresh_head(), path, num_layers=L, use_nam=True)
    assert "1.proj.3.weight" in str(exc.value)
    assert "missing" in str(exc.value)


def test_missing_nam_keys_when_nam_is_on(tmp_path: Path) -> None:
    path = _save_released(tmp_path / "nonam.pth", _released_state(nam=False))
    with pytest.raises(CheckpointError, match="conv"):
        load_head(_fresh_head(), path, num_layers=L, use_nam=True)


def test_more_scorers_than_layers(tmp_path: Path) -> None:
    path = _save_released(tmp_path / "four.pth", _released_state(layers=4))
    with pytest.raises(CheckpointError, match="4 layers"):
        load_head(_fresh_head(layers=2), path, num_layers=2, use_nam=True)


def test_fewer_scorers_than_layers(tmp_path: Path) -> None:
    path = _save_released(tmp_path / "two.pth", _released_state(layers=2))
    with pytest.raises(CheckpointError, match="missing"):
        load_head(_fresh_head(layers=4), path, num_layers=4, use_nam=True)


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.mark.parametrize("kind", ["garbage", "missing", "pickle_code", "not_a_dict", "unknown_dict"])
def test_unreadable_or_foreign_files(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.pth"
    if kind == "garbage":
        path.write_bytes(b"\x00\x01 definitely not a checkpoint " * 20)
    elif kind == "pickle_code":
        torch.save({"trainable_RR": _Evil()}, path)  # runs code when unpickled unsafely
    elif kind == "not_a_dict":
        torch.save(torch.zeros(3), path)
    elif kind == "unknown_dict":
        torch.save({"state_dict": {"a": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError) as exc:
        load_head(_fresh_head(), path, num_layers=L, use_nam=True)
    assert str(path) in str(exc.value)


def test_read_checkpoint_is_safe(tmp_path: Path, capsys) -> None:
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(CheckpointError, match="weights_only"):
        read_checkpoint(path)
    assert "pickled code ran" not in capsys.readouterr().out


def test_no_nam_head_loads_released_checkpoint_without_conv_res(tmp_path: Path) -> None:
    state = _released_state(nam=False, seed=4)
    path = _save_released(tmp_path / "nonam.pth", state)
    head = _fresh_head(use_nam=False)
    nam_before = {k: v.clone() for k, v in head.nam.state_dict().items()}
    load_head(head, path, num_layers=L, use_nam=False)
    torch.testing.assert_close(head.scorers[3].proj[9].bias.detach(), state["clsList.3.proj.9.bias"])
    torch.testing.assert_close(head.scorers[0].fbatchNorm.running_var, state["clsList.0.fbatchNorm.running_var"])
    for k, v in head.nam.state_dict().items():  # untouched, unused
        torch.testing.assert_close(v, nam_before[k], atol=0, rtol=0)


def test_no_nam_head_accepts_released_checkpoint_with_conv_res(tmp_path: Path) -> None:
    state = _released_state(seed=5)
    head = _fresh_head(use_nam=False)
    load_head(head, _save_released(tmp_path / "withnam.pth", state), num_layers=L, use_nam=False)
    torch.testing.assert_close(head.scorers[1].proj[0].weight.detach(), state["clsList.1.proj.0.weight"])


# ---------------------------------------------------------------------------- settings vs the checkpoint
def _run_cfg(**kw):
    from fdsl.config import TestConfig as EvalConfig

    return EvalConfig(checkpoint_path="c.pth", **kw)


def _own_checkpoint(path: Path, **model_kw) -> Path:
    save_checkpoint(path, _fresh_head(use_nam=model_kw.get("use_nam", True)),
                    config_to_dict(ModelConfig(**model_kw)), epoch=1)
    return path


def test_reconcile_takes_every_trained_setting_when_not_given(caplog) -> None:
    from fdsl.core.checkpoint_io import TRAINED_SETTINGS, reconcile_model_config

    assert set(TRAINED_SETTINGS) == {"use_nam", "features_list", "model", "image_size", "use_norm",
                                     "align_mode", "use_abs", "quick_gelu"}
    saved = config_to_dict(ModelConfig(model="FDSL-Tiny-ViT", image_size=112, features_list=[1, 2],
                                       few_shot_features=[1, 2], quick_gelu=True, use_norm=False,
                                       align_mode="diff2", use_abs=False, use_nam=False))
    cfg = _run_cfg()
    with caplog.at_level("INFO"):
        taken = reconcile_model_config(cfg, saved, set(), "c.pth")
    assert set(taken) == set(TRAINED_SETTINGS)
    for name in TRAINED_SETTINGS:
        assert getattr(cfg, name) == saved[name], name
    assert cfg.few_shot_features == [1, 2]
    assert "using its --use_nam 0" in caplog.text and "using its --features_list 1 2" in caplog.text
    cfg.validate()


@pytest.mark.parametrize("flag,value,saved", [
    ("use_nam", True, False), ("features_list", [6, 12], [6, 12, 18, 24]), ("image_size", 336, 518),
    ("model", "ViT-B-16", "ViT-L-14-336"), ("use_norm", False, True), ("align_mode", "diff2", "mulmax"),
    ("use_abs", False, True), ("quick_gelu", True, False),
])
def test_reconcile_conflict_names_both_values(flag, value, saved) -> None:
    from fdsl.core.checkpoint_io import reconcile_model_config

    cfg = _run_cfg(**{flag: value})
    with pytest.raises(CheckpointError, match=rf"--{flag} .* but this run sets --{flag} "):
        reconcile_model_config(cfg, {flag: saved}, {flag}, "c.pth")
    # Same value given explicitly: fine.
    cfg = _run_cfg(**{flag: saved})
    assert reconcile_model_config(cfg, {flag: saved}, {flag}, "c.pth") == {}


def test_reconcile_with_own_checkpoint_file(tmp_path: Path) -> None:
    from fdsl.core.checkpoint_io import reconcile_with_checkpoint

    path = _own_checkpoint(tmp_path / "e.pth", use_nam=False)
    cfg = _run_cfg()
    reconcile_with_checkpoint(cfg, path, set())
    assert cfg.use_nam is False
    with pytest.raises(CheckpointError, match="--use_nam 0 but this run sets --use_nam 1"):
        reconcile_with_checkpoint(_run_cfg(), path, {"use_nam"})


def test_released_checkpoint_without_nam_weights_and_nam_on_is_an_error(tmp_path: Path) -> None:
    from fdsl.core.checkpoint_io import reconcile_with_checkpoint

    path = _save_released(tmp_path / "r.pth", _released_state(nam=False))
    with pytest.raises(CheckpointError, match=r"no NAM weights \(convRes\.\*\).*--use_nam 0"):
        reconcile_with_checkpoint(_run_cfg(), path, set())
    cfg = _run_cfg(use_nam=False)
    assert reconcile_with_checkpoint(cfg, path, {"use_nam"}) == {}
    with_nam = _save_released(tmp_path / "r2.pth", _released_state(nam=True))
    assert reconcile_with_checkpoint(_run_cfg(), with_nam, set()) == {}
