"""Run configuration: one dataclass field per setting, argparse flags generated from the fields.

Every field carries its flag names (the released code's spellings are kept as aliases),
its help text and, where it has one, its set of allowed values. The command line maps
one-to-one onto the fields: an unknown flag is an error, never silently swallowed.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Union

from fdsl.errors import ConfigError

WINMODES = ("nan", "mul", "onlywin")
ALIGN_MODES = ("mulmax", "diff2")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ALIGN_PRECISIONS = ("fp32", "fp16", "bf16")
BANK_DTYPES = ("auto", "fp32", "fp16")
DATASETS = ("mvtec", "visa")
# Options that name files or folders: a leading ~ is expanded (the shell does not expand --opt=~/x).
PATH_FIELDS = ("save_path", "train_data_path", "data_path", "checkpoint_path", "k_shot_file", "model_config",
               "pretrained")

log = logging.getLogger(__name__)


def _opt(default: Any, *flags: str, help: str, choices: Optional[Sequence[Any]] = None, nargs: Optional[str] = None):
    """A dataclass field that knows its command-line flags."""
    meta = {"flags": flags, "help": help, "choices": choices, "nargs": nargs}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def parse_bool(value: str) -> bool:
    """Parse the released code's 0/1 switches (and true/false, yes/no)."""
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0/1 (or true/false), got {value!r}")


@dataclass
class ModelConfig:
    """Which backbone, which layers and which FDSL components. Saved with every checkpoint."""

    model: str = _opt("ViT-L-14-336", "--model", help="open_clip architecture name")
    pretrained: str = _opt(
        "openai", "--pretrained",
        help="CLIP weights: a pretrained tag (openai), a local weights file, or 'none' (random init; tests only)")
    model_config: Optional[str] = _opt(
        None, "--model_config", help="extra open_clip model-config JSON (file or folder) to register before building")
    image_size: int = _opt(518, "--image_size", help="input size S; the patch grid is S / patch size")
    features_list: list = _opt(
        [6, 12, 18, 24], "--features_list", nargs="+",
        help="1-based transformer blocks whose residual tokens are scored")
    few_shot_features: list = _opt(
        [6, 12, 18, 24], "--few_shot_features", nargs="+",
        help="1-based blocks stored in the memory bank; must equal --features_list")
    quick_gelu: bool = _opt(
        False, "--quick_gelu",
        help="use CLIP's native QuickGELU (default GELU, as the released code and the paper's numbers)")
    use_norm: bool = _opt(True, "--use_norm", "--useNorm", help="L2-normalise every token over its channels")
    align_mode: str = _opt("mulmax", "--align_mode", "--alignMode", choices=ALIGN_MODES,
                           help="nearest-normal search: mulmax (max dot product) or diff2 (min L2 distance)")
    use_abs: bool = _opt(True, "--use_abs", help="residual |f - f_hat| (default) instead of f - f_hat")
    use_nam: bool = _opt(True, "--use_nam", "--useNAM", "--useConvRes",
                         help="refine per-layer prob maps with the neighbour-aggregation conv (NAM)")
    winmode: str = _opt("nan", "--winmode", choices=WINMODES,
                        help="local branch (LFE): nan (off), mul (blend with global), onlywin")
    win_size: int = _opt(13, "--win_size", "--winsize", help="LFE window side, in patches")
    win_stride: int = _opt(2, "--win_stride", "--winstride", help="LFE window stride, in patches")
    win_weight: float = _opt(0.5, "--win_weight", "--winwight", help="LFE blend weight w in (1-w)*global + w*window")
    use_img_idx: bool = _opt(False, "--use_img_idx", "--useImgIdx",
                             help="image-feature index memory bank (align against the most similar reference only)")

    def validate(self) -> None:
        """Reject invalid or not-yet-supported combinations with a clear message."""
        expand_user_paths(self)
        if sorted(self.features_list) != sorted(self.few_shot_features):
            raise ConfigError(
                f"--features_list {self.features_list} and --few_shot_features {self.few_shot_features} differ; "
                "FDSL aligns and scores the same layers, so give both the same list")
        if (len(set(self.features_list)) != len(self.features_list) or min(self.features_list) < 1
                or list(self.features_list) != sorted(self.features_list)):
            raise ConfigError("--features_list must hold distinct 1-based block numbers in increasing order, "
                              f"got {self.features_list}")
        if self.image_size < 1:
            raise ConfigError(f"--image_size must be positive, got {self.image_size}")
        if self.win_size < 1 or self.win_stride < 1:
            raise ConfigError(f"--win_size {self.win_size} and --win_stride {self.win_stride} must be positive")
        if not 0.0 <= self.win_weight <= 1.0:
            raise ConfigError(f"--win_weight must lie in [0, 1], got {self.win_weight}")


@dataclass
class RuntimeConfig:
    """How the model runs: device, precision and memory bounds. None of these changes the method."""

    device: str = _opt("auto", "--device", help="cpu, a CUDA index (0) or cuda:N; auto picks cuda:0 when present")
    precision: str = _opt("auto", "--precision", choices=PRECISIONS,
                          help="backbone autocast dtype: auto = fp32 on every device (the released code's numbers); "
                               "bf16 and fp16 are opt-in. Alignment stays fp32 (see --align_precision)")
    align_precision: str = _opt("fp32", "--align_precision", choices=ALIGN_PRECISIONS,
                                help="dtype of the window (LFE) branch's similarity and argmax; fp16 is what the "
                                     "released code does on GPU (faster, can flip near-tie matches). The global "
                                     "branch always aligns in fp32")
    win_batch: int = _opt(16, "--win_batch", help="how many windows are encoded by the backbone at once")
    bank_dtype: str = _opt("auto", "--bank_dtype", choices=BANK_DTYPES,
                           help="memory bank storage dtype (auto: fp32 for the global bank; the window bank "
                                "in the --align_precision dtype)")
    align_chunk_mb: int = _opt(64, "--align_chunk_mb",
                               help="bound, in MiB, on the similarity block computed at once during alignment")

    def validate(self) -> None:
        """Reject non-positive memory bounds."""
        if self.win_batch < 1:
            raise ConfigError(f"--win_batch must be positive, got {self.win_batch}")
        if self.align_chunk_mb < 1:
            raise ConfigError(f"--align_chunk_mb must be positive, got {self.align_chunk_mb}")


@dataclass
class RunConfig:
    """Settings shared by training and evaluation runs."""

    dataset: str = _opt("mvtec", "--dataset", choices=DATASETS, help="dataset layout of --data_path")
    save_path: str = _opt("./results", "--save_path", help="run folder: checkpoints, logs, results")
    batch_size: int = _opt(8, "--batch_size", help="images per batch")
    num_workers: int = _opt(2, "--num_workers", help="data-loading worker processes")
    seed: int = _opt(111, "--seed", help="random seed (reference-image choice, augmentations)")
    classes: Optional[list] = _opt(None, "--classes", nargs="+", help="restrict to these classes (default: all)")

    def validate(self) -> None:
        """Check the shared run options; repeated --classes are dropped (keeping order) with a warning."""
        expand_user_paths(self)
        if self.batch_size < 1:
            raise ConfigError(f"--batch_size must be positive, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"--num_workers must be >= 0, got {self.num_workers}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")
        if not str(self.save_path).strip():
            raise ConfigError("--save_path is empty; give a run folder")
        if self.classes is not None:
            self.classes = dedupe_option("--classes", self.classes)


@dataclass
class TrainConfig(ModelConfig, RuntimeConfig, RunConfig):
    """`train.py`: fit the scorers and NAM on a dataset's test split (cross-dataset protocol)."""

    train_data_path: str = _opt("data/visa", "--train_data_path", "--data_path",
                                help="root of the training dataset (holding meta.json)")
    epoch: int = _opt(5, "--epoch", "--epochs", help="number of training epochs")
    learning_rate: float = _opt(1e-3, "--learning_rate", "--lr", help="Adam learning rate")
    save_freq: int = _opt(1, "--save_freq", help="save a checkpoint every this many epochs")
    k_shot: int = _opt(10, "--k_shot", help="reference images per class in the training memory bank")
    augment: str = _opt("auto", "--augment", choices=("auto", "none", "mvtec", "visa"),
                        help="training augmentation; auto follows --dataset (MVTec mosaic / VisA crops)")
    resume: bool = _opt(True, "--resume", help="continue from the newest checkpoint in --save_path when present")

    def validate(self) -> None:
        ModelConfig.validate(self)
        RuntimeConfig.validate(self)
        RunConfig.validate(self)
        for name in ("epoch", "save_freq", "k_shot"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(f"--learning_rate must be a positive finite number, got {self.learning_rate}")


@dataclass
class TestConfig(ModelConfig, RuntimeConfig, RunConfig):
    """`test.py`: k-shot evaluation of a trained checkpoint, per class."""

    data_path: str = _opt("data/mvtec", "--data_path", help="root of the test dataset (holding meta.json)")
    checkpoint_path: str = _opt("", "--checkpoint_path", help="trained weights: ours or the released code's")
    k_shot: Union[int, List[int]] = _opt(
        1, "--k_shot", "--kshot", nargs="+",
        help="normal reference images per class; several values (1 2 4) run the paper's protocol in one pass: "
             "test features computed once, shots nested per seed, a summary table over shots and seeds")
    k_shot_file: Optional[str] = _opt(None, "--k_shot_file",
                                      help="reuse reference images listed in this file (ours or the released code's)")
    seeds: Optional[list] = _opt(None, "--seeds", nargs="+",
                                 help="several seeds in one pass (test features computed once); overrides --seed")
    cal_image_size: int = _opt(240, "--cal_image_size", "--calImage_size",
                               help="evaluation resolution of anomaly maps and masks")
    save_images: bool = _opt(False, "--save_images", help="write a side-by-side PNG per test image")
    aupro: bool = _opt(True, "--aupro", help="compute AUPRO (exact)")

    def __post_init__(self) -> None:
        # One value (the command line gives a list) is today's single-k run: stored as a plain int.
        if isinstance(self.k_shot, (list, tuple)) and len(self.k_shot) == 1:
            self.k_shot = self.k_shot[0]
        elif isinstance(self.k_shot, tuple):
            self.k_shot = list(self.k_shot)

    def validate(self) -> None:
        ModelConfig.validate(self)
        RuntimeConfig.validate(self)
        RunConfig.validate(self)
        if not self.checkpoint_path:
            raise ConfigError("--checkpoint_path is required: a checkpoint written by train.py or the released code")
        shots = self.k_shot if isinstance(self.k_shot, list) else [self.k_shot]
        if not shots or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in shots):
            raise ConfigError(f"--k_shot must be one or more positive integers, got {self.k_shot}")
        if len(set(shots)) != len(shots):
            raise ConfigError(f"--k_shot lists a value twice: {self.k_shot}")
        if self.cal_image_size < 1:
            raise ConfigError(f"--cal_image_size must be positive, got {self.cal_image_size}")
        if self.seeds is not None:
            if not self.seeds:
                raise ConfigError("--seeds needs at least one seed")
            bad = [s for s in self.seeds if s < 0]
            if bad:
                raise ConfigError(f"--seeds must be >= 0, got {bad}")
            self.seeds = dedupe_option("--seeds", self.seeds)
        if self.k_shot_file is not None and self.seeds is not None and len(self.seeds) > 1:
            raise ConfigError("--k_shot_file fixes the reference images, so several --seeds would give identical runs")

    def shot_list(self) -> List[int]:
        """The shot counts this run evaluates, ascending (one for a plain run)."""
        return sorted(self.k_shot) if isinstance(self.k_shot, list) else [self.k_shot]

    def run_seeds(self) -> list:
        """The seeds this run evaluates, in order."""
        return list(self.seeds) if self.seeds else [self.seed]


def field_type(f: dataclasses.Field):
    """The argparse `type` of a field, from its annotation (annotations are strings here)."""
    ann = str(f.type)
    if "bool" in ann:
        return parse_bool
    if "float" in ann:
        return float
    if "int" in ann:
        return int
    if f.name in ("features_list", "few_shot_features", "seeds", "k_shot"):
        return int
    return str


def build_parser(cls: type, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser whose flags map one-to-one onto the fields of the dataclass `cls`."""
    parser = argparse.ArgumentParser(description=description or cls.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     allow_abbrev=False)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        kwargs: dict = {"dest": f.name, "help": meta["help"], "type": field_type(f)}
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs["default"] = default
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("nargs"):
            kwargs["nargs"] = meta["nargs"]
        if kwargs["type"] is parse_bool:
            kwargs["metavar"] = "{0,1}"
        parser.add_argument(*meta["flags"], **kwargs)
    return parser


CONFIG_FLAG = "--config"


def read_config_file(cls: type, path: str) -> dict:
    """The settings of a saved run's ``config.json``, checked against the fields of `cls`.

    Every key must be a field of `cls` and every value must have the field's type (and lie in its choices);
    otherwise a `ConfigError` names the file, the key and the value.
    """
    import json

    try:
        with open(os.path.expanduser(path), encoding="utf-8") as fh:
            saved = json.load(fh)
    except OSError as exc:
        raise ConfigError(f"{CONFIG_FLAG} {path}: cannot read it ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{CONFIG_FLAG} {path} is not valid JSON ({exc})") from exc
    if not isinstance(saved, dict):
        raise ConfigError(f"{CONFIG_FLAG} {path} holds {type(saved).__name__}, not a JSON object of settings")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        raise ConfigError(f"{CONFIG_FLAG} {path} has settings this command does not take: {', '.join(unknown)} "
                          f"(is it another command's config.json? {cls.__name__} takes {', '.join(fields)})")
    for name, value in saved.items():
        _check_saved_value(fields[name], value, path)
    return saved


def _check_saved_value(f: dataclasses.Field, value: Any, path: str) -> None:
    """Raise `ConfigError` unless `value` (from a config.json) fits field `f`'s type and choices."""
    kind = field_type(f)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()

    def fits(v: Any) -> bool:
        if kind is parse_bool:
            return isinstance(v, bool)
        if kind is int:
            return isinstance(v, int) and not isinstance(v, bool)
        if kind is float:
            return isinstance(v, (int, float)) and not isinstance(v, bool)
        return isinstance(v, str)

    if value is None:
        ok = default is None
    elif f.metadata.get("nargs"):
        ok = (isinstance(value, list) and all(fits(v) for v in value)) or (f.name == "k_shot" and fits(value))
    else:
        ok = fits(value)
    choices = f.metadata.get("choices")
    if ok and choices and value is not None:
        ok = all(v in choices for v in (value if isinstance(value, list) else [value]))
    if not ok:
        raise ConfigError(f"{CONFIG_FLAG} {path}: {f.name} = {value!r} is not a valid value for "
                          f"{f.metadata['flags'][0]}")


def parse_config(cls: type, argv: Optional[Sequence[str]] = None, description: str = ""):
    """Parse `argv` into a validated `cls` instance. Unknown flags are errors.

    ``--config RUN/config.json`` starts from a saved run's settings (the file `RunContext.write_config` writes);
    options given on the command line override them. The names of the fields set on the command line are
    recorded on the instance (see `explicit_fields`); values read from ``--config`` count as defaults, so a
    checkpoint's recorded model settings still take precedence over them.
    """
    argv = list(sys.argv[1:] if argv is None else argv)

    def parser_with_config_flag() -> argparse.ArgumentParser:
        p = build_parser(cls, description)
        p.add_argument(CONFIG_FLAG, dest="config", metavar="CONFIG_JSON", default=None,
                       help="start from a saved run's config.json; options on the command line override it")
        return p

    parser = parser_with_config_flag()
    ns = vars(parser.parse_args(argv))
    if ns["config"] is not None:  # the saved settings become the defaults, and the command line is parsed again
        parser = parser_with_config_flag()
        parser.set_defaults(**read_config_file(cls, ns["config"]))
        ns = vars(parser.parse_args(argv))
    ns.pop("config")
    cfg = cls(**ns)
    # Parse again with every default suppressed: what remains was given explicitly (not from --config).
    bare = parser_with_config_flag()
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    given = vars(bare.parse_args(argv))
    given.pop("config", None)
    object.__setattr__(cfg, _EXPLICIT, frozenset(given))
    object.__setattr__(cfg, _ARGV, tuple(argv))
    cfg.validate()
    return cfg


_EXPLICIT = "_explicit_fields"  # an instance attribute, not a dataclass field: never in config.json
_ARGV = "_parsed_argv"  # likewise: the arguments `parse_config` parsed


def parsed_argv(cfg: Any) -> Optional[tuple]:
    """The command-line arguments `cfg` was parsed from (`parse_config`); None for a config built in code."""
    return getattr(cfg, _ARGV, None)


def explicit_fields(cfg: Any) -> frozenset:
    """Names of the fields the user set explicitly.

    Recorded by `parse_config`; for a config built in code, the fields whose value differs from the default.
    """
    recorded = getattr(cfg, _EXPLICIT, None)
    if recorded is not None:
        return recorded
    out = set()
    for f in dataclasses.fields(cfg):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if getattr(cfg, f.name) != default:
            out.add(f.name)
    return frozenset(out)


def expand_user_paths(cfg: Any) -> None:
    """Expand a leading ~ in every path option of `cfg` (in place)."""
    for name in PATH_FIELDS:
        value = getattr(cfg, name, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(cfg, name, os.path.expanduser(value))


def dedupe_option(flag: str, values: Sequence[Any]) -> list:
    """`values` without repeats, in order; a warning names the repeats."""
    out = list(dict.fromkeys(values))
    if len(out) != len(values):
        repeated = sorted({v for v in values if list(values).count(v) > 1}, key=list(values).index)
        log.warning("%s lists %s more than once; each is used once: %s", flag, repeated, out)
    return out


def config_to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def part_of(cfg: Any, cls: type):
    """The `cls` part (e.g. `ModelConfig`, `RuntimeConfig`) of a train or test config."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in names})


def model_config_from(cfg: Any) -> ModelConfig:
    """The `ModelConfig` part of a train or test config: the method's hyper-parameters."""
    return part_of(cfg, ModelConfig)
