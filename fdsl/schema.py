"""Small JSON schemas: a record maps each key to ``(required, field)``; a field is ``(description, check)`` or
a nested record. `check_record` refuses a wrong type, a missing required key or an unknown key with one line
naming the field. Torch-free (the exported-model contract is read without PyTorch)."""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

Spec = tuple[str, Callable[[Any], bool]]


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    """A finite JSON number (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def int_spec(lo: int) -> Spec:
    return (f"an integer >= {lo}", lambda v: is_int(v) and v >= lo)


def num_spec(lo: float = -math.inf, hi: float = math.inf) -> Spec:
    what = "a finite number" + (f" in [{lo:g}, {hi:g}]" if math.isfinite(lo) or math.isfinite(hi) else "")
    return (what, lambda v: is_num(v) and lo <= v <= hi)


def or_null(spec: Spec) -> Spec:
    return (spec[0] + " or null", lambda v: v is None or spec[1](v))


def choice(choices: tuple[Any, ...]) -> Spec:
    return (f"one of {list(choices)}", lambda v: isinstance(v, str) and v in choices)


def list_of(n: int, spec: Spec) -> Spec:
    """A JSON list of exactly `n` items, each passing `spec`."""
    return (f"a list of {n} items, each {spec[0]}", lambda v: isinstance(v, list) and len(v) == n
            and all(spec[1](x) for x in v))


STR: Spec = ("a string", lambda v: isinstance(v, str))
BOOL: Spec = ("true or false", lambda v: isinstance(v, bool))
OBJECT: Spec = ("a JSON object", lambda v: isinstance(v, dict))
SHA256: Spec = ("a sha256 hex digest", lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None)
SHA256_LIST: Spec = ("a list of sha256 hex digests", lambda v: isinstance(v, list) and all(SHA256[1](x) for x in v))
SIZE: Spec = ("a [width, height] pair of integers >= 1", lambda v: isinstance(v, list) and len(v) == 2
              and all(is_int(x) and x >= 1 for x in v))
NORMAL_IMAGES: Spec = ("a list of {name, sha256[, mode, size]} objects", lambda v: isinstance(v, list) and all(
    isinstance(x, dict) and {"name", "sha256"} <= set(x) <= {"name", "sha256", "mode", "size"}
    and STR[1](x["name"]) and SHA256[1](x["sha256"])
    and ("mode" not in x or STR[1](x["mode"])) and ("size" not in x or SIZE[1](x["size"]))
    for x in v))  # a detector's shots, as `fit` records them


def shown(value: Any) -> str:
    """`value` as JSON, cut to 60 characters, for an error line."""
    text = json.dumps(value, allow_nan=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def check_record(obj: Any, schema: dict, fail: Callable[[str], Exception], where: str = "",
                 nullable: frozenset[str] = frozenset()) -> None:
    """Check `obj` against the record `schema`; raise ``fail(message)`` naming the first offending field.

    `where` is the dotted name of `obj` ("" for the top); records named in `nullable` may be null.
    """
    if not isinstance(obj, dict):
        raise fail(f"{('field ' + repr(where)) if where else 'the file'} must be a JSON object, got {shown(obj)}")
    unknown = sorted(set(obj) - set(schema))
    if unknown:
        raise fail(f"unknown field {(where + '.' if where else '') + str(unknown[0])!r}")
    for key, (required, spec) in schema.items():
        name = f"{where}.{key}" if where else key
        if key not in obj:
            if required:
                raise fail(f"the field {name!r} is missing")
            continue
        if isinstance(spec, dict):
            if obj[key] is None and name in nullable:
                continue
            check_record(obj[key], spec, fail, name, nullable)
        elif not spec[1](obj[key]):
            raise fail(f"field {name!r} must be {spec[0]}, got {shown(obj[key])}")
