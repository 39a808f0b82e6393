"""Exported folders, hostile or damaged (issue 28): one schema for the contract, the model files pinned by
sha256 and checked against the contract on load, bad options refused; each one line, exit 2, nothing written."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from deploy_fixtures import build_detectors, reseal

from fdsl.errors import FDSLError


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The calibrated global detector and its OpenVINO export (made once)."""
    from fdsl.inspect.detector import Detector
    from fdsl.inspect.export import export_detector

    env = build_detectors(tmp_path_factory.mktemp("harden"), branches=("global",))
    env.folder = export_detector(Detector.load(env.detectors["global"], runtime="cpu"), env.work / "exp")
    return env


@pytest.fixture
def folder(env, tmp_path) -> Path:
    """A fresh copy of the export, for a test to damage."""
    return Path(shutil.copytree(env.folder, tmp_path / "model"))


def deploy(env, folder: Path, out: Path, capsys, *extra: str) -> tuple[int, str]:
    from fdsl.deploy.run import main

    rc = main(["--model", str(folder), "--images", str(env.test_dir), "--out", str(out), *extra])
    return rc, capsys.readouterr().err.strip()


def one_line_error(rc: int, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    return lines[0]


def edit(folder: Path, change) -> None:
    path = folder / "fdsl_export.json"
    info = json.loads(path.read_text())
    path.write_text(json.dumps(change(info)))


def _set(path: str, value):
    def change(info):
        *head, last = path.split(".")
        d = info
        for k in head:
            d = d[k]
        if value is KeyError:
            del d[last]
        else:
            d[last] = value
        return info
    return change


BAD_CONTRACTS = [  # (change, the field the error must name)
    (_set("thresholds.image", "0.5"), "thresholds.image"),
    (_set("thresholds.image", float("nan")), "thresholds.image"),  # every image silently normal before
    (_set("thresholds.pixel", float("nan")), "thresholds.pixel"),  # every mask a "top region" before
    (_set("thresholds.image", float("inf")), "thresholds.image"),
    (_set("thresholds", [1]), "thresholds"),
    (_set("preprocessing", KeyError), "preprocessing"),
    (_set("preprocessing.size", "56"), "preprocessing.size"),
    (_set("preprocessing.size", [112, 96]), "preprocessing.size"),
    (_set("preprocessing.mean", "abc"), "preprocessing.mean"),
    (_set("preprocessing.std", [0.2, 0.0, 0.2]), "preprocessing.std"),
    (_set("cal_image_size", "abc"), "cal_image_size"),
    (_set("cal_image_size", KeyError), "cal_image_size"),
    (_set("format_version", "1"), "format_version"),
    (_set("format_version", 0), "format_version"),
    (_set("model_file", "model.bin"), "model_file"),
    (_set("model_file", "fdsl_export.json"), "model_file"),
    (_set("model_file", "../exp/model.xml"), "model_file"),
    (_set("model_sha256", KeyError), "model_sha256"),
    (lambda info: [info], "JSON object"),
]


@pytest.mark.parametrize("change,field", BAD_CONTRACTS, ids=[f for _, f in BAD_CONTRACTS])
def test_bad_contract_fields_are_one_line_naming_the_field_before_any_work(env, folder, tmp_path, capsys,
                                                                           change, field):
    edit(folder, change)
    line = one_line_error(*deploy(env, folder, tmp_path / "out", capsys))
    assert field in line and "fdsl_export.json" in line, line
    assert not (tmp_path / "out" / "scores.csv").exists()


def test_fdsl_predict_reads_the_same_schema(env, folder, tmp_path, capsys):
    from fdsl.cli.inspection import main

    edit(folder, _set("thresholds.pixel", float("nan")))
    rc = main(["predict", "--detector", str(folder), "--images", str(env.test_dir), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "thresholds.pixel" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "scores.csv").exists()


@pytest.mark.parametrize("flag,value", [("--threshold", "nan"), ("--threshold", "inf"), ("--threshold", "-inf"),
                                        ("--threads", "-1"), ("--threads", "0")])
def test_deploy_refuses_non_finite_thresholds_and_bad_thread_counts(env, tmp_path, capsys, flag, value):
    line = one_line_error(*deploy(env, env.folder, tmp_path / "out", capsys, f"{flag}={value}"))
    assert flag in line and not (tmp_path / "out").exists()


def test_a_replaced_model_file_is_refused_by_its_digest(env, folder, tmp_path, capsys):
    (folder / "model.bin").write_bytes((folder / "model.bin").read_bytes()[::-1])
    line = one_line_error(*deploy(env, folder, tmp_path / "out", capsys))
    assert "model.bin" in line and "sha256" in line and "re-export" in line


@pytest.mark.parametrize("change,words", [
    ({"cal_image_size": 56}, ["anomaly_map", "[?, 64, 64]", "[?, 56, 56]"]),  # a 64 px map, the contract says 56
    ({"preprocessing": {"size": [96, 96], "resize": "squash", "mean": [0, 0, 0], "std": [1, 1, 1]}},
     ["input", "96"]),
])
def test_model_inputs_and_outputs_are_checked_against_the_contract(env, folder, tmp_path, capsys, change, words):
    reseal(folder, **change)  # digests right: the shape check itself must refuse
    line = one_line_error(*deploy(env, folder, tmp_path / "out", capsys))
    assert all(w in line for w in words), line
    assert not (tmp_path / "out" / "scores.csv").exists()


def _cut_half(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["xml_cut", "xml_empty", "bin_cut", "bin_empty", "absurd_input", "unknown_op"])
def test_corrupt_or_foreign_model_files_are_one_line(env, folder, tmp_path, capsys, damage):
    xml, binf = folder / "model.xml", folder / "model.bin"
    if damage == "xml_cut":
        _cut_half(xml)
    elif damage == "xml_empty":
        xml.write_bytes(b"")
    elif damage == "bin_cut":
        _cut_half(binf)
    elif damage == "bin_empty":
        binf.write_bytes(b"")
    elif damage == "absurd_input":
        text = xml.read_text()
        xml.write_text(re.sub(r'shape="\?,3,112,112"', 'shape="?,3,4000000,4000000"', text, count=1))
    elif damage == "unknown_op":
        text = xml.read_text()
        xml.write_text(re.sub(r'type="Multiply"', 'type="FdslNoSuchOp"', text, count=1))
    for sealed in (False, True):  # without new digests the digest check refuses; with them, the runtime's
        if sealed:
            reseal(folder)
        line = one_line_error(*deploy(env, folder, tmp_path / f"out{sealed}", capsys))
        assert "model." in line and "re-export" in line, line


def test_an_unknown_op_loads_no_library(env, folder):
    """An IR naming an op OpenVINO does not know is refused without loading any shared library for it."""
    from fdsl.deploy import load_exported

    def libraries() -> set[str]:
        return {ln.split()[-1] for ln in Path("/proc/self/maps").read_text().splitlines() if ".so" in ln}

    load_exported(env.folder)  # the runtime's own libraries (frontend, CPU plugin) are loaded by a good model
    xml = folder / "model.xml"
    xml.write_text(re.sub(r'type="Multiply"', 'type="FdslNoSuchOp"', xml.read_text(), count=1))
    reseal(folder)
    before = libraries()
    with pytest.raises(FDSLError, match="cannot load it"):
        load_exported(folder)
    assert libraries() == before


def test_an_onnx_model_without_the_four_outputs_is_refused(env, folder, tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 112, 112])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 112, 112])
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["y"])], "foreign", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    reseal(folder, runtime="onnx", model_file="model.onnx", weights_sha256=None)
    line = one_line_error(*deploy(env, folder, tmp_path / "out", capsys))
    assert "model.onnx" in line and "anomaly_map" in line, line


@pytest.mark.parametrize("where", ["below_a_file", "read_only"])
def test_export_checks_its_out_folder_before_loading(env, tmp_path, capsys, where, monkeypatch):
    import os

    from fdsl.cli import export as export_cli
    from fdsl.inspect.detector import Detector

    if where == "below_a_file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "sub"
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        out = Path("/proc/fdsl_out") if os.geteuid() == 0 else tmp_path / "ro" / "sub"  # root writes anywhere else
    monkeypatch.setattr(Detector, "load", lambda *a, **k: pytest.fail("loaded before checking --out"))
    rc = export_cli.main(["--detector", str(env.detectors["global"]), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err and str(out) in err and "Traceback" not in err


def test_a_good_export_still_scores(env, tmp_path, capsys):
    """Control: the untouched export passes every check and scores every image."""
    rc, err = deploy(env, env.folder, tmp_path / "out", capsys)
    assert rc == 0, err
    rows = (tmp_path / "out" / "scores.csv").read_text().splitlines()
    assert len(rows) == 1 + len(env.images)
    info = json.loads((env.folder / "fdsl_export.json").read_text())
    from fdsl.outputs.files import sha256_file

    assert info["model_sha256"] == sha256_file(env.folder / "model.xml")
    assert info["weights_sha256"] == sha256_file(env.folder / "model.bin")
    assert np.isfinite(info["thresholds"]["image"])


def test_serve_serves_an_exported_folder_and_the_page_says_it_cannot_fit(env, tmp_path, monkeypatch):
    """`fdsl serve --detector EXPORTED_DIR` scores with the exported model; fitting is refused in one line."""
    pytest.importorskip("fastapi")
    import socket

    import uvicorn
    from fastapi.testclient import TestClient

    from fdsl.cli import main
    from fdsl.deploy import load_exported

    folder = env.folder
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **k: served.update(app=app, port=port))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["serve", "--detector", str(folder), "--port", str(port), "--workdir", str(tmp_path / "w")]) == 0
    client = TestClient(served["app"], base_url=f"http://127.0.0.1:{served['port']}")
    meta = client.get("/api/detector").json()
    assert meta["can_fit"] is False and meta["runtime"] == "openvino" and meta["n_normal_images"] == 2
    resp = client.post("/api/predict", files=[("files", (p.name, p.read_bytes(), "image/png")) for p in env.images])
    assert resp.status_code == 200, resp.text
    ref = load_exported(folder).predict(env.images)
    np.testing.assert_allclose([r["score"] for r in resp.json()], [p.score for p in ref], rtol=0, atol=1e-6)
    fit = client.post("/api/fit", files=[("normal", (p.name, p.read_bytes(), "image/png")) for p in env.images])
    assert fit.status_code == 400 and "fitting needs the PyTorch detector" in fit.json()["detail"]
    assert "Fitting needs the PyTorch detector" in client.get("/").text
