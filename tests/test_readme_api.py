"""The README's "Python API" snippet (and docs/inspect.md's Detector snippet) run as written, on the tiny
random-weight CLIP and synthetic data.

Only its paths and the full-size model are substituted (each substitution must still find its text, so
the test fails when the snippet changes under it, instead of silently running something else).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ('ModelConfig(model="FDSL-Tiny-ViT", pretrained=WEIGHTS, image_size=112, features_list=[2, 4], '
        'few_shot_features=[2, 4], winmode="mul", win_size=4, win_stride=2)')


def readme_snippet(section: str, doc: str = "README.md") -> str:
    """The first ```python block after the heading `section` of `doc` (a markdown file of the repository)."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    head = re.search(rf"^#+ {re.escape(section)}\s*$", text, re.M)
    assert head, f"{doc} has no section {section!r}"
    block = re.search(r"```python\n(.*?)```", text[head.end():], re.S)
    assert block, f"{doc} section {section!r} has no python block"
    return block.group(1)


def test_readme_python_api_snippet_runs(tiny_weights, tmp_path) -> None:
    from fdsl.config import ModelConfig
    from fdsl.core.model import FDSL, FDSLOutput
    from fdsl.data.synthetic import make_synthetic_dataset
    from fdsl.engine.checkpoint import save_checkpoint

    data = make_synthetic_dataset(tmp_path / "mvtec", classes=("bottle",), n_train=2, n_test_good=1, n_test_bad=1,
                                  image_size=64, seed=0)
    ref = sorted((data / "bottle" / "train" / "good").glob("*.png"))[0].relative_to(data).as_posix()
    cfg = eval(TINY, {"ModelConfig": ModelConfig, "WEIGHTS": str(tiny_weights)})
    ckpt = tmp_path / "epoch_5.pth"
    save_checkpoint(ckpt, FDSL.from_config(cfg).head, dataclasses.asdict(cfg), epoch=5)

    code = readme_snippet("Python API")
    for old, new in [('ModelConfig(pretrained="openai", winmode="mul")', TINY),
                     ('"checkpoints/trained_on_visa/epoch_5.pth"', repr(str(ckpt))),
                     ('"data/mvtec"', repr(str(data))),
                     ('"bottle/train/good/000.png"', repr(ref))]:
        assert old in code, f"the README snippet no longer holds {old}: update this test's substitutions"
        code = code.replace(old, new)
    images = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    scope = {"WEIGHTS": str(tiny_weights), "images": images}
    exec(compile(code, "README.md (Python API)", "exec"), scope)  # noqa: S102 -- our own README

    out = scope["out"]
    assert isinstance(out, FDSLOutput)
    assert out.anomaly_map.shape == (3, 240, 240) and out.pred_score.shape == (3,)
    assert torch.isfinite(out.anomaly_map).all()
    torch.testing.assert_close(out.pred_score, 0.5 * (out.patch_score + out.map_max), atol=1e-6, rtol=0)
    assert scope["memory"].window_bank is not None  # LFE on: the snippet's memory holds both banks


def test_readme_detector_snippet_runs(tiny_weights, tmp_path, monkeypatch) -> None:
    """docs/inspect.md's Python block (linked from the README): fit, calibrate, save, load, predict, as written."""
    from PIL import Image

    from fdsl.config import ModelConfig
    from fdsl.core.model import FDSL
    from fdsl.data.synthetic import make_synthetic_dataset
    from fdsl.engine.checkpoint import save_checkpoint

    root = make_synthetic_dataset(tmp_path / "data", classes=("part",), n_train=2, n_test_good=2, n_test_bad=3,
                                  image_size=64, seed=3) / "part"
    cfg = eval(TINY, {"ModelConfig": ModelConfig, "WEIGHTS": str(tiny_weights)})
    (tmp_path / "trained_on_visa").mkdir()
    save_checkpoint(tmp_path / "trained_on_visa" / "epoch_5.pth", FDSL.from_config(cfg).head,
                    dataclasses.asdict(cfg), epoch=5)
    defect = sorted(p.name for p in (root / "test").iterdir() if p.name != "good")[0]
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    goods = sorted((root / "test" / "good").glob("*.png"))
    Image.open(goods[0]).save(incoming / "a.png")
    Image.open(goods[1]).convert("RGB").save(incoming / "b.jpg")
    monkeypatch.chdir(tmp_path)

    code = readme_snippet("Inspecting your own parts", "docs/inspect.md")
    for old, new in [('"good_parts/"', repr(str(root / "train" / "good"))),
                     ('"val_good/"', repr(str(root / "test" / "good"))),
                     ('"val_bad/"', repr(str(root / "test" / defect))),
                     ('"val_masks/"', repr(str(root / "ground_truth" / defect)))]:
        assert old in code, f"the README snippet no longer holds {old}: update this test's substitutions"
        code = code.replace(old, new)
    scope: dict = {}
    exec(compile(code, "docs/inspect.md", "exec"), scope)  # noqa: S102 -- our own README

    det, p = scope["det"], scope["p"]
    assert (tmp_path / "part.fdsl").is_file() and det.image_threshold is not None
    assert p.anomaly_map.shape == (240, 240) and p.mask.shape == (64, 64) and isinstance(p.is_anomalous, bool)
