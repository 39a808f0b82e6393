"""The compile cache of exported models: in the user cache folder ($FDSL_CACHE_DIR first), off with
FDSL_ENGINE_CACHE=off (the tests' default), and skipped, not an error, where the folder cannot be made."""
from __future__ import annotations

from fdsl.openvino_core import compiled_cache_dir, default_cache_dir


def test_compiled_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FDSL_ENGINE_CACHE", "off")
    monkeypatch.setenv("FDSL_CACHE_DIR", str(tmp_path / "c"))
    assert compiled_cache_dir() is None
    assert not (tmp_path / "c").exists()  # off: nothing created
    monkeypatch.setenv("FDSL_ENGINE_CACHE", "on")
    assert default_cache_dir() == tmp_path / "c" / "openvino"
    assert compiled_cache_dir() == str(tmp_path / "c" / "openvino" / "compiled")
    assert (tmp_path / "c" / "openvino" / "compiled").is_dir()
    monkeypatch.delenv("FDSL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "fdsl" / "openvino"


def test_compiled_cache_skipped_where_it_cannot_be_made(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("FDSL_ENGINE_CACHE", "on")
    monkeypatch.setenv("FDSL_CACHE_DIR", str(tmp_path / "file"))  # a file where the folder should be
    assert compiled_cache_dir() is None
