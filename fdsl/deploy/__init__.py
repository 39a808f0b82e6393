"""Run an exported detector (`fdsl export`) without PyTorch, open_clip or OpenCV.

    from fdsl.deploy import load_exported
    det = load_exported("part_openvino/")          # OpenVINO (model.xml) or onnxruntime (model.onnx)
    pred = det.predict(["incoming/a.png"])[0]      # score, is_anomalous, anomaly_map, mask, ...

    python -m fdsl.deploy --model part_openvino/ --images incoming/ --out verdicts/

Needs only NumPy, Pillow and one runtime (``pip install 'fdsl[openvino]'`` or ``'fdsl[onnx]'``); installing
the package with ``--no-deps`` is enough. Nothing here imports torch.
"""
from fdsl.deploy.inferencer import ExportedDetector, Prediction, load_exported
from fdsl.outputs.contract import CONTRACT

__all__ = ["CONTRACT", "ExportedDetector", "Prediction", "load_exported"]
