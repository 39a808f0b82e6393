"""`fit --max_shots N` (issue #19 §3): greedy coreset or even selection, and the warning for many shots."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch
from fdsl_test_utils import make_calibrated_detector
from PIL import Image


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_calibrated_detector(tmp_path_factory.mktemp("shots"))


def test_selection_rules_by_hand():
    from fdsl.inspect.shot_selection import even_indices, greedy_coreset

    assert even_indices(10, 4) == [0, 3, 6, 9] and even_indices(5, 9) == [0, 1, 2, 3, 4] and even_indices(7, 1) == [0]
    f = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.98, 0.15], [0.0, 1.0], [-1.0, 0.05]])
    # mean direction ~ (0.92, 0.40): nearest row is 2; farthest from it is 4; then 3 (farther than 0 from {2, 4})
    assert greedy_coreset(f, 1) == [2] and greedy_coreset(f, 2) == [2, 4] and greedy_coreset(f, 3) == [2, 3, 4]
    assert greedy_coreset(f, 9) == [0, 1, 2, 3, 4]


def _folder(env, root):
    """Four copies of one good image, then two other good images: a folder with little variety at its start."""
    root.mkdir()
    for i in range(4):
        shutil.copy(env.train[0], root / f"a{i}.png")
    shutil.copy(env.train[1], root / "b.png")
    Image.open(env.train[2]).transpose(Image.FLIP_LEFT_RIGHT).save(root / "c.png")
    return root


def test_max_shots_keeps_variety_and_equals_fitting_the_chosen_files(env, tmp_path):
    from fdsl.inspect.detector import Detector

    folder = _folder(env, tmp_path / "normal")
    core = Detector.fit(env.checkpoint, folder, runtime="cpu", max_shots=3)
    even = Detector.fit(env.checkpoint, folder, runtime="cpu", max_shots=3, shot_selection="even")
    core_names = [n["name"] for n in core.info["normal_images"]]
    assert len(core_names) == 3 and {"b.png", "c.png"} <= set(core_names), core_names  # one copy of a, b, c
    assert [n["name"] for n in even.info["normal_images"]] == ["a0.png", "a2.png", "c.png"]
    assert core.info["shots"] == {"selection": "coreset", "candidates": 6, "max_shots": 3}
    chosen = Detector.fit(env.checkpoint, [folder / n for n in core_names], runtime="cpu")
    assert chosen.info["shots"]["selection"] == "all"
    for k, v in chosen.memory.state_dict().items():
        assert torch.equal(core.memory.state_dict()[k], v), k
    assert core.memory.nbytes() == pytest.approx(Detector.fit(env.checkpoint, folder, runtime="cpu")
                                                 .memory.nbytes() / 2, rel=1e-6)


def test_many_shots_warn_with_projection_and_bad_values_are_errors(env, tmp_path, monkeypatch, caplog, capsys):
    from fdsl.cli.inspection import main
    from fdsl.inspect import shot_selection
    from fdsl.inspect.detector import Detector

    folder = _folder(env, tmp_path / "normal")
    monkeypatch.setattr(shot_selection, "LARGE_SHOTS", 4)
    with caplog.at_level(logging.WARNING, logger="fdsl"):
        det = Detector.fit(env.checkpoint, folder, runtime="cpu")
    msgs = [r.getMessage() for r in caplog.records if "no --max_shots" in r.getMessage()]
    assert len(msgs) == 1 and "6 shots" in msgs[0] and "GiB" in msgs[0] and "6x" in msgs[0]
    per_shot = det.memory.nbytes() / 6
    assert f"{per_shot / 2 ** 20:.1f} MiB per shot" in msgs[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fdsl"):
        Detector.fit(env.checkpoint, folder, runtime="cpu", max_shots=2)
    assert not [r for r in caplog.records if "no --max_shots" in r.getMessage()]
    for bad, needle in ((["--max_shots", "0"], "must be positive"), (["--shot_selection", "random"], "invalid choice")):
        argv = ["fit", "--checkpoint", str(env.checkpoint), "--normal", str(folder), "--out", str(tmp_path / "d.fdsl"),
                "--device", "cpu", *bad]
        capsys.readouterr()
        assert main(argv) == 2 and needle in capsys.readouterr().err
