"""Tests for fdsl.engine.training: resuming refuses changed settings; bad input and temp-file clean-up."""
from __future__ import annotations

import json
import logging

import pytest
from fdsl_test_utils import TINY_MODEL_ARGS, drop_fdsl_log_handlers, tiny_data

from fdsl.cli.jobs import main
from fdsl.config import TrainConfig, config_to_dict, parse_config
from fdsl.engine.training import RESUME_NEUTRAL, Trainer, check_resume_config
from fdsl.errors import ConfigError

JOB = "fdsl.engine.training:train"


@pytest.fixture(autouse=True)
def _no_stale_log_handlers():
    yield
    drop_fdsl_log_handlers()


def _argv(data, save_path, *extra):
    return [*TINY_MODEL_ARGS, "--train_data_path", str(data), "--save_path", str(save_path), "--k_shot", "1",
            "--batch_size", "4", "--epoch", "1", "--num_workers", "0", *map(str, extra)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("training") / "data", n_train=3)


def test_check_resume_config_names_the_changed_setting():
    cfg = config_to_dict(parse_config(TrainConfig, []))
    check_resume_config(cfg, dict(cfg), "run/config.json")
    for neutral in ("epoch", "num_workers", "device", "save_path", "resume", "save_freq"):
        assert neutral in RESUME_NEUTRAL
        check_resume_config(cfg, dict(cfg, **{neutral: "other"}), "run/config.json")
    with pytest.raises(ConfigError, match=r"--learning_rate 0.001 but this run sets --learning_rate 0.01.*--resume 0"):
        check_resume_config(cfg, dict(cfg, learning_rate=0.01), "run/config.json")
    with pytest.raises(ConfigError, match=r"--train_data_path data/visa .* --train_data_path x \(and 1 more: k_shot\)"):
        check_resume_config(cfg, dict(cfg, k_shot=4, train_data_path="x"), "run/config.json")


def test_resume_with_changed_settings_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TrainConfig, JOB, _argv(data, out)) == 0
    assert (out / "epoch_1.pth").is_file()
    saved = (out / "config.json").read_text()
    capsys.readouterr()
    assert main(TrainConfig, JOB, _argv(data, out, "--lr", "0.01", "--epoch", "2")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "--learning_rate" in line[0] and "--resume 0" in line[0]
    assert (out / "config.json").read_text() == saved  # not overwritten
    assert not (out / "epoch_2.pth").exists()
    # More epochs with the same settings resume; --resume 0 starts over with new ones.
    assert main(TrainConfig, JOB, _argv(data, out, "--epoch", "2")) == 0
    assert (out / "epoch_2.pth").is_file()
    assert main(TrainConfig, JOB, _argv(data, out, "--lr", "0.01", "--resume", "0")) == 0
    assert json.loads((out / "config.json").read_text())["learning_rate"] == 0.01


def test_stale_temp_files_are_removed_on_start(data, tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".epoch_3.pth.k2j4_x9q.tmp"
    stale.write_bytes(b"")
    other = out / ".notes.tmp"  # not of atomic_open's naming: kept
    other.write_text("mine")
    cfg = parse_config(TrainConfig, _argv(data, out))
    with caplog.at_level(logging.INFO):
        from fdsl.engine.training import train
        train(cfg)
    assert not stale.exists() and other.exists()
    assert "left by an interrupted write" in caplog.text


def test_class_without_normal_train_images_says_so(data, tmp_path):
    meta = json.loads((data / "meta.json").read_text())
    meta["train"]["carpet_syn"] = []
    root = tmp_path / "data"
    import shutil
    shutil.copytree(data, root)
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="has no normal train images"):
        Trainer(parse_config(TrainConfig, _argv(root, tmp_path / "run")))
