"""Small checks every layer shares, written once: positive integers, plain names, de-duplication."""
from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from typing import Any

from fdsl.errors import ConfigError, FDSLError

log = logging.getLogger(__name__)


def is_int(value: Any) -> bool:
    """True for a Python or NumPy integer (never for a bool)."""
    return not isinstance(value, bool) and hasattr(value, "__index__") and not isinstance(value, float)


def positive_int(value: Any, name: str, minimum: int = 1, error: type[FDSLError] = ConfigError) -> int:
    """`value` as an int when it is an integer >= `minimum` (default 1); else `error` naming `name`."""
    if not is_int(value) or int(value) < minimum:
        wanted = "positive" if minimum == 1 else f"an integer >= {minimum}"
        raise error(f"{name} must be {wanted}, got {value!r}")
    return int(value)


def is_plain_name(name: Any) -> bool:
    """True for a name usable as one file or folder name: a non-empty string, not ``.`` or ``..``, without
    path separators, NUL or a drive prefix (``C:``)."""
    return (isinstance(name, str) and name.strip() not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not (len(name) >= 2 and name[1] == ":"))


def unique(values: Sequence[Hashable]) -> list[Any]:
    """`values` without repeats, in first-seen order."""
    return list(dict.fromkeys(values))


def repeated(values: Sequence[Hashable]) -> list[Any]:
    """The values that occur more than once in `values`, in first-seen order."""
    counts: dict = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return [v for v, n in counts.items() if n > 1]


_WARNINGS = "_config_warnings"  # an instance attribute: warnings given while validating, replayed into log.txt


def dedupe_option(flag: str, values: Sequence[Hashable], owner: Any = None) -> list:
    """`values` without repeats, in order; a warning names the repeats (``--classes a b a``), also recorded on
    `owner` (a config), whose run replays it into its log file once that exists: see `config_warnings`."""
    out = unique(values)
    if len(out) != len(values):
        message = f"{flag} lists {repeated(values)} more than once; each is used once: {out}"
        log.warning("%s", message)
        if owner is not None:
            seen = list(getattr(owner, _WARNINGS, []))
            if message not in seen:
                object.__setattr__(owner, _WARNINGS, seen + [message])
    return out


def config_warnings(cfg: Any) -> list[str]:
    """The warnings `cfg`'s validation gave (repeated --classes, --seeds, --k_shot values), in order."""
    return list(getattr(cfg, _WARNINGS, []))
