"""Helpers shared by several test modules (and the benchmarks, which import them as ``tests.fdsl_test_utils``).

Test-only code lives here, not in the library: random-weight heads with visible maps (`liven_head`), a
memory fitted in one call (`fit_memory`), the global branch's per-layer maps (`global_maps`) and the cost
model of the image-index bank (`entries_scanned`).
"""
import dataclasses

import torch

from fdsl.config import ModelConfig, RuntimeConfig
from fdsl.core.memory import FDSLMemory, MemoryBank
from fdsl.core.model import FDSL
from fdsl.core.runtime import resolve_runtime

_RUNTIME_FIELDS = {f.name for f in dataclasses.fields(RuntimeConfig)}


def tiny_lfe_settings(weights, layers=(2, 4), **overrides) -> dict:
    """Flat settings of the tiny CLIP at 112 px (8×8 grid) with LFE `mul` 4/2, from a weights file."""
    kw = dict(model="FDSL-Tiny-ViT", pretrained=str(weights), image_size=112, features_list=list(layers),
              few_shot_features=list(layers), winmode="mul", win_size=4, win_stride=2)
    kw.update(overrides)
    return kw


def build_model(**settings) -> FDSL:
    """An FDSL model from flat command-line-style settings: method ones to ModelConfig, runtime ones
    (win_batch, bank_dtype, align_chunk_mb, precision) resolved on the CPU as a run would."""
    runtime = {k: settings.pop(k) for k in list(settings) if k in _RUNTIME_FIELDS}
    return FDSL.from_config(ModelConfig(**settings), resolve_runtime(RuntimeConfig(device="cpu", **runtime),
                                                                     torch.device("cpu")))


# ---------------------------------------------------------------------------- the model, by hand
@torch.no_grad()
def fit_memory(model: FDSL, ref_images: torch.Tensor) -> FDSLMemory:
    """The memory of (k, 3, S, S) normal reference images (both banks when the model's LFE is on)."""
    return model.make_memory(model.encode_references(ref_images))


def global_maps(model: FDSL, feats, memory: FDSLMemory) -> list:
    """Per-layer (B, G, G) anomalous maps of the global branch (NAM-refined when NAM is on)."""
    return model.anomalous_maps(model.head.raw(model.residuals(memory.global_bank, feats)))


def entries_scanned(bank: MemoryBank, use_index: bool) -> int:
    """Bank entries one query token is compared with: K·N densely, K embeddings + N with the image index."""
    return bank.k + bank.tokens_per_item if use_index else bank.k * bank.tokens_per_item


def liven_head(model, refs, calib):
    """Give an untrained head data-driven BN statistics and larger logits, so its maps vary visibly.

    A freshly initialised scorer outputs ~0.5 everywhere, which would make map comparisons weak.
    The BN statistics are the cumulative average over one global and one window pass of `calib`
    against a memory of `refs` (both branches, whatever the winmode; the global one for a CNN). For tests
    and benchmarks on random weights; `model` is an `fdsl.core.model.FDSL`, `refs` and `calib` are (n, 3, S, S) images.
    Returns `model`. A fused head (``--scorer fused``) has its learned part livened.
    """
    import torch  # torch is imported lazily: the data generators above do not need it

    windows = bool(getattr(model.backbone, "supports_windows", True))  # a CNN backbone has the global branch only
    with torch.no_grad():
        mem = model.make_memory(model.encode_references(refs, windows=windows))
        bns = [m for m in model.head.modules() if isinstance(m, torch.nn.BatchNorm1d)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration passes
        model.head.train()
        model.head(model.residuals(mem.global_bank, model.extract(calib)))
        if windows:
            model.head(model.residuals(mem.window_bank, model.extract_windows(calib)))
        model.head.eval()
        for bn in bns:
            bn.momentum = 0.1
        learned = getattr(model.head, "learned", model.head)  # --scorer fused: the FDSLHead inside the FusedHead
        for scorer in learned.scorers:
            scorer.proj[9].weight.mul_(5.0)
        learned.nam.conv2.weight.mul_(3.0)
    return model


# ---------------------------------------------------------------------------- tiny command-line runs
TINY_MODEL_ARGS = ["--model", "FDSL-Tiny-ViT", "--pretrained", "none", "--image_size", "56",
                   "--features_list", "1", "2", "--few_shot_features", "1", "2", "--device", "cpu"]


def tiny_model_config(**overrides):
    """The ModelConfig that TINY_MODEL_ARGS parse into (plus `overrides`)."""
    from fdsl.config import ModelConfig

    kw = dict(model="FDSL-Tiny-ViT", pretrained="none", image_size=56, features_list=[1, 2],
              few_shot_features=[1, 2])
    kw.update(overrides)
    return ModelConfig(**kw)


def save_tiny_checkpoint(path, seed: int = 0, **overrides):
    """An untrained FDSL checkpoint of the tiny model (our format, with its model config); returns the path."""
    from fdsl.config import config_to_dict
    from fdsl.core.backbone import register_model_configs
    from fdsl.engine.checkpoint import save_checkpoint

    register_model_configs()
    mcfg = tiny_model_config(**overrides)
    torch.manual_seed(seed)
    head = FDSL.from_config(mcfg).head
    save_checkpoint(path, head, config_to_dict(mcfg), epoch=1)
    return path


def tiny_data(root, classes=("carpet_syn",), n_train=2, n_test_good=2, n_test_bad=2):
    """A small synthetic MVTec-layout dataset (64 px images) with meta.json."""
    from fdsl.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(root, classes=classes, n_train=n_train, n_test_good=n_test_good,
                                  n_test_bad=n_test_bad, image_size=64, seed=0)


def tiny_test_argv(data, checkpoint, save_path, *extra):
    """test.py arguments for a tiny 1-shot run."""
    return [*TINY_MODEL_ARGS, "--data_path", str(data), "--checkpoint_path", str(checkpoint),
            "--save_path", str(save_path), "--k_shot", "1", "--batch_size", "2", "--num_workers", "0",
            "--cal_image_size", "32", *map(str, extra)]


def drop_fdsl_log_handlers() -> None:
    """Remove the console/file handlers `fdsl.utils.setup_logging` added (they hold a test's captured stream)."""
    import logging

    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_fdsl", False):
            root.removeHandler(h)
            h.close()


# ---------------------------------------------------------------------------- a calibrated detector
def make_calibrated_detector(work, winmode: str = "mul"):
    """Fit (3 shots) and calibrate (F1-max with masks on 3 good + 4 defect test images) a detector on one
    synthetic class with the tiny random CLIP and a livened head; returns a namespace of paths and the detector."""
    import dataclasses
    from types import SimpleNamespace

    import open_clip

    from fdsl.config import ModelConfig
    from fdsl.core.backbone import register_model_configs
    from fdsl.core.model import FDSL
    from fdsl.data.shots import load_reference_images
    from fdsl.data.synthetic import make_synthetic_dataset
    from fdsl.engine.checkpoint import save_checkpoint
    from fdsl.inspect.detector import Detector

    root = make_synthetic_dataset(work / "data", classes=("brick_syn",), n_train=3, n_test_good=3, n_test_bad=4,
                                  image_size=96, seed=1)
    register_model_configs()
    torch.manual_seed(0)
    weights = work / "tiny_clip.pt"
    torch.save(open_clip.create_model("FDSL-Tiny-ViT").state_dict(), weights)
    mcfg = ModelConfig(model="FDSL-Tiny-ViT", pretrained=str(weights), image_size=112, features_list=[1, 2, 3, 4],
                       few_shot_features=[1, 2, 3, 4], winmode=winmode, win_size=4, win_stride=2)
    torch.manual_seed(3)
    model = FDSL.from_config(mcfg).eval()
    train = sorted(f"brick_syn/train/good/{p.name}" for p in (root / "brick_syn" / "train" / "good").glob("*.png"))
    test = sorted(str(p.relative_to(root)) for p in (root / "brick_syn" / "test").rglob("*.png"))
    liven_head(model, load_reference_images(root, train[:2], 112), load_reference_images(root, test, 112))
    checkpoint = work / "ck" / "epoch_1.pth"
    save_checkpoint(checkpoint, model.head, dataclasses.asdict(mcfg), epoch=1)
    det = Detector.fit(checkpoint, root / "brick_syn" / "train" / "good", runtime="cpu")
    defects = sorted(d for d in (root / "brick_syn" / "test").iterdir() if d.name != "good")
    det.calibrate(root / "brick_syn" / "test" / "good", defects, masks=root / "brick_syn" / "ground_truth")
    path = det.save(work / "part.fdsl")
    bad = sorted(p for d in defects for p in d.glob("*.png"))
    good = sorted((root / "brick_syn" / "test" / "good").glob("*.png"))
    return SimpleNamespace(path=path, det=det, root=root, cls_dir=root / "brick_syn", good=good, bad=bad,
                           train=sorted((root / "brick_syn" / "train" / "good").glob("*.png")), checkpoint=checkpoint)


def small_calibrated_part(work, cls: str = "carpet_syn"):
    """A tiny detector fitted on 2 good images of one synthetic class and calibrated (max FPR 0.5) on its test
    split, saved as ``work/part.fdsl``: a namespace of work, root, ck, det, path and the good and bad test images."""
    from types import SimpleNamespace

    from fdsl.inspect.detector import Detector

    root = tiny_data(work / "data", classes=(cls,), n_train=2, n_test_good=2, n_test_bad=2)
    ck = save_tiny_checkpoint(work / "ck" / "epoch_1.pth", seed=1)
    det = Detector.fit(ck, root / cls / "train" / "good", runtime="cpu", cal_image_size=32)
    defects = [d for d in (root / cls / "test").iterdir() if d.name != "good"]
    det.calibrate(root / cls / "test" / "good", defects, max_fpr=0.5)
    path = det.save(work / "part.fdsl")
    good = sorted((root / cls / "test" / "good").glob("*.png"))
    bad = sorted(p for d in defects for p in d.glob("*.png"))
    return SimpleNamespace(work=work, root=root, ck=ck, det=det, path=path, good=good, bad=bad)
