"""The process-wide OpenVINO Core, shared by the torch backend (`fdsl.core.backends`), int8 export and the
torch-free inferencer (`fdsl.deploy`). It sits on the base floor so that each of them imports it downwards."""
from __future__ import annotations

_CORE: list = []  # the process's one OpenVINO Core, created on first use and never destroyed


def openvino_core():
    """The process-wide `openvino.Core`. Compiled models are freed by Python's garbage collector in any order;
    with one Core that outlives them all, no compiled model is ever destroyed after the Core that made it."""
    if not _CORE:
        import openvino as ov

        _CORE.append(ov.Core())
    return _CORE[0]
