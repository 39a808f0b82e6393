"""`python -m fdsl.cli.options_doc`: write ``docs/options.md``, every command's settings, from the fields.

The table is generated from the dataclass fields of `fdsl.config` (flags, defaults, help and the
properties of `fdsl.options.option`), so it cannot drift from the code; a test checks that the file
in the repository is current.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fdsl.config import (
    BatchConfig,
    CalibrateConfig,
    DemoConfig,
    DeployConfig,
    ExportConfig,
    FitConfig,
    ImagesCommand,
    IndexConfig,
    JobConfig,
    ModelConfig,
    PredictConfig,
    RuntimeConfig,
    ServeConfig,
    TestConfig,
    TrainConfig,
)
from fdsl.io import atomic_write_text

DOC = Path(__file__).resolve().parents[2] / "docs" / "options.md"

# (heading, config class): each section lists the fields the class adds to its dataclass bases.
SECTIONS = [
    ("Model: `train.py`, `test.py` (saved in every checkpoint); `fdsl fit` takes them too, each defaulting to "
     "the checkpoint's", ModelConfig),
    ("Runtime: `train.py`, `test.py`, `fdsl fit`, `fdsl predict`, `fdsl calibrate`, `fdsl serve`, the demo",
     RuntimeConfig),
    ("Run: `train.py`, `test.py`", JobConfig),
    ("`train.py`", TrainConfig),
    ("`test.py`", TestConfig),
    ("`fdsl fit`, `fdsl predict`, `fdsl calibrate`, `fdsl serve` (besides the runtime options)", ImagesCommand),
    ("`fdsl fit`", FitConfig),
    ("`fdsl predict`", PredictConfig),
    ("`fdsl calibrate`", CalibrateConfig),
    ("`fdsl serve`", ServeConfig),
    ("`fdsl export`", ExportConfig),
    ("`python -m fdsl.deploy` (no PyTorch)", DeployConfig),
    ("`fdsl batch` (Ray Data)", BatchConfig),
    ("The demo: `fdsl demo`, `python -m fdsl.cli.demo`", DemoConfig),
    ("The indexers: `python data/mvtec.py`, `python data/visa.py`", IndexConfig),
]

PREAMBLE = """# Options

Generated from the dataclass fields of `fdsl/config.py` by `python -m fdsl.cli.options_doc`; do not edit
by hand (a test checks that this file is current). Every command line maps one-to-one onto its
dataclass: an unknown option is an error, and the released code's spellings work as aliases.

Columns:
- **affects**: what another value changes in a finished `test.py` result. `nothing`: no number (a rerun of
  `test.py` reuses finished classes when only such settings differ; the seed's effect, the reference
  images, is compared by name); `numbers`: the scores (part of the run's fingerprint); `head`: the
  trained head depends on it (`test.py` takes the checkpoint's recorded value unless the option is
  given, and refuses a different one).
- **path**: names a file or folder (a leading `~` is expanded).
- **resume**: `yes` when `train.py` may resume a run with another value; every other setting
  (`--batch_size` and `--seed` too: they change what is trained) must match the run being resumed.
"""


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _value(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    return f"`{v}`" if isinstance(v, str) else str(v)


def _default(f: dataclasses.Field) -> str:
    meta = f.metadata
    if meta.get("required"):
        return "required"
    if meta.get("unset"):
        return "checkpoint's"
    if f.default is not dataclasses.MISSING:
        value = f.default
    else:
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
    text = _value(value)
    return f"{text} (env `{meta['env']}`)" if meta.get("env") else text


def own_fields(cls: type) -> list[dataclasses.Field]:
    """The fields `cls` adds to its dataclass bases (all of them for a class without such bases)."""
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    return [f for f in dataclasses.fields(cls) if f.name not in inherited]


def table(fields: Sequence[dataclasses.Field]) -> str:
    """A markdown table of `fields`: option (aliases), default, affects, path, resume, meaning."""
    rows = ["| option (aliases) | default | affects | path | resume | meaning |", "|---|---|---|---|---|---|"]
    for f in fields:
        meta = f.metadata
        flags = meta["flags"]
        name = f"`{flags[0]}`" + (f" ({', '.join(f'`{a}`' for a in flags[1:])})" if len(flags) > 1 else "")
        meaning = meta["help"] + (f"; one of {', '.join(map(str, meta['choices']))}" if meta.get("choices") else "")
        rows.append("| " + " | ".join(_cell(c) for c in (
            name, _default(f), meta.get("affects") or "–", "yes" if meta.get("path") else "",
            "yes" if meta.get("resume_neutral") else "", meaning)) + " |")
    return "\n".join(rows)


def options_markdown() -> str:
    """The whole of ``docs/options.md``."""
    parts = [PREAMBLE]
    for heading, cls in SECTIONS:
        parts.append(f"## {heading}\n\n{table(own_fields(cls))}\n")
    return "\n".join(parts)


COLUMNS_BEGIN = "<!-- scores.csv columns: generated from fdsl.outputs.writers by python -m fdsl.cli.options_doc -->"
COLUMNS_END = "<!-- end of the generated scores.csv columns -->"
COLUMN_DOCS = ("docs/inspect.md", "docs/deploy.md", "docs/workbench.md")  # each holds one generated block


def columns_markdown() -> str:
    """The generated block: a table of `predict`'s ``scores.csv`` columns, in file order."""
    from fdsl.outputs.writers import SCORE_COLUMN_HELP, SCORE_COLUMNS

    rows = ["| `scores.csv` column | holds |", "|---|---|"]
    rows += [f"| `{c}` | {_cell(SCORE_COLUMN_HELP[c])} |" for c in SCORE_COLUMNS]
    return "\n".join([COLUMNS_BEGIN, *rows, COLUMNS_END])


def with_columns(text: str, where: str) -> str:
    """`text` with its generated columns block replaced by the current one."""
    begin, end = text.find(COLUMNS_BEGIN), text.find(COLUMNS_END)
    if begin < 0 or end < begin:
        raise ValueError(f"{where} has no generated scores.csv columns block ({COLUMNS_BEGIN})")
    return text[:begin] + columns_markdown() + text[end + len(COLUMNS_END):]


def main(argv: Sequence[str] | None = None) -> int:
    """Write ``docs/options.md`` (or the path given as the only argument) and the scores.csv column blocks."""
    args = list(sys.argv[1:] if argv is None else argv)
    target = Path(args[0]) if args else DOC
    atomic_write_text(target, options_markdown())
    print(f"wrote {target}")
    if not args:
        for rel in COLUMN_DOCS:
            doc = DOC.parents[1] / rel
            atomic_write_text(doc, with_columns(doc.read_text(encoding="utf-8"), rel))
            print(f"wrote the scores.csv columns of {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
