"""Tiny fitted and calibrated detectors (global, LFE) and a synthetic class, shared by the deploy tests."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import torch

TINY = "FDSL-Tiny-ViT"
CLS = "brick_syn"


def build_detectors(work: Path, branches: tuple[str, ...] = ("global", "lfe")) -> SimpleNamespace:
    """Detector files ``global.fdsl`` (winmode nan) and ``lfe.fdsl`` (mul 4/2) on the tiny CLIP, calibrated
    (those of `branches`)."""
    import open_clip
    from fdsl_test_utils import liven_head

    from fdsl.config import ModelConfig
    from fdsl.core.backbone import register_model_configs
    from fdsl.core.model import FDSL
    from fdsl.data.shots import load_reference_images
    from fdsl.data.synthetic import make_synthetic_dataset
    from fdsl.engine.checkpoint import save_checkpoint
    from fdsl.inspect.detector import Detector

    root = make_synthetic_dataset(work / "data", classes=(CLS,), n_train=2, n_test_good=3, n_test_bad=4,
                                  image_size=96, seed=1)
    register_model_configs()
    torch.manual_seed(0)
    weights = work / "tiny_clip.pt"
    torch.save(open_clip.create_model(TINY).state_dict(), weights)
    train = sorted(f"{CLS}/train/good/{p.name}" for p in (root / CLS / "train" / "good").glob("*.png"))
    test_dir = root / CLS / "test"
    test = sorted(str(p.relative_to(root)) for p in test_dir.rglob("*.png"))
    dets = {}
    for name, winmode in (("global", "nan"), ("lfe", "mul")):
        if name not in branches:
            continue
        mcfg = ModelConfig(model=TINY, pretrained=str(weights), image_size=112, features_list=[2, 4],
                           few_shot_features=[2, 4], winmode=winmode, win_size=4, win_stride=2)
        torch.manual_seed(3)
        model = FDSL.from_config(mcfg).eval()
        liven_head(model, load_reference_images(root, train, 112), load_reference_images(root, test, 112))
        ck = work / f"{name}.pth"
        save_checkpoint(ck, model.head, dataclasses.asdict(mcfg), epoch=1)
        det = Detector.fit(ck, root / CLS / "train" / "good", runtime="cpu", cal_image_size=64)
        bad = [d for d in test_dir.iterdir() if d.name != "good"]
        det.calibrate(test_dir / "good", bad)
        dets[name] = det.save(work / f"{name}.fdsl")
    images = sorted(test_dir.rglob("*.png"))
    return SimpleNamespace(work=work, root=root, weights=weights, detectors=dets, images=images,
                           test_dir=test_dir)


def reseal(folder: Path, **changes) -> dict:
    """Rewrite `folder`'s contract with `changes` and the model files' current sha256 (as an export would);
    returns it. Tests use it to reach the checks after the digest check."""
    import json

    from fdsl.outputs.files import sha256_file

    path = folder / "fdsl_export.json"
    info = json.loads(path.read_text())
    info.update(changes)
    model = folder / info["model_file"]
    info["model_sha256"] = sha256_file(model) if model.is_file() else info["model_sha256"]
    if info.get("weights_sha256") is not None and model.with_suffix(".bin").is_file():
        info["weights_sha256"] = sha256_file(model.with_suffix(".bin"))
    path.write_text(json.dumps(info))
    return info
