"""docs/options.md and the README's tables of settings agree with the fields' metadata (fdsl.config)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from fdsl.cli.options_doc import DOC, options_markdown, own_fields
from fdsl.config import ModelConfig, TrainConfig, settings
from fdsl.core.checkpoint_io import TRAINED_SETTINGS
from fdsl.engine.evaluation import _NEUTRAL
from fdsl.engine.training import RESUME_NEUTRAL

ROOT = Path(__file__).resolve().parents[2]


def _fields_by_flag() -> dict:
    """{flag: [fields bearing it]} over every command (a flag such as --out names a field of several)."""
    from fdsl.cli.options_doc import SECTIONS

    out: dict = {}
    for _, cls in SECTIONS:
        for f in dataclasses.fields(cls):
            for flag in f.metadata["flags"]:
                out.setdefault(flag, []).append(f)
    return out


def _shown_defaults(f: dataclasses.Field) -> set:
    """How a table may show the default of `f`: 1/0 for switches, space-separated lists, – or all for None."""
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if value is None:
        return {"–", "all"}
    if isinstance(value, bool):
        return {str(int(value))}
    if isinstance(value, list):
        return {" ".join(map(str, value))}
    return {str(value)}


def _table_rows(text: str) -> list:
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("|---")]


def test_options_doc_is_current() -> None:
    assert DOC.read_text(encoding="utf-8") == options_markdown(), (
        "docs/options.md is stale: run `python -m fdsl.cli.options_doc`")
    from fdsl.cli.options_doc import SECTIONS

    text = DOC.read_text(encoding="utf-8")
    assert all(f"| `{f.metadata['flags'][0]}`" in text for _, cls in SECTIONS for f in own_fields(cls))


def test_every_setting_states_its_properties() -> None:
    from fdsl.config import JobConfig, RuntimeConfig, TestConfig

    for cls in (ModelConfig, RuntimeConfig, JobConfig, TrainConfig, TestConfig):
        missing = [f.name for f in dataclasses.fields(cls) if f.metadata.get("affects") is None]
        assert not missing, f"{cls.__name__}: no `affects` on {missing}"


def test_derived_lists_are_the_documented_ones() -> None:
    # The lists that used to be written out by hand, now derived from the fields: unchanged.
    # (plus --config, added since: where a rerun's settings came from changes no number and no resume; --preset,
    # whose values land in the model fields; --shot_draw, which acts like --seed through the references)
    assert set(RESUME_NEUTRAL) == {"epoch", "save_path", "device", "num_workers", "resume", "save_freq", "win_batch",
                                   "align_chunk_mb", "config"}
    assert set(_NEUTRAL) == {"save_path", "num_workers", "batch_size", "classes", "save_images", "seeds", "seed",
                             "device", "win_batch", "align_chunk_mb", "config", "backend_cache", "preset",
                             "shot_draw"}
    assert TRAINED_SETTINGS == ("model", "image_size", "features_list", "quick_gelu", "use_norm", "align_mode",
                                "use_abs", "use_nam")
    assert set(settings(TrainConfig, path=True)) == {"save_path", "train_data_path", "model_config", "pretrained",
                                                     "config", "backend_cache"}


def test_readme_and_docs_tables_name_real_options_with_their_defaults() -> None:
    by_flag = _fields_by_flag()
    checked = 0
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for row in _table_rows(doc.read_text(encoding="utf-8")):
            cells = [c.strip() for c in row.strip("|").split(" | ")]
            flags = re.findall(r"`(--[A-Za-z][A-Za-z0-9_]*)", cells[0])
            for flag in flags:
                assert flag in by_flag, f"{doc.name}: a table names {flag}, which no command has: {row}"
            # A row "| `--flag` (aliases) | default | ..." of an options table: the default must be a field's.
            if flags and re.fullmatch(r"`--\w+`( \(.*\))?", cells[0]) and len(cells) >= 3:
                candidates = [f for f in by_flag[flags[0]] if not (f.metadata.get("required")
                                                                     or f.metadata.get("unset"))]
                shown = cells[1].split(" (env")[0].strip("`")
                if shown in ("required", "checkpoint's"):
                    continue
                assert any(shown in _shown_defaults(f) for f in candidates), (
                    f"{doc.name}: {flags[0]} shows the default {shown!r}; the fields have "
                    f"{[sorted(_shown_defaults(f)) for f in candidates]}")
                checked += 1
    assert checked > 40  # the README's table and docs/options.md


def test_readme_prose_lists_of_settings_match_the_metadata() -> None:
    # The error table's rows that list settings in prose: the resume-neutral ones, the trained ones.
    text = "\n".join(p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    found = 0
    for row in _table_rows(text):
        flags = set(re.findall(r"`--(\w+)`", row))
        if "resumed into a folder" in row:
            assert flags == set(RESUME_NEUTRAL), row
            found += 1
        if "checkpoint trained with other model settings" in row:
            assert flags == set(TRAINED_SETTINGS), row
            found += 1
    assert found >= 2


def test_scores_csv_columns_in_the_docs_are_generated_and_current() -> None:
    from fdsl.cli.options_doc import COLUMN_DOCS, columns_markdown, with_columns
    from fdsl.outputs.writers import SCORE_COLUMN_HELP, SCORE_COLUMNS

    assert tuple(SCORE_COLUMN_HELP) == SCORE_COLUMNS  # every column described, in file order
    block = columns_markdown()
    assert all(f"| `{c}` |" in block for c in SCORE_COLUMNS)
    for rel in COLUMN_DOCS:
        text = (ROOT / rel).read_text(encoding="utf-8")
        assert with_columns(text, rel) == text, f"{rel}: stale scores.csv columns: run python -m fdsl.cli.options_doc"
