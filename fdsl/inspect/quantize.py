"""`fdsl export --precision int8`: NNCF post-training quantisation of an exported graph, gated on anomaly metrics.

The fp32 OpenVINO model of `fdsl.inspect.export` is quantised by NNCF (``nncf.quantize``, 8-bit weights and
activations) with statistics from the calibration images: the normal images given (``--calib_normal``, e.g.
the detector's own normal images and held-out ones) and, when given, anomalous ones (``--calib_anomalous``,
with ``--calib_masks`` for pixel labels). The int8 model is then scored beside the fp32 one on the same images,
and written only when the gate holds:

- per-image score correlation (Pearson) with fp32 >= ``min_corr`` (default 0.99);
- with anomalous images: the change of image AUROC <= ``max_auroc_drop`` points (default 0.5), and with masks
  the change of pixel AUROC (at the maps' evaluation size) as well.

The measured figures go into the contract (``int8_gate``); a failed gate raises a one-line ConfigError that says
which figure missed and by how much, and nothing is written.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fdsl.errors import ConfigError

log = logging.getLogger(__name__)

MIN_CORR = 0.99
MAX_AUROC_DROP = 0.5  # points (percent)
NNCF_EXTRA = "pip install 'fdsl[openvino]' (openvino==2026.4.1, nncf==3.4.0)"


def calibration_batches(det, normal: Sequence, anomalous: Sequence, batch_size: int = 4) -> list[np.ndarray]:
    """The calibration images as preprocessed (b, 3, S, S) float32 batches (normal first), as `fdsl predict`
    preprocesses them (`fdsl.outputs.pixels.preprocess`, bit-identical to the torch path)."""
    from fdsl.data.rgb import load_rgb
    from fdsl.outputs.pixels import preprocess

    pre = det.model.backbone.preprocess
    S = int(det.model.cfg.image_size)
    paths = [p for p, _ in [*normal, *anomalous]]
    return [preprocess([load_rgb(p) for p in paths[s:s + batch_size]], S, pre.mean, pre.std, pre.interpolation)
            for s in range(0, len(paths), batch_size)]


def _run(model, batches: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(n,) scores and (n, cal, cal) maps of an `openvino.Model` compiled for the CPU in fp32 hint."""
    from fdsl.openvino_core import openvino_core

    compiled = openvino_core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    maps, scores = [], []
    for b in batches:
        out = compiled(b)
        maps.append(np.asarray(out[compiled.outputs[0]]))
        scores.append(np.asarray(out[compiled.outputs[1]]))
    return np.concatenate(scores).astype(np.float64), np.concatenate(maps)


def gate_figures(s32: np.ndarray, s8: np.ndarray, m32: np.ndarray, m8: np.ndarray, labels: np.ndarray | None,
                 pixel_labels: np.ndarray | None) -> dict:
    """The gate's figures: Pearson correlation of the scores, max |score drift|, and (with labels) the image
    and pixel AUROC of both models in percent and their changes."""
    from fdsl.metrics.metrics import auroc

    corr = float(np.corrcoef(s32, s8)[0, 1]) if np.std(s32) > 0 and np.std(s8) > 0 else float("nan")
    fig: dict = {"n_images": int(len(s32)), "score_correlation": corr,
                 "max_score_drift": float(np.abs(s32 - s8).max()), "max_map_drift": float(np.abs(m32 - m8).max())}
    if labels is not None and labels.any() and not labels.all():
        a32, a8 = 100 * auroc(labels, s32), 100 * auroc(labels, s8)
        fig.update(image_auroc_fp32=a32, image_auroc_int8=a8, image_auroc_change=a8 - a32)
    if pixel_labels is not None and pixel_labels.any():
        p32, p8 = 100 * auroc(pixel_labels.ravel(), m32.ravel()), 100 * auroc(pixel_labels.ravel(), m8.ravel())
        fig.update(pixel_auroc_fp32=p32, pixel_auroc_int8=p8, pixel_auroc_change=p8 - p32)
    return fig


def gate_failures(fig: dict, min_corr: float = MIN_CORR, max_auroc_drop: float = MAX_AUROC_DROP) -> list[str]:
    """The figures that miss the gate, each saying by how much (empty when the gate holds)."""
    bad = []
    corr = fig["score_correlation"]
    if not corr >= min_corr:  # NaN fails
        bad.append(f"score correlation with fp32 {corr:.4f} < {min_corr} (short by {min_corr - corr:.4f})")
    for key in ("image", "pixel"):
        change = fig.get(f"{key}_auroc_change")
        if change is not None and -change > max_auroc_drop:
            bad.append(f"{key} AUROC {fig[f'{key}_auroc_fp32']:.2f} -> {fig[f'{key}_auroc_int8']:.2f} "
                       f"(drop {-change:.2f} points > {max_auroc_drop})")
    return bad


def _pixel_labels(det, anomalous: Sequence, masks: str | None, n_normal: int) -> np.ndarray | None:
    """(n, cal, cal) bool ground truth at the evaluation size (normal images empty), or None without masks."""
    if masks is None:
        return None
    from PIL import Image

    from fdsl.data.images import load_mask
    from fdsl.outputs.files import find_mask

    cal = det.cal_image_size
    out = np.zeros((n_normal + len(anomalous), cal, cal), bool)
    for i, (p, name) in enumerate(anomalous, start=n_normal):
        with Image.open(p) as im:
            size = im.size
        m = load_mask(find_mask(Path(masks), name, p), size, image_path=p).resize((cal, cal), Image.Resampling.BILINEAR)
        out[i] = np.asarray(m, dtype=np.float32) / 255.0 > 0.5  # as mask_transform: bilinear, binarised at 0.5
    return out


# Element-wise and reduction ops stay fp32: the distances, probabilities, map upsampling and maxima after the
# backbone (with them quantised, the Lite0 detector's score correlation was 0.87; without, 0.99).
FP32_TYPES = ("Interpolate", "ReduceMax", "ReduceMean", "Multiply", "Add", "Subtract", "Divide")
_PASS_THROUGH = {"Transpose", "Convert", "Reshape", "Unsqueeze", "Squeeze", "Broadcast", "Gather", "Multiply",
                 "Concat", "Slice", "StridedSlice"}


def search_matmuls(model, shapes: set[tuple[int, ...]]) -> list[str]:
    """Names of the MatMul nodes of `model` that read one of the graph's stored constants (memory banks, image
    embeddings, stitching matrices: `shapes`, either orientation), through layout ops only.

    Those products are the nearest-normal search and the window stitching: kept in fp32, as quantising the
    similarity moves the argmax (measured on the Lite0 detector: score correlation 0.87 with them, see
    docs/deploy.md); the backbone's convolutions and linear layers are quantised.
    """
    wanted = shapes | {tuple(reversed(s)) for s in shapes}

    def reads_stored(node, depth: int = 0) -> bool:
        if node.get_type_name() == "Constant":
            return tuple(int(d) for d in node.get_output_shape(0)) in wanted
        if depth > 6 or node.get_type_name() not in _PASS_THROUGH:
            return False
        return any(reads_stored(i.get_source_output().get_node(), depth + 1) for i in node.inputs())

    return [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"
            and any(reads_stored(i.get_source_output().get_node()) for i in op.inputs())]


def quantize_int8(det, fp32_model, normal: str | Sequence[str], anomalous: str | Sequence[str] | None = None,
                  masks: str | None = None, min_corr: float = MIN_CORR,
                  max_auroc_drop: float = MAX_AUROC_DROP,
                  stored_shapes: set[tuple[int, ...]] | None = None) -> tuple[object, dict]:
    """Quantise `fp32_model` (the detector's exported `openvino.Model`) with NNCF and gate it.

    `stored_shapes`: shapes of the graph's own constants (banks, embeddings, stitching); the MatMuls reading
    them (`search_matmuls`) stay fp32.

    Returns (int8 `openvino.Model`, gate figures); raises ConfigError (one line, the figures that missed and by
    how much) when the gate fails.
    """
    try:
        import nncf
    except ImportError:
        raise ConfigError(f"--precision int8 needs NNCF: {NNCF_EXTRA}") from None
    from fdsl.outputs.files import list_images

    if normal is None:
        raise ConfigError("--precision int8 needs calibration images: --calib_normal DIR (the detector's normal "
                          "images and held-out normal ones), optionally --calib_anomalous DIR [--calib_masks DIR]")
    normal_files = list_images(normal, "--calib_normal images")
    bad_files = list_images(anomalous, "--calib_anomalous images") if anomalous is not None else []
    batches = calibration_batches(det, normal_files, bad_files)
    singles = [b[i:i + 1] for b in batches for i in range(b.shape[0])]  # NNCF collects statistics per sample
    transformer = bool(getattr(det.model.backbone, "is_vit", False) or hasattr(det.model.backbone, "visual"))
    log.info("int8: NNCF post-training quantisation on %d calibration image(s)%s", len(singles),
             " (transformer preset)" if transformer else "")
    ignored = search_matmuls(fp32_model, stored_shapes or set())
    scope = nncf.IgnoredScope(names=ignored, types=list(FP32_TYPES), validate=False)
    int8 = nncf.quantize(fp32_model, nncf.Dataset(singles), subset_size=len(singles),
                         model_type=nncf.ModelType.TRANSFORMER if transformer else None, ignored_scope=scope)
    s32, m32 = _run(fp32_model, batches)
    s8, m8 = _run(int8, batches)
    labels = np.r_[np.zeros(len(normal_files), bool), np.ones(len(bad_files), bool)] if bad_files else None
    fig = gate_figures(s32, s8, m32, m8, labels, _pixel_labels(det, bad_files, masks, len(normal_files)))
    fig.update(fp32_matmuls_kept=len(ignored), min_score_correlation=min_corr, max_auroc_drop_points=max_auroc_drop,
               n_normal=len(normal_files), n_anomalous=len(bad_files), masks=masks is not None)
    bad = gate_failures(fig, min_corr, max_auroc_drop)
    if bad:
        raise ConfigError("the int8 model fails the gate and is not written: " + "; ".join(bad)
                          + f" (on {len(s32)} calibration image(s)); keep fp32/fp16, or give more calibration images")
    log.info("int8 gate passed: score correlation %.4f%s", fig["score_correlation"],
             f", image AUROC change {fig['image_auroc_change']:+.2f} points" if "image_auroc_change" in fig else "")
    return int8, fig
