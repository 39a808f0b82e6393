"""Generated input folders shared by the Ray tests of `fdsl batch`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` small noise PNGs of varied sizes, in two sub-folders, plus the good/defect parts' look-alikes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = folder / f"line{i % 2}" / f"img{i:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24 + i % 9, 28 + i % 5, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


def add_bad_files(folder: Path) -> dict[str, Path]:
    bad = {"empty": folder / "empty.png", "corrupt": folder / "corrupt.png", "text": folder / "notes.jpg"}
    bad["empty"].write_bytes(b"")
    bad["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    bad["text"].write_text("not an image\n")
    return bad
