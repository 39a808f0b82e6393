"""A small calibrated detector on synthetic data for the web-app tests (tiny random CLIP, liven_head)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import torch

CLS = "brick_syn"


def make_detector(work: Path, winmode: str = "mul") -> SimpleNamespace:
    """Fit and calibrate a detector on one synthetic class; returns paths (detector, data, images, defects)."""
    import open_clip

    from fdsl.config import ModelConfig
    from fdsl.core.backbone import register_model_configs
    from fdsl.core.model import FDSL
    from fdsl.data.shots import load_reference_images
    from fdsl.data.synthetic import liven_head, make_synthetic_dataset
    from fdsl.engine.checkpoint import save_checkpoint
    from fdsl.inspect.detector import Detector

    root = make_synthetic_dataset(work / "data", classes=(CLS,), n_train=3, n_test_good=3, n_test_bad=4,
                                  image_size=96, seed=1)
    register_model_configs()
    torch.manual_seed(0)
    weights = work / "tiny_clip.pt"
    torch.save(open_clip.create_model("FDSL-Tiny-ViT").state_dict(), weights)
    mcfg = ModelConfig(model="FDSL-Tiny-ViT", pretrained=str(weights), image_size=112, features_list=[1, 2, 3, 4],
                       few_shot_features=[1, 2, 3, 4], winmode=winmode, win_size=4, win_stride=2)
    torch.manual_seed(3)
    model = FDSL.from_config(mcfg).eval()
    train = sorted(f"{CLS}/train/good/{p.name}" for p in (root / CLS / "train" / "good").glob("*.png"))
    test = sorted(str(p.relative_to(root)) for p in (root / CLS / "test").rglob("*.png"))
    liven_head(model, load_reference_images(root, train[:2], 112), load_reference_images(root, test, 112))
    checkpoint = work / "ck" / "epoch_1.pth"
    save_checkpoint(checkpoint, model.head, dataclasses.asdict(mcfg), epoch=1)
    det = Detector.fit(checkpoint, root / CLS / "train" / "good", device="cpu", precision="fp32")
    defects = sorted(d for d in (root / CLS / "test").iterdir() if d.name != "good")
    det.calibrate(root / CLS / "test" / "good", defects, masks=root / CLS / "ground_truth")
    path = det.save(work / "part.fdsl")
    bad = sorted(p for d in defects for p in d.glob("*.png"))
    good = sorted((root / CLS / "test" / "good").glob("*.png"))
    return SimpleNamespace(path=path, det=det, root=root, cls_dir=root / CLS, good=good, bad=bad,
                           train=sorted((root / CLS / "train" / "good").glob("*.png")), checkpoint=checkpoint)
