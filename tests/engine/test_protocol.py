"""The paper's protocol in one run (``--k_shot 1 2 4 --seeds ...``): shots × seeds, features once.

Checked here, on the tiny random CLIP (FDSL-Tiny-ViT at 112 px) and synthetic data:
- each (k, seed) of one protocol run equals a separate single run with that k and ``--k_shot_file``
  pointing at the protocol's k_shot.txt (scores to 1e-6, metrics exactly), global and LFE branches;
- shots are nested per seed, and no reference image is encoded twice in a class;
- test images go through the backbone once per class, whatever the number of (k, seed);
- a rerun reuses finished (k, seed, class) records and recomputes only what is missing;
- the layout and the summary files (md, csv, json, png).
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from fdsl_test_utils import liven_head

import fdsl.engine.evaluation as evaluation_mod
from fdsl.config import ModelConfig, config_to_dict, parse_config
from fdsl.config import TestConfig as EvalConfig
from fdsl.core.backbone import CLIPBackbone, register_model_configs
from fdsl.core.memory import Alignment, MemoryBank
from fdsl.core.model import FDSL
from fdsl.data.meta import load_meta
from fdsl.data.shots import sample_k_shot, sample_nested_k_shot
from fdsl.data.synthetic import make_synthetic_dataset
from fdsl.engine.checkpoint import save_checkpoint
from fdsl.engine.evaluation import Evaluator
from fdsl.engine.protocol import (
    PAPER_COLUMNS,
    RANDOM_WEIGHTS_WARNING,
    SUMMARY_METRICS,
    class_styles,
    run_provenance,
    write_summary,
)
from fdsl.errors import ConfigError
from fdsl.outputs.files import sha256_file

TINY = "FDSL-Tiny-ViT"
SIZE = 112
LAYERS = [2, 4]
CLASSES = ("brick_syn", "tissue_syn")
N_TRAIN, N_GOOD, N_BAD = 6, 2, 3
SHOTS, SEEDS = [1, 2, 4], [3, 4]
LFE = {"winmode": "mul", "win_size": 4, "win_stride": 2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Synthetic data, a tiny-CLIP weights file, a head checkpoint with varied maps, and a shared model."""
    tmp = tmp_path_factory.mktemp("protocol")
    register_model_configs()
    data = make_synthetic_dataset(tmp / "data", classes=CLASSES, n_train=N_TRAIN, n_test_good=N_GOOD,
                                  n_test_bad=N_BAD, image_size=64, seed=7)
    torch.manual_seed(0)
    weights = tmp / "tiny.pt"
    torch.save(open_clip.create_model(TINY).state_dict(), weights)
    mcfg = ModelConfig(model=TINY, pretrained=str(weights), image_size=SIZE, features_list=list(LAYERS),
                       few_shot_features=list(LAYERS), **LFE)
    torch.manual_seed(1)
    model = FDSL.from_config(mcfg).eval()
    g = torch.Generator().manual_seed(2)
    liven_head(model, torch.randn(2, 3, SIZE, SIZE, generator=g), torch.randn(3, 3, SIZE, SIZE, generator=g))
    ckpt = tmp / "head.pth"
    save_checkpoint(ckpt, model.head, config_to_dict(mcfg), epoch=1)
    return tmp, data, weights, ckpt


def _cfg(setup, save: Path, **opts) -> EvalConfig:
    _, data, weights, ckpt = setup
    return EvalConfig(model=TINY, pretrained=str(weights), image_size=SIZE, features_list=list(LAYERS),
                      few_shot_features=list(LAYERS), data_path=str(data), checkpoint_path=str(ckpt),
                      save_path=str(save), batch_size=3, num_workers=0, device="cpu", precision="fp32",
                      cal_image_size=32, **opts)


class Spy:
    """Counts what goes through the backbone: reference paths loaded, and ViT passes (images and windows)."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.ref_paths: list[list[str]] = []
        self.extracted = 0
        self.predict_memories: list[int] = []
        load = evaluation_mod.load_reference_images
        forward_patches = CLIPBackbone.forward_patches
        predict = FDSL.predict

        def spy_load(root, rel_paths, image_size, *args, **kwargs):
            self.ref_paths.append(list(rel_paths))
            return load(root, rel_paths, image_size, *args, **kwargs)

        def spy_forward_patches(backbone, patches):  # every ViT pass: whole images and window crops
            self.extracted += patches.shape[0]
            return forward_patches(backbone, patches)

        def spy_predict(model, images, memories, out_size=None):
            self.predict_memories.append(len(memories))
            return predict(model, images, memories, out_size)

        mp.setattr(evaluation_mod, "load_reference_images", spy_load)
        mp.setattr(CLIPBackbone, "forward_patches", spy_forward_patches)
        mp.setattr(FDSL, "predict", spy_predict)


@pytest.fixture(scope="module", params=["global", "lfe"])
def protocol(request, setup):
    """One protocol run (3 shots × 2 seeds) per branch, with what it encoded recorded."""
    tmp = setup[0]
    opts = dict(LFE) if request.param == "lfe" else {}
    save = tmp / f"protocol_{request.param}"
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        cfg = _cfg(setup, save, k_shot=list(SHOTS), seeds=list(SEEDS), **opts)
        ev = Evaluator(cfg)
        results = ev.run()
    return ev, results, spy, opts, save


# --------------------------------------------------------------------------- draws and config


def test_nested_draw_is_one_seeded_permutation(setup):
    meta = load_meta(setup[1])
    for cls in CLASSES:
        for seed in SEEDS:
            draw = sample_nested_k_shot(meta, cls, SHOTS, seed)
            assert draw == sample_nested_k_shot(meta, cls, list(reversed(SHOTS)), seed)  # deterministic
            assert draw[1] == draw[2][:1] and draw[2] == draw[4][:2]  # nested: k=1 ⊂ k=2 ⊂ k=4
            assert len(set(draw[4])) == 4 and all("/train/good/" in p for p in draw[4])
        assert sample_nested_k_shot(meta, cls, [4], 3) != sample_nested_k_shot(meta, cls, [4], 4)
    # A single k keeps today's draw (`sample_k_shot`), which is not a prefix of a permutation in general.
    ev_refs = {k: sample_k_shot(meta, CLASSES[0], k, 3) for k in SHOTS}
    assert len(ev_refs[4]) == 4
    with pytest.raises(Exception, match="only 6 normal"):
        sample_nested_k_shot(meta, CLASSES[0], [1, 7], 3)


def test_separate_shot_draw_matches_single_k_runs(setup, tmp_path):
    """--shot_draw separate: each k's references are those of a run with --k_shot k alone (same seed)."""
    meta = load_meta(setup[1])
    separate = Evaluator(_cfg(setup, tmp_path / "sep", k_shot=list(SHOTS), shot_draw="separate"))
    nested = Evaluator(_cfg(setup, tmp_path / "nest", k_shot=list(SHOTS)))
    for seed in SEEDS:
        got = separate.references(seed)
        for k in SHOTS:
            assert got[k] == {c: sample_k_shot(meta, c, k, seed) for c in CLASSES}
        assert nested.references(seed)[1] == {c: sample_nested_k_shot(meta, c, SHOTS, seed)[1] for c in CLASSES}
    # On this data the draws differ for at least one (class, seed): the option changes something real.
    assert any(separate.references(s)[1] != nested.references(s)[1] for s in SEEDS)


def test_k_shot_flag_takes_one_or_more_values(setup):
    base = ["--checkpoint_path", "x.pth", "--data_path", "d"]
    assert parse_config(EvalConfig, base + ["--k_shot", "2"]).k_shot == 2  # one value: today's int
    cfg = parse_config(EvalConfig, base + ["--k_shot", "4", "1", "2", "--seeds", "10", "11"])
    assert cfg.k_shot == [4, 1, 2] and cfg.shot_list() == [1, 2, 4]
    assert config_to_dict(parse_config(EvalConfig, base + ["--kshot", "1"]))["k_shot"] == 1
    assert parse_config(EvalConfig, base + ["--k_shot", "1", "1"]).k_shot == 1  # a repeat: used once, warned
    assert parse_config(EvalConfig, base + ["--k_shot", "2", "1", "2"]).k_shot == [2, 1]
    with pytest.raises(ConfigError, match="positive"):
        parse_config(EvalConfig, base + ["--k_shot", "1", "0"])


@pytest.mark.parametrize("mode", ["mulmax", "diff2"])
def test_nested_residuals_equal_separate_alignment(mode):
    g = torch.Generator().manual_seed(0)
    tokens = [torch.nn.functional.normalize(torch.randn(4, 16, 8, generator=g), dim=-1) for _ in range(2)]
    bank = MemoryBank(tokens, torch.randn(4, 5, generator=g))
    query = [torch.randn(3, 16, 8, generator=g) for _ in range(2)]
    align = Alignment(mode=mode, chunk_mb=1)
    nested = bank.nested_residuals(query, [1, 2, 4], align)
    for m, got in zip([1, 2, 4], nested):
        alone = MemoryBank([t[:m].clone() for t in tokens], bank.image_embeds[:m].clone())
        for a, b in zip(got, alone.residuals(query, align)):
            assert torch.equal(a, b)
    assert bank.prefix(2).layer(0).data_ptr() == bank.layer(0).data_ptr()  # a view, not a copy


# --------------------------------------------------------------------------- one protocol run


def test_layout_and_nested_references(protocol):
    ev, results, _, _, save = protocol
    assert set(results) == {(k, s) for k in SHOTS for s in SEEDS} | {"summary"}
    for k in SHOTS:
        for s in SEEDS:
            d = save / f"k{k}" / f"seed_{s}"
            assert {p.name for p in d.iterdir()} >= {"results.json", "scores.csv", "k_shot.txt", "per_class"}
            res = json.loads((d / "results.json").read_text())
            assert res["config"]["k_shot"] == k and res["config"]["seed"] == s
            assert len((d / "k_shot.txt").read_text().split()) == k * len(CLASSES)
    for s in SEEDS:
        for cls in CLASSES:
            refs = {k: ev.refs[(k, s)][cls] for k in SHOTS}
            assert refs[1] == refs[2][:1] and refs[2] == refs[4][:2]
    assert not (save / "seed_3").exists() and not (save / "results.json").exists()


def test_each_image_encoded_once(protocol):
    ev, _, spy, opts, _ = protocol
    assert len(spy.ref_paths) == len(CLASSES)  # one reference encoding per class
    n_refs = 0
    for paths, cls in zip(spy.ref_paths, CLASSES):
        assert len(paths) == len(set(paths)), "a reference image was encoded twice"
        assert set(paths) == {p for r in ev.runs for p in ev.refs[r][cls]}
        n_refs += len(paths)
    n_test = len(CLASSES) * (N_GOOD + N_BAD)
    n_windows = 9  # grid 8, window 4, stride 2: 3 × 3
    per_image = 1 + (n_windows if opts else 0)  # backbone passes: the image, and its windows with LFE
    assert spy.extracted == (n_refs + n_test) * per_image
    assert set(spy.predict_memories) == {len(SHOTS) * len(SEEDS)}  # every batch scored against all runs


def _scores(path: Path) -> list[list]:
    with path.open(newline="") as fh:
        return [[r["img_path"], r["anomaly"], float(r["score"]), float(r["patch_score"]), float(r["map_max"])]
                for r in csv.DictReader(fh)]


def test_equals_separate_single_runs(protocol, setup):
    ev, results, _, opts, save = protocol
    single = setup[0] / f"single_{'lfe' if opts else 'global'}"
    for k in SHOTS:
        for s in SEEDS:
            run = save / f"k{k}" / f"seed_{s}"
            cfg = _cfg(setup, single / f"k{k}_s{s}", k_shot=k, seed=s, k_shot_file=str(run / "k_shot.txt"), **opts)
            alone = Evaluator(cfg, model=ev.model).run()[s]
            assert alone["classes"] == results[(k, s)]["classes"]  # metrics exactly
            assert alone["memory_bank_bytes"] == results[(k, s)]["memory_bank_bytes"]
            got, want = _scores(run / "scores.csv"), _scores(single / f"k{k}_s{s}" / "scores.csv")
            assert [g[:2] for g in got] == [w[:2] for w in want]
            for g, w in zip(got, want):
                assert g[2:] == pytest.approx(w[2:], abs=1e-6, rel=0)


def test_summary_files(protocol, setup):
    _, results, _, _, save = protocol
    summary = json.loads((save / "summary.json").read_text())
    assert summary == results["summary"]
    assert summary["shots"] == SHOTS and summary["seeds"] == SEEDS
    for k in SHOTS:
        block = summary["by_k"][str(k)]
        for m in SUMMARY_METRICS:
            per_seed = [results[(k, s)]["mean"][m] for s in SEEDS]
            assert block["mean"][m] == pytest.approx(sum(per_seed) / len(per_seed))
            vals = [results[(k, s)]["classes"][CLASSES[0]][m] for s in SEEDS]
            assert block["classes"][CLASSES[0]]["mean"][m] == pytest.approx(sum(vals) / 2)
            assert block["classes"][CLASSES[0]]["std"][m] == pytest.approx(abs(vals[0] - vals[1]) / 2)
    md = (save / "summary.md").read_text()
    assert md.count("| objects") == len(SHOTS) and md.count("**mean**") == len(SHOTS)
    assert all(name in md for _, name in PAPER_COLUMNS) and "4-shot" in md and " ± " in md
    with (save / "summary.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    # One vocabulary: summary.csv names each metric by its results.json key, as fractions.
    assert len(rows) == len(SHOTS) * (len(CLASSES) + 1) * len(SUMMARY_METRICS)
    assert {r["metric"] for r in rows} == set(SUMMARY_METRICS) == set(results[(1, 3)]["mean"])
    first = rows[0]
    assert (first["k"], first["class"], first["metric"]) == ("1", CLASSES[0], "image_auroc")
    assert float(first["mean"]) == summary["by_k"]["1"]["classes"][CLASSES[0]]["mean"]["image_auroc"]
    assert summary["units"]["metrics"].startswith("fraction") and summary["labels"]["pixel_auroc"] == "AUROC_p"
    # Stamped: backbone, weights file + sha256, checkpoint + sha256, dataset root, command.
    _, data, weights, ckpt = setup
    prov = summary["provenance"]
    assert prov["backbone"] == TINY and not prov["random_weights"]
    assert prov["weights"] == {"path": str(weights.resolve()), "sha256": sha256_file(weights)}
    assert prov["checkpoint"] == {"path": str(ckpt.resolve()), "sha256": sha256_file(ckpt)}
    assert prov["data_path"] == str(Path(data).resolve()) and prov["command"]
    assert f"sha256 {sha256_file(ckpt)}" in md and "RANDOM" not in md
    assert results[(1, 3)]["provenance"] == prov
    png = (save / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_resume_skips_finished_runs(protocol, setup, caplog):
    ev, results, _, opts, save = protocol
    cfg = _cfg(setup, save, k_shot=list(SHOTS), seeds=list(SEEDS), **opts)
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        again = Evaluator(cfg, model=ev.model).run()
    assert spy.ref_paths == [] and spy.extracted == 0  # everything reused
    assert again[(2, 4)] == results[(2, 4)]
    # One missing (k, seed, class): only it is recomputed, with only its own references.
    (save / "k2" / "seed_4" / "per_class" / f"{CLASSES[1]}.json").unlink()
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.INFO, logger="fdsl.engine.evaluation"):
        spy = Spy(mp)
        again = Evaluator(cfg, model=ev.model).run()
    assert [sorted(p) for p in spy.ref_paths] == [sorted(ev.refs[(2, 4)][CLASSES[1]])]
    assert spy.predict_memories and set(spy.predict_memories) == {1}
    assert again[(2, 4)]["classes"] == results[(2, 4)]["classes"]
    assert "reference memory: 2 distinct image(s)" in caplog.text and "bank(s) hold" in caplog.text


def test_single_k_keeps_todays_layout(setup):
    tmp = setup[0]
    ev = Evaluator(_cfg(setup, tmp / "one", k_shot=2, seeds=[3, 4]))
    assert ev.refs[(2, 3)] == {c: sample_k_shot(ev.meta, c, 2, 3) for c in CLASSES}  # today's draw
    assert ev.run_dir((2, 3)) == tmp / "one" / "seed_3" and ev.run_dir((2, 4)) == tmp / "one" / "seed_4"
    ev1 = Evaluator(_cfg(setup, tmp / "one1", k_shot=[2], seed=3), model=ev.model)
    assert ev1.cfg.k_shot == 2 and ev1.run_dir((2, 3)) == tmp / "one1"
    # One k, several seeds: seed_<s>/ folders, and summary.json keeps its earlier top-level keys.
    results = ev.run()
    assert set(results) == {3, 4, "summary"} and not (tmp / "one" / "k2").exists()
    summary = json.loads((tmp / "one" / "summary.json").read_text())
    assert summary["seeds"] == [3, 4] and summary["shots"] == [2]
    for m in SUMMARY_METRICS:
        per_seed = [results[s]["mean"][m] for s in (3, 4)]
        assert summary["mean"][m] == pytest.approx(sum(per_seed) / 2)
        assert summary["std"][m] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2, abs=1e-12)
    assert (tmp / "one" / "summary.md").is_file() and (tmp / "one" / "seed_4" / "results.json").is_file()


def _red_pixels(png: Path) -> int:
    from PIL import Image

    px = np.asarray(Image.open(png).convert("RGB")).astype(int)  # (H, W, 3)
    return int(((px[..., 0] > 200) & (px[..., 1] < 60) & (px[..., 2] < 60)).sum())


def test_random_weights_are_stamped_loudly(tmp_path):
    """A summary from random backbone weights says so in summary.md and in red on summary.png."""
    per_run = {(k, s): {"only": {m: 0.5 + 0.01 * k + 0.001 * s for m in SUMMARY_METRICS}}
               for k in (1, 2) for s in (0, 1)}
    cfg = EvalConfig(model=TINY, pretrained="none", checkpoint_path="", data_path=str(tmp_path))
    random = run_provenance(cfg, command=["test.py", "--pretrained", "none"])
    assert random["random_weights"] and random["weights"] == {"tag": "none"} and random["checkpoint"] is None
    write_summary(tmp_path / "rnd", "mvtec", ["only"], per_run, random)
    real = dict(random, weights={"tag": "openai"}, random_weights=False)
    write_summary(tmp_path / "real", "mvtec", ["only"], per_run, real)
    md = (tmp_path / "rnd" / "summary.md").read_text()
    assert f"**{RANDOM_WEIGHTS_WARNING}**" in md and "command: test.py --pretrained none" in md
    assert RANDOM_WEIGHTS_WARNING not in (tmp_path / "real" / "summary.md").read_text()
    # One class draws in tab10 blue: the only red on the plot is the warning.
    assert _red_pixels(tmp_path / "rnd" / "summary.png") > 200
    assert _red_pixels(tmp_path / "real" / "summary.png") == 0


def test_fifteen_classes_get_distinct_styles():
    styles = class_styles(15)
    keys = [(st["color"], st["linestyle"], st["marker"]) for st in styles]
    assert len(set(keys)) == 15
    assert len({st["color"] for st in styles}) == 10  # ten colours, the last five repeated dashed
    assert all(a["color"] != b["color"] for a, b in zip(styles, styles[1:]))
