"""fdsl.checks (the shared small checks) and fdsl.io.atomic_path (the one atomic writer)."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from fdsl.checks import dedupe_option, is_plain_name, positive_int, repeated, unique
from fdsl.errors import ConfigError, DataError
from fdsl.io import atomic_path


def test_positive_int() -> None:
    assert positive_int(3, "--x") == 3 and positive_int(np.int64(2), "--x") == 2
    assert positive_int(0, "--seed", minimum=0) == 0
    for bad in (0, -1, True, 2.0, "3", None):
        with pytest.raises(ConfigError, match="--x must be positive"):
            positive_int(bad, "--x")
    with pytest.raises(DataError, match="n must be an integer >= 32, got 31"):
        positive_int(31, "n", minimum=32, error=DataError)


def test_plain_names() -> None:
    assert all(is_plain_name(n) for n in ("bottle", "pcb1", "a b", ".hidden"))
    assert not any(is_plain_name(n) for n in ("", " ", ".", "..", "a/b", "a\\b", "x\0", "C:x", None, 3))


def test_unique_and_repeated(caplog) -> None:
    assert unique([3, 1, 3, 2, 1]) == [3, 1, 2] and repeated([3, 1, 3, 2, 1]) == [3, 1]
    with caplog.at_level(logging.WARNING, logger="fdsl.checks"):
        assert dedupe_option("--seeds", [5, 5, 6]) == [5, 6]
    assert "--seeds lists [5] more than once" in caplog.text
    caplog.clear()
    assert dedupe_option("--seeds", [5, 6]) == [5, 6] and not caplog.text


def test_atomic_path_renames_only_when_complete(tmp_path) -> None:
    target = tmp_path / "sub" / "d.fdsl"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"one")
        assert not target.exists() and tmp.parent == target.parent
    assert target.read_bytes() == b"one"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"one"  # untouched, and no temporary file left behind
    assert sorted(p.name for p in target.parent.iterdir()) == ["d.fdsl"]
