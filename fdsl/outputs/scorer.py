"""The scorer protocol: what `FolderRun` (and `fdsl serve`) need of a detector, torch or exported.

`fdsl.inspect.detector.Detector` (PyTorch) and `fdsl.deploy.inferencer.ExportedDetector` (OpenVINO or
onnxruntime) both implement it; the folder run never asks which one it holds.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from fdsl.outputs.verdicts import Prediction


@runtime_checkable
class Scorer(Protocol):
    """A fitted detector that turns a batch of RGB images into verdicts.

    info: the detector's metadata (``fdsl_version``, ``normal_images`` when it has them, ...).
    image_threshold / pixel_threshold: the calibrated thresholds (None before calibration).
    cal_image_size: side of the evaluation-size anomaly map (Prediction.anomaly_map is (cal, cal)).
    """

    info: dict[str, Any]

    @property
    def image_threshold(self) -> float | None: ...

    @property
    def pixel_threshold(self) -> float | None: ...

    @property
    def cal_image_size(self) -> int: ...

    def score_images(self, images: Sequence[Image.Image], threshold: float | None = None,
                     cal_image_size: int | None = None) -> list[Prediction]:
        """One `Prediction` per image of one batch, in order."""
        ...

    def numerics(self) -> dict[str, str]:
        """The resolved settings that move scores (dtypes, or the exported runtime and precision): rows scored
        with other ones are not reused by a resume."""
        ...
