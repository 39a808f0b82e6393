"""Generated command lines: dataclass fields that know their flags and their properties.

`option` makes a field that carries its flags, help and properties (see there); `build_parser` and
`parse_config` turn a dataclass of such fields into an argparse parser whose flags map one-to-one onto
the fields; `settings` lists the fields that have a property, so no list of settings is written twice.
The dataclasses themselves (one per command) are in `fdsl.config`.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import field
from typing import Any

from fdsl.errors import ConfigError

log = logging.getLogger(__name__)

# What another value of a setting changes (see `option`).
NOTHING, NUMBERS, HEAD = "nothing", "numbers", "head"
AFFECTS = (NOTHING, NUMBERS, HEAD)


def option(default: Any, *flags: str, help: str, choices: Sequence[Any] | None = None,
         nargs: str | None = None, item: type | None = None, affects: str | None = None,
         path: bool = False, resume_neutral: bool = False, required: bool = False, env: str | None = None,
         group: str | None = None):
    """A dataclass field that knows its command-line flags and its properties.

    Args:
        flags: the option's names (the first is the canonical one, the others aliases).
        help, choices, nargs: as argparse's; `item` is the element type of a list option.
        affects: what another value changes in a finished result: ``nothing`` (no number: a test run's
            finished classes are reused when only such settings differ), ``numbers`` (the scores) or
            ``head`` (the trained head depends on it: a checkpoint's recorded value wins). None for the
            settings of commands that keep no results to compare (fit, predict, the demo, the indexers).
        path: the value names a file or folder (a leading ~ is expanded).
        resume_neutral: a resumed training run may use another value.
        required: the command line must give it.
        env: an environment variable whose value, when set, is the command-line default.
        group: the heading the option is listed under in ``--help``.
    """
    if affects is not None and affects not in AFFECTS:
        raise ValueError(f"affects={affects!r} is not one of {AFFECTS}")
    meta = {"flags": flags, "help": help, "choices": choices, "nargs": nargs, "item": item, "affects": affects,
            "path": path, "resume_neutral": resume_neutral, "required": required, "env": env, "group": group}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def settings(cls: type, **props: Any) -> tuple[str, ...]:
    """Names of the fields of dataclass `cls` whose properties (see `option`) equal `props`, in field order.

    ``settings(TestConfig, affects="nothing")`` are the settings no finished number depends on.
    """
    return tuple(f.name for f in dataclasses.fields(cls) if all(f.metadata.get(k) == v for k, v in props.items()))


def parse_bool(value: str) -> bool:
    """Parse the released code's 0/1 switches (and true/false, yes/no)."""
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0/1 (or true/false), got {value!r}")


def field_type(f: dataclasses.Field):
    """The argparse `type` of a field: a list's `item` type, else from its annotation (a string here)."""
    if f.metadata.get("item") is not None:
        return f.metadata["item"]
    ann = str(f.type)
    if "bool" in ann:
        return parse_bool
    if "float" in ann:
        return float
    if "int" in ann:
        return int
    return str


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, silent about a default of None (the help says what "not given" means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser(cls: type, description: str = "", prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser whose flags map one-to-one onto the fields of the dataclass `cls`.

    A field whose `group` is set is listed under that heading; a field of an `overrides_of` class has no
    default on the command line (absent means "not given", the dataclass's None).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description or cls.__doc__,
                                     formatter_class=_HelpFormatter, allow_abbrev=False)
    groups: dict = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        kwargs: dict = {"dest": f.name, "help": meta["help"], "type": field_type(f)}
        if meta.get("unset") or meta.get("required"):
            kwargs["default"] = argparse.SUPPRESS
        else:
            kwargs["default"] = (os.environ.get(meta["env"]) if meta.get("env") else None) or _default(f)
        if meta.get("required"):
            kwargs["required"] = True
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("nargs"):
            kwargs["nargs"] = meta["nargs"]
        if kwargs["type"] is parse_bool:
            kwargs["metavar"] = "{0,1}"
        title = meta.get("group")
        target = parser if not title else groups.setdefault(title, parser.add_argument_group(title))
        target.add_argument(*meta["flags"], **kwargs)
    return parser


CONFIG_FIELD = "config"  # a command with this field reruns a saved run's config.json (`parse_config`)


# Settings renamed since runs were saved: a config.json that uses the earlier name still reads.
RENAMED_SETTINGS = {"engine": "backend", "engine_cache": "backend_cache"}


def renamed_settings(saved: dict) -> dict:
    """`saved` (a config.json's settings) with every earlier setting name replaced by its current one."""
    return {RENAMED_SETTINGS.get(k, k) if RENAMED_SETTINGS.get(k, k) not in saved else k: v
            for k, v in saved.items()}


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
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path} is not valid JSON ({exc})") from exc
    if not isinstance(saved, dict):
        raise ConfigError(f"--config {path} holds {type(saved).__name__}, not a JSON object of settings")
    saved = renamed_settings(saved)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        raise ConfigError(f"--config {path} has settings this command does not take: {', '.join(unknown)} "
                          f"(is it another command's config.json? {cls.__name__} takes {', '.join(fields)})")
    for name, value in saved.items():
        _check_saved_value(fields[name], value, path)
    return saved


def _check_saved_value(f: dataclasses.Field, value: Any, path: str) -> None:
    """Raise `ConfigError` unless `value` (from a config.json) fits field `f`'s type and choices."""
    kind = field_type(f)

    def fits(v: Any) -> bool:
        if kind is parse_bool:
            return isinstance(v, bool)
        if kind is int:
            return isinstance(v, int) and not isinstance(v, bool)
        if kind is float:
            return isinstance(v, (int, float)) and not isinstance(v, bool)
        return isinstance(v, str)

    if value is None:
        ok = _default(f) is None
    elif f.metadata.get("nargs"):
        ok = (isinstance(value, list) and all(fits(v) for v in value)) or (f.name == "k_shot" and fits(value))
    else:
        ok = fits(value)
    choices = f.metadata.get("choices")
    if ok and choices and value is not None:
        ok = all(v in choices for v in (value if isinstance(value, list) else [value]))
    if not ok:
        raise ConfigError(f"--config {path}: {f.name} = {value!r} is not a valid value for "
                          f"{f.metadata['flags'][0]}")


def parse_config(cls: type, argv: Sequence[str] | None = None, description: str = "",
                 prog: str | None = None):
    """Parse `argv` into a validated `cls` instance. Unknown flags are errors.

    For a command with a ``config`` field (train, test), ``--config RUN/config.json`` starts from a saved
    run's settings: they become the defaults, and options given on the command line override them. The
    names of the fields set on the command line are recorded on the instance (see `explicit_fields`;
    values read from ``--config`` count as defaults, so a checkpoint's recorded model settings still win
    over them), and so are the arguments themselves (`parsed_argv`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(cls, description, prog)
    if CONFIG_FIELD in {f.name for f in dataclasses.fields(cls)}:
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument("--config", dest=CONFIG_FIELD, default=None)
        config_path = pre.parse_known_args(argv)[0].config
        if config_path is not None:
            saved = read_config_file(cls, config_path)
            saved.pop(CONFIG_FIELD, None)  # where that run's own settings came from is not a setting
            parser.set_defaults(**saved)
            for action in parser._actions:  # an option the file gives is no longer required on the command line
                if action.dest in saved:
                    action.required = False
    ns = parser.parse_args(argv)
    cfg = cls(**vars(ns))
    # Parse again with every default suppressed: what remains was given explicitly.
    bare = build_parser(cls, description, prog)
    for action in bare._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    object.__setattr__(cfg, _EXPLICIT, frozenset(vars(bare.parse_args(argv))))
    object.__setattr__(cfg, _ARGV, tuple(argv))
    cfg.validate()
    return cfg


def overrides_of(cls: type, group: str) -> type:
    """A dataclass with the fields of `cls` (same flags, help and properties), each defaulting to None.

    A command whose defaults come from elsewhere (`fit`: the checkpoint's saved model config) takes its
    settings through it; `given(cfg, cls)` are the ones set.
    """
    specs = [(f.name, f"Optional[{f.type}]", field(default=None, metadata={**f.metadata, "group": group,
                                                                            "unset": True}))
             for f in dataclasses.fields(cls)]
    return dataclasses.make_dataclass(f"{cls.__name__}Overrides", specs,
                                      namespace={"__module__": __name__,
                                                 "__doc__": f"`{cls.__name__}`'s fields, None when not given."})


def given(cfg: Any, cls: type) -> dict:
    """{name: value} of the `cls` fields that `cfg` (built with `overrides_of(cls)`) sets (not None)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if getattr(cfg, f.name, None) is not None}


_EXPLICIT = "_explicit_fields"  # an instance attribute, not a dataclass field: never in config.json
_ARGV = "_parsed_argv"  # likewise: the arguments `parse_config` parsed


def parsed_argv(cfg: Any) -> tuple | None:
    """The command-line arguments `cfg` was parsed from (`parse_config`); None for a config built in code."""
    return getattr(cfg, _ARGV, None)


def explicit_fields(cfg: Any) -> frozenset:
    """Names of the fields the user set explicitly.

    Recorded by `parse_config`; for a config built in code, the fields whose value differs from the default.
    """
    recorded = getattr(cfg, _EXPLICIT, None)
    if recorded is not None:
        return recorded
    return frozenset(f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != _default(f))


def expand_user_paths(cfg: Any) -> None:
    """Expand a leading ~ in every path setting of `cfg` (in place; in each item of a list of paths)."""
    def expand(v: Any) -> Any:
        return os.path.expanduser(v) if isinstance(v, str) and v.startswith("~") else v

    for name in settings(type(cfg), path=True):
        value = getattr(cfg, name, None)
        setattr(cfg, name, [expand(v) for v in value] if isinstance(value, list) else expand(value))


def config_to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def part_of(cfg: Any, cls: type):
    """The `cls` part (e.g. `ModelConfig`, `RuntimeConfig`) of a train or test config."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in names})
