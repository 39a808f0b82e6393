"""Tests for fdsl.config: flag aliases, docs/method.md defaults, strictness (no catch-alls), validation."""

from __future__ import annotations

import re

import pytest

from fdsl.config import ModelConfig, TrainConfig, build_parser, explicit_fields, parse_config
from fdsl.config import TestConfig as EvalConfig  # aliased: pytest would try to collect a class named Test*
from fdsl.errors import ConfigError

# EvalConfig (fdsl.config.TestConfig) requires a checkpoint; every test-side parse starts from this.
CKPT = ["--checkpoint_path", "ckpt.pth"]


def _test(*argv: str) -> EvalConfig:
    return parse_config(EvalConfig, [*CKPT, *argv])


def _train(*argv: str) -> TrainConfig:
    return parse_config(TrainConfig, list(argv))


# ---------------------------------------------------------------------------- defaults
def test_train_defaults_match_method() -> None:
    cfg = _train()
    assert cfg.model == "ViT-L-14-336"
    assert cfg.pretrained == "openai"
    assert cfg.image_size == 518
    assert cfg.features_list == [6, 12, 18, 24]
    assert cfg.few_shot_features == [6, 12, 18, 24]
    assert cfg.quick_gelu is False  # plain GELU, as the released code
    assert cfg.use_norm is True
    assert cfg.align_mode == "mulmax"
    assert cfg.use_abs is True
    assert cfg.use_nam is True
    assert cfg.winmode == "nan"
    assert (cfg.win_size, cfg.win_stride, cfg.win_weight) == (13, 2, 0.5)
    assert cfg.learning_rate == pytest.approx(1e-3)
    assert cfg.batch_size == 8
    assert cfg.k_shot == 10  # training memory bank: 10 shots
    assert cfg.epoch == 5


def test_test_defaults_match_method() -> None:
    cfg = _test()
    assert cfg.image_size == 518
    assert cfg.features_list == [6, 12, 18, 24]
    assert cfg.few_shot_features == [6, 12, 18, 24]
    assert (cfg.win_size, cfg.win_stride, cfg.win_weight) == (13, 2, 0.5)
    assert cfg.cal_image_size == 240
    assert cfg.align_mode == "mulmax"
    assert cfg.use_nam is True
    assert cfg.use_norm is True
    assert cfg.winmode == "nan"
    assert cfg.batch_size == 8
    assert (cfg.precision, cfg.align_precision, cfg.bank_dtype) == ("auto", "fp32", "auto")  # fp32 everywhere


@pytest.mark.parametrize("value", ["fp32", "fp16", "bf16"])
def test_align_precision_flag(value: str) -> None:
    assert _test("--align_precision", value).align_precision == value
    assert _train("--align_precision", value).align_precision == value


def test_align_precision_rejects_auto_and_garbage() -> None:
    for bad in ("auto", "fp64"):
        with pytest.raises(SystemExit):
            _test("--align_precision", bad)


def test_default_lists_are_not_shared_between_instances() -> None:
    a, b = _train(), _train()
    a.features_list.append(99)
    assert b.features_list == [6, 12, 18, 24]
    assert ModelConfig().features_list == [6, 12, 18, 24]


# ---------------------------------------------------------------------------- aliases
@pytest.mark.parametrize(
    "cls, argv, field, expected",
    [
        (EvalConfig, ["--k_shot", "4"], "k_shot", 4),
        (EvalConfig, ["--kshot", "2"], "k_shot", 2),
        (TrainConfig, ["--k_shot", "3"], "k_shot", 3),
        (EvalConfig, ["--useConvRes", "0"], "use_nam", False),
        (EvalConfig, ["--useNAM", "0"], "use_nam", False),
        (EvalConfig, ["--use_nam", "0"], "use_nam", False),
        (TrainConfig, ["--useNAM", "0"], "use_nam", False),
        (EvalConfig, ["--alignMode", "diff2"], "align_mode", "diff2"),
        (EvalConfig, ["--align_mode", "diff2"], "align_mode", "diff2"),
        (EvalConfig, ["--useNorm", "0"], "use_norm", False),
        (EvalConfig, ["--calImage_size", "256"], "cal_image_size", 256),
        (EvalConfig, ["--cal_image_size", "128"], "cal_image_size", 128),
        (EvalConfig, ["--winmode", "nan"], "winmode", "nan"),
        (EvalConfig, ["--winsize", "7"], "win_size", 7),
        (EvalConfig, ["--win_size", "9"], "win_size", 9),
        (EvalConfig, ["--winstride", "3"], "win_stride", 3),
        (EvalConfig, ["--win_stride", "4"], "win_stride", 4),
        (EvalConfig, ["--winwight", "0.3"], "win_weight", 0.3),
        (EvalConfig, ["--win_weight", "0.7"], "win_weight", 0.7),
        (TrainConfig, ["--lr", "0.01"], "learning_rate", 0.01),
        (TrainConfig, ["--epochs", "11"], "epoch", 11),
        (TrainConfig, ["--data_path", "/x/visa"], "train_data_path", "/x/visa"),
        (EvalConfig, ["--data_path", "/x/mvtec"], "data_path", "/x/mvtec"),
        (EvalConfig, ["--engine", "openvino"], "backend", "openvino"),  # the backend's earlier name
        (EvalConfig, ["--engine_cache", "/x/c"], "backend_cache", "/x/c"),
    ],
)
def test_flag_aliases_map_to_fields(cls, argv, field, expected) -> None:
    extra = CKPT if cls is EvalConfig else []
    cfg = parse_config(cls, [*extra, *argv])
    value = getattr(cfg, field)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("flag", ["--features_list", "--few_shot_features"])
def test_feature_lists_take_several_ints(flag: str) -> None:
    cfg = _test("--features_list", "1", "2", "3", "--few_shot_features", "1", "2", "3")
    assert cfg.features_list == [1, 2, 3]
    assert cfg.few_shot_features == [1, 2, 3]
    # each flag on its own is nargs='+': every value lands in the list, as ints
    ns = build_parser(EvalConfig).parse_args([*CKPT, flag, "3", "7"])
    dest = flag.lstrip("-")
    assert getattr(ns, dest) == [3, 7]
    assert all(type(v) is int for v in getattr(ns, dest))


@pytest.mark.parametrize("mode", ["nan", "mul", "onlywin"])
def test_winmode_flag_reaches_the_field(mode: str) -> None:
    # the parser (before validation) maps every released --winmode value onto the field
    ns = build_parser(EvalConfig).parse_args([*CKPT, "--winmode", mode])
    assert ns.winmode == mode


# ---------------------------------------------------------------------------- strictness
@pytest.mark.parametrize(
    "argv",
    [
        ["--k_shots", "3"],  # misspelt flag
        ["--winweight", "0.3"],  # plausible misspelling of --winwight / --win_weight
        ["--k_sho", "3"],  # abbreviation: must not be expanded silently
        ["--not_a_flag"],
        ["stray_positional"],
    ],
)
def test_unknown_flags_exit(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        _test(*argv)
    assert exc.value.code != 0
    assert "unrecognized arguments" in capsys.readouterr().err


def test_unknown_flag_exits_for_training_too() -> None:
    with pytest.raises(SystemExit):
        _train("--cal_image_size", "240")  # a test-only option is unknown to train.py


@pytest.mark.parametrize("bad", [["--align_mode", "cosine"], ["--winmode", "both"], ["--k_shot", "two"]])
def test_invalid_values_exit(bad) -> None:
    with pytest.raises(SystemExit):
        _test(*bad)


# ---------------------------------------------------------------------------- booleans
@pytest.mark.parametrize(
    "text, expected",
    [("0", False), ("1", True), ("false", False), ("true", True), ("False", False), ("True", True)],
)
@pytest.mark.parametrize("flag, field", [("--useNAM", "use_nam"), ("--quick_gelu", "quick_gelu"),
                                         ("--useNorm", "use_norm"), ("--use_abs", "use_abs")])
def test_bool_flags_accept_0_1(flag, field, text, expected) -> None:
    cfg = _test(flag, text)
    assert getattr(cfg, field) is expected


@pytest.mark.parametrize("text", ["2", "maybe", ""])
def test_bool_flags_reject_other_values(text) -> None:
    with pytest.raises(SystemExit):
        _test("--useNAM", text)


# ---------------------------------------------------------------------------- validation
def test_features_list_must_equal_few_shot_features() -> None:
    with pytest.raises(ConfigError, match="few_shot_features"):
        _test("--features_list", "6", "12", "18", "24", "--few_shot_features", "6", "12", "18")
    with pytest.raises(ConfigError):
        _train("--few_shot_features", "1", "2", "3", "4")


def test_duplicate_or_zero_layers_rejected() -> None:
    with pytest.raises(ConfigError):
        _test("--features_list", "6", "6", "--few_shot_features", "6", "6")
    with pytest.raises(ConfigError):
        _test("--features_list", "0", "6", "--few_shot_features", "0", "6")


def test_checkpoint_path_required_for_testing() -> None:
    with pytest.raises(ConfigError, match="checkpoint_path"):
        parse_config(EvalConfig, [])


def test_win_weight_outside_unit_interval_rejected() -> None:
    with pytest.raises(ConfigError, match="win_weight"):
        _test("--winwight", "1.5")


@pytest.mark.parametrize("mode", ["mul", "onlywin"])
def test_winmode_lfe_flags(mode: str) -> None:
    argv = ["--winmode", mode, "--winsize", "13", "--winstride", "2", "--winwight", "0.5"]
    cfg = _test(*argv)
    assert (cfg.winmode, cfg.win_size, cfg.win_stride, cfg.win_weight) == (mode, 13, 2, 0.5)


def test_use_img_idx_flag() -> None:
    assert _test("--use_img_idx", "1").use_img_idx is True
    assert _test("--useImgIdx", "1").use_img_idx is True
    assert _test("--use_img_idx", "0").use_img_idx is False


@pytest.mark.parametrize("argv", [["--winsize", "0"], ["--winstride", "0"], ["--align_chunk_mb", "0"],
                                  ["--winwight", "1.5"]])
def test_bad_window_settings_are_config_errors(argv) -> None:
    with pytest.raises(ConfigError):
        _test(*argv)


# ---------------------------------------------------------------------------- hardening (issue 8)
def test_parse_config_records_explicit_fields_outside_config_json() -> None:
    from fdsl.config import config_to_dict, explicit_fields

    cfg = _test("--use_nam", "1", "--k_shot", "2", "--useNorm", "0")
    assert explicit_fields(cfg) == {"checkpoint_path", "use_nam", "k_shot", "use_norm"}
    assert not any(k.startswith("_") for k in config_to_dict(cfg))
    # A config built in code: the fields that differ from their defaults.
    assert explicit_fields(EvalConfig(checkpoint_path="x", use_nam=False)) == {"checkpoint_path", "use_nam"}


@pytest.mark.parametrize("argv", [
    ["--batch_size", "0"], ["--batch_size", "-1"], ["--seed", "-1"], ["--seeds", "1", "-2"],
    ["--num_workers", "-1"], ["--win_weight", "nan"], ["--cal_image_size", "0"], ["--image_size", "0"],
])
def test_test_numeric_options_are_validated(argv) -> None:
    with pytest.raises(ConfigError, match=argv[0]):
        _test(*argv)


@pytest.mark.parametrize("argv", [
    ["--learning_rate", "nan"], ["--lr", "-1"], ["--lr", "0"], ["--lr", "inf"], ["--batch_size", "0"],
    ["--epoch", "0"], ["--save_freq", "0"], ["--k_shot", "0"], ["--seed", "-5"],
])
def test_train_numeric_options_are_validated(argv) -> None:
    flag = {"--lr": "--learning_rate"}.get(argv[0], argv[0])
    with pytest.raises(ConfigError, match=flag):
        _train(*argv)


def test_repeated_classes_and_seeds_are_used_once_with_a_warning(caplog) -> None:
    with caplog.at_level("WARNING"):
        cfg = _test("--classes", "b", "a", "b", "--seeds", "5", "5", "7")
    assert cfg.classes == ["b", "a"] and cfg.seeds == [5, 7] and cfg.run_seeds() == [5, 7]
    assert "--classes lists ['b']" in caplog.text and "--seeds lists [5]" in caplog.text
    with caplog.at_level("WARNING"):
        assert _train("--classes", "x", "x").classes == ["x"]


def test_tilde_is_expanded_in_path_options(monkeypatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    cfg = _test("--save_path=~/runs/x", "--data_path", "~/mvtec", "--k_shot_file", "~/k.txt")
    assert cfg.save_path == "/home/someone/runs/x"
    assert cfg.data_path == "/home/someone/mvtec" and cfg.k_shot_file == "/home/someone/k.txt"
    cfg = parse_config(EvalConfig, ["--checkpoint_path", "~/c.pth", "--pretrained", "~/w.pt"])
    assert cfg.checkpoint_path == "/home/someone/c.pth" and cfg.pretrained == "/home/someone/w.pt"
    tr = _train("--train_data_path", "~/visa", "--save_path", "~/t")
    assert tr.train_data_path == "/home/someone/visa" and tr.save_path == "/home/someone/t"
    assert _test().pretrained == "openai"  # a tag is left alone


# ---------------------------------------------------------------------------- every command, one parser
def _dests(parser) -> set:
    return {a.dest for a in parser._actions if a.dest != "help"}


def test_every_command_parses_through_its_dataclass(capsys) -> None:
    import dataclasses

    from fdsl.cli import indexing, inspection
    from fdsl.config import DemoConfig, DeployConfig

    for cmd, (cls, _) in inspection.COMMANDS.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        assert _dests(build_parser(cls)) == fields, cmd
        assert inspection.main([cmd, "--help"]) == 0
        out = capsys.readouterr().out
        assert all(f.metadata["flags"][0] in out for f in dataclasses.fields(cls)), cmd
    for cls in (DemoConfig, DeployConfig):
        assert _dests(build_parser(cls)) == {f.name for f in dataclasses.fields(cls)}
    assert indexing.index_main("visa", ["--help"]) == 0
    out = capsys.readouterr().out
    assert "--root" in out and "--classes" in out
    assert indexing.index_main("mvtec", ["--bogus"]) == 2  # no catch-all


def test_fit_model_options_default_to_the_checkpoint() -> None:
    from fdsl.config import FitConfig, given

    base = ["--checkpoint", "c.pth", "--normal", "good", "--out", "p.fdsl"]
    assert given(parse_config(FitConfig, base), ModelConfig) == {}
    cfg = parse_config(FitConfig, [*base, "--winmode", "mul", "--useNAM", "0", "--features_list", "1", "2"])
    assert given(cfg, ModelConfig) == {"winmode": "mul", "use_nam": False, "features_list": [1, 2]}
    assert cfg.runtime().win_batch == 16
    with pytest.raises(SystemExit):
        parse_config(FitConfig, base[:2])  # --normal and --out are required


# ---------------------------------------------------------------------------- --config run/config.json
def _saved(tmp_path, **settings):
    import json

    from fdsl.config import config_to_dict

    cfg = EvalConfig(checkpoint_path="ck.pth", data_path="d", **settings)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config_to_dict(cfg)))
    return path


def test_config_file_gives_defaults_and_the_command_line_overrides(tmp_path) -> None:
    path = _saved(tmp_path, model="FDSL-Tiny-ViT", image_size=56, winmode="mul", k_shot=[1, 2, 4], seeds=[1, 2])
    cfg = parse_config(EvalConfig, ["--config", str(path)])
    assert (cfg.model, cfg.image_size, cfg.winmode, cfg.k_shot, cfg.seeds) == ("FDSL-Tiny-ViT", 56, "mul",
                                                                               [1, 2, 4], [1, 2])
    cfg = parse_config(EvalConfig, ["--config", str(path), "--k_shot", "2", "--winmode", "nan"])
    assert cfg.k_shot == 2 and cfg.winmode == "nan" and cfg.image_size == 56
    # Values from the file are not "given": a checkpoint's recorded model settings still win over them.
    assert explicit_fields(cfg) == {"config", "k_shot", "winmode"} and cfg.config == str(path)


@pytest.mark.parametrize("key, value, words", [
    ("epoch", 5, "settings this command does not take: epoch"),  # a train.py config.json given to test.py
    ("image_size", "big", "image_size = 'big'"),
    ("use_nam", 2, "use_nam = 2"),
    ("winmode", "sideways", "winmode = 'sideways'"),
    ("features_list", [1, "x"], "features_list"),
])
def test_bad_config_file_is_one_error_naming_the_key(tmp_path, key, value, words) -> None:
    import json

    path = _saved(tmp_path)
    saved = json.loads(path.read_text())
    saved[key] = value
    path.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=re.escape(words)):
        parse_config(EvalConfig, ["--config", str(path)])


def test_unreadable_config_file_is_one_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        parse_config(EvalConfig, ["--config", str(tmp_path / "missing.json")])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_config(EvalConfig, ["--config", str(tmp_path / "bad.json")])


def test_a_config_json_that_says_engine_still_reads(tmp_path) -> None:
    """`engine` / `engine_cache` were renamed `backend` / `backend_cache`: saved runs keep reading."""
    from fdsl.options import read_config_file

    path = tmp_path / "config.json"
    path.write_text('{"engine": "openvino", "engine_cache": "c", "win_batch": 4}')
    assert read_config_file(EvalConfig, str(path)) == {"backend": "openvino", "backend_cache": "c", "win_batch": 4}
