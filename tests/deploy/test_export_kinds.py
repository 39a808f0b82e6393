"""`fdsl export` for every kind of detector: CLIP and timm backbones (CNN, ViT), --scorer fdsl, nn and fused, with
and without LFE and the image index, any k; the exported outputs equal `fdsl predict`'s to 1e-5 (fp32)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from deploy_fixtures import build_lite0_detector
from fdsl_test_utils import liven_head

TOL = 1e-5
TINY_VIT = {"depth": 3, "embed_dim": 32, "num_heads": 2}  # a tiny timm VisionTransformer (random weights)
VIT = "timm:vit_tiny_patch16_224"
LITE0 = "timm:tf_efficientnet_lite0"


def _model(kind: str, tiny_weights, **settings):
    """An `FDSL` model of one backbone kind (random weights), eval mode."""
    from fdsl.config import ModelConfig
    from fdsl.core.model import FDSL
    from fdsl.core.timm_backbone import TimmBackbone

    model, size, layers = {"clip": ("FDSL-Tiny-ViT", 112, [2, 4]), "vit": (VIT, 96, [1, 3]),
                           "cnn": (LITE0, 64, [3, 4])}[kind]
    pretrained = str(tiny_weights) if kind == "clip" else "none"
    cfg = ModelConfig(model=model, pretrained=pretrained, image_size=size, features_list=layers,
                      few_shot_features=layers, **settings)
    torch.manual_seed(0)
    if kind == "clip":
        return FDSL.from_config(cfg).eval()
    bb = TimmBackbone(model, "none", size, layers, model_kwargs=TINY_VIT if kind == "vit" else None)
    return FDSL(bb, cfg).eval()


def _detector(model, k: int, seed: int = 0):
    """A `Detector` of `model` on k random normal images, with made-up thresholds; and 5 query images."""
    from fdsl.inspect.detector import Detector

    S = int(model.cfg.image_size)
    g = torch.Generator().manual_seed(seed)
    refs, x = torch.rand(k, 3, S, S, generator=g), torch.rand(5, 3, S, S, generator=g)
    if model.cfg.scorer in ("fdsl", "fused"):
        liven_head(model, refs, x)  # data-driven BN statistics: an untrained head scores all images alike
    memory = model.make_memory(model.encode_references(refs))
    info = {"cal_image_size": 48, "thresholds": {"image": 0.5, "pixel": 0.5}, "model_config": {}}
    return Detector(model, memory, info), x


KINDS = [
    ("clip", 1, dict(scorer="nn")),
    ("clip", 2, dict(scorer="nn", winmode="mul", win_size=4, win_stride=2, use_img_idx=True)),
    ("clip", 3, dict(scorer="fdsl", winmode="onlywin", win_size=4, win_stride=2, align_mode="diff2")),
    ("vit", 1, dict(scorer="nn", winmode="mul", win_size=3, win_stride=1)),
    ("vit", 3, dict(scorer="nn", align_mode="diff2", use_img_idx=True)),
    ("vit", 2, dict(scorer="fdsl", winmode="mul", win_size=4, win_stride=2, use_nam=False)),
    ("cnn", 1, dict(scorer="nn")),
    ("cnn", 3, dict(scorer="nn", use_img_idx=True, align_mode="diff2")),
    ("cnn", 2, dict(scorer="fdsl", use_abs=False)),
    # --scorer fused: per layer w·d + (1 − w)·p, w baked into the graph (not the default 0.5, so a graph that
    # ignored the weight, or merged before NAM, would show)
    ("clip", 2, dict(scorer="fused", fuse_weight=0.3, win_size=4, win_stride=2)),  # (windows: liven_head only)
    ("clip", 2, dict(scorer="fused", fuse_weight=0.6, winmode="mul", win_size=4, win_stride=2, use_img_idx=True)),
    ("clip", 1, dict(scorer="fused", fuse_weight=0.8, winmode="onlywin", win_size=4, win_stride=2,
                     align_mode="diff2")),
    ("vit", 2, dict(scorer="fused", fuse_weight=0.4, winmode="mul", win_size=3, win_stride=1, use_nam=False)),
    ("vit", 3, dict(scorer="fused", fuse_weight=0.7, align_mode="diff2", use_img_idx=True, use_abs=False,
                    win_size=3, win_stride=1)),
    ("cnn", 2, dict(scorer="fused", fuse_weight=0.25, use_img_idx=True)),
    ("cnn", 1, dict(scorer="fused", fuse_weight=0.9, align_mode="diff2")),
]


@pytest.mark.parametrize("kind,k,settings", KINDS, ids=[f"{a}-k{b}-" + "-".join(f"{x}={y}" for x, y in c.items())
                                                       for a, b, c in KINDS])
def test_graph_equals_predict_for_every_kind(tiny_weights, kind, k, settings):
    """The export graph, run eagerly (what torch.export traces), equals `FDSL.predict` to 1e-5 for CLIP, timm
    ViT and timm CNN backbones, every scorer (fdsl, nn, fused), LFE on/off, the image index, diff2 and any k."""
    from fdsl.inspect.export import DetectorGraph

    model = _model(kind, tiny_weights, **settings)
    det, x = _detector(model, k)
    ref = model.predict(x, [det.memory], 48)[0]
    with torch.no_grad():
        amap, score, patch, mmax = DetectorGraph(model, det.memory, 48, chunk_mb=1)(x)  # 1 MiB: several chunks
    assert float(ref.pred_score.std()) > 1e-4, "scores should vary, or the comparison says little"
    for a, b in ((amap, ref.anomaly_map), (score, ref.pred_score), (patch, ref.patch_score), (mmax, ref.map_max)):
        assert a.shape == b.shape and float((a - b).abs().max()) < TOL
    if settings["scorer"] == "fused":  # the merge moves the map: another weight gives another graph output
        model.head.fuse_weight = 1.0 - settings["fuse_weight"]
        with torch.no_grad():
            other = DetectorGraph(model, det.memory, 48, chunk_mb=1)(x)[0]
        assert float((other - amap).abs().max()) > 1e-3


def _compare(det, folder, images) -> None:
    """`ExportedDetector.predict` of `folder` equals `det.predict` on `images` to 1e-5: scores, maps, verdicts."""
    from fdsl.deploy import load_exported

    ref = det.predict(images, batch_size=3)
    got = load_exported(folder).predict(images, batch_size=2)  # other batching on purpose
    assert np.std([p.score for p in ref]) > 1e-3
    np.testing.assert_allclose([p.score for p in got], [p.score for p in ref], rtol=0, atol=TOL)
    np.testing.assert_allclose([p.map_max for p in got], [p.map_max for p in ref], rtol=0, atol=TOL)
    np.testing.assert_allclose(np.stack([p.anomaly_map for p in got]), np.stack([p.anomaly_map for p in ref]),
                               rtol=0, atol=TOL)
    assert [p.is_anomalous for p in got] == [p.is_anomalous for p in ref]


def test_lite0_nn_detector_with_real_weights_exports(tmp_path):
    """The EfficientNet-Lite0 --scorer nn detector (real weights) exports to OpenVINO: `fdsl predict`'s scores
    and maps to 1e-5; the contract holds the backbone's ImageNet mean/std, its resize rule and the thresholds."""
    import json

    from fdsl.inspect.detector import Detector
    from fdsl.inspect.export import export_detector

    lite = build_lite0_detector(tmp_path)
    det = Detector.load(lite.path, runtime="cpu")
    folder = export_detector(det, tmp_path / "lite0_ov", "openvino")
    c = json.loads((folder / "fdsl_export.json").read_text())
    pre = det.model.backbone.preprocess
    assert c["preprocessing"]["mean"] == list(pre.mean) and c["preprocessing"]["resample"] == pre.interpolation
    assert c["scorer"] == "nn" and c["thresholds"]["image"] == det.image_threshold is not None
    # a calibrated detector's calibration digests travel (and the contract's reader admits them)
    assert c["thresholds"]["calibration_images"] == det.info["thresholds"]["calibration_images"] != []
    _compare(det, folder, lite.images)


def test_timm_vit_lfe_nn_detector_exports_to_openvino_and_onnx(tiny_weights, tmp_path):
    """A timm ViT with LFE windows (two positional grids) exports to both formats; no resampling op is left."""
    import openvino as ov
    from PIL import Image

    from fdsl.inspect.export import export_detector

    model = _model("vit", tiny_weights, scorer="nn", winmode="mul", win_size=3, win_stride=1)
    det, _ = _detector(model, 2)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (90 + 7 * i, 100, 3), dtype=np.uint8)) for i in range(4)]
    for fmt in ("openvino", "onnx"):
        folder = export_detector(det, tmp_path / fmt, fmt)
        _compare(det, folder, images)
    ops = {o.get_type_name() for o in ov.Core().read_model(str(tmp_path / "openvino" / "model.xml")).get_ops()}
    interp = [o for o in ov.Core().read_model(str(tmp_path / "openvino" / "model.xml")).get_ops()
              if o.get_type_name() == "Interpolate"]
    assert "Interpolate" in ops and all(o.get_attributes().get("mode") != "cubic" for o in interp), \
        "only the bilinear map upsampling may interpolate: the positional tables are constants"


def test_fused_detector_exports_to_openvino_with_its_stored_weight(tiny_weights, tmp_path):
    """A --scorer fused detector (tiny CLIP, LFE windows, the image index) fitted with a head file that stores
    its fuse weight, saved and loaded as `fdsl predict --detector` does, exports to OpenVINO: the graph merges
    with the stored weight (0.7, not the default 0.5), the contract says ``fused`` and the weight, and the
    exported outputs equal `Detector.predict`'s to 1e-5."""
    import dataclasses
    import json

    from PIL import Image

    from fdsl.engine.checkpoint import save_head_file
    from fdsl.inspect.detector import Detector
    from fdsl.inspect.export import export_detector

    options = dict(winmode="mul", win_size=4, win_stride=2, use_img_idx=True)
    model = _model("clip", tiny_weights, scorer="fdsl", **options)
    g = torch.Generator().manual_seed(1)
    liven_head(model, torch.rand(2, 3, 112, 112, generator=g), torch.rand(4, 3, 112, 112, generator=g))
    head = tmp_path / "head.safetensors"
    save_head_file(head, model.head, dataclasses.asdict(model.cfg), {"fuse_weight": 0.7})
    rng = np.random.default_rng(0)
    normal = tmp_path / "normal"
    normal.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (100, 100 + 9 * i, 3), dtype=np.uint8)).save(normal / f"{i}.png")
    fitted = Detector.fit(head, normal, runtime="cpu", cal_image_size=48, scorer="fused", **options)
    det = Detector.load(fitted.save(tmp_path / "fused.fdsl"), runtime="cpu")
    assert det.model.head.fuse_weight == 0.7
    folder = export_detector(det, tmp_path / "fused_ov", "openvino")
    c = json.loads((folder / "fdsl_export.json").read_text())
    assert c["scorer"] == "fused" and c["fuse_weight"] == 0.7
    images = [Image.fromarray(rng.integers(0, 255, (90 + 7 * i, 100, 3), dtype=np.uint8)) for i in range(4)]
    _compare(det, folder, images)
