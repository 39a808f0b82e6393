"""`index.html` of a predict folder: one self-contained page of every scored image, sorted by score."""
from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fdsl.io import PathLike, atomic_write_text

log = logging.getLogger(__name__)

THUMB_HEIGHT = 160

_STYLE = """body{font-family:system-ui,sans-serif;margin:16px;color:#1d2430;background:#f4f5f7}
table{border-collapse:collapse;background:#fff}th,td{border-bottom:1px solid #e3e6eb;padding:6px 10px;font-size:14px}
th{background:#eef0f3;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.v{font-weight:700;padding:2px 8px;border-radius:4px}.a{background:#fde2e1;color:#a4161a}
.n{background:#dff3e4;color:#1b6b35}.u{background:#eee;color:#555}img{display:block;max-width:640px;height:auto}
td.f{max-width:320px;word-break:break-all}"""


def _thumbnail(img: Image.Image, height: int) -> str:
    """A JPEG data URI of the RGB picture `img` scaled to `height` px (aspect kept)."""
    w = max(1, round(img.width * height / max(img.height, 1)))
    buf = io.BytesIO()
    img.resize((w, height), Image.BILINEAR).save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail_uri(path: Path, height: int = THUMB_HEIGHT) -> str | None:
    """A JPEG data URI of the picture at `path` scaled to `height` px; None when it cannot be read."""
    try:
        with Image.open(path) as img:
            return _thumbnail(img.convert("RGB"), height)
    except (OSError, ValueError) as exc:
        log.warning("gallery: cannot read %s (%s); shown without a thumbnail", path, exc)
        return None


def thumbnail_of(picture: np.ndarray, height: int = THUMB_HEIGHT) -> str:
    """The data URI `thumbnail_uri` makes of a PNG of the (h, w, 3) uint8 `picture`, from the array itself (a
    run that has just drawn an overlay need not decode its file again)."""
    return _thumbnail(Image.fromarray(np.ascontiguousarray(picture, dtype=np.uint8)).convert("RGB"), height)


def _float(x: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("-inf")


def write_gallery(out: PathLike, rows: Sequence[dict], title: str = "fdsl predict",
                  thumbs: Mapping[str, str] | None = None) -> Path:
    """Write ``<out>/index.html``: rows of scores.csv (``path, score, margin, is_anomalous, overlay, ...``)
    sorted by score, highest first, each with a thumbnail of its overlay (inlined), the verdict, score,
    margin, defect area and a link to the overlay file. `thumbs` ({overlay path as in the row: data URI},
    from `thumbnail_of`) spares decoding the overlays this run drew; others are read from their files.
    Returns the page's path."""
    thumbs = thumbs or {}
    out = Path(out)
    items = []
    n_anom = 0
    for r in sorted(rows, key=lambda r: -_float(r.get("score"))):
        verdict = {"1": ("ANOMALOUS", "a"), "0": ("normal", "n")}.get(str(r.get("is_anomalous")), ("no verdict", "u"))
        n_anom += verdict[1] == "a"
        rel = r.get("overlay") or ""
        thumb = (thumbs.get(rel) or thumbnail_uri(out / rel)) if rel else None
        pic = (f'<a href="{html.escape(rel)}"><img src="{thumb}" alt="overlay"></a>' if thumb
               else (f'<a href="{html.escape(rel)}">overlay</a>' if rel else "no overlay"))
        items.append(f"<tr><td class=f>{html.escape(str(r.get('path', '')))}</td>"
                     f"<td><span class='v {verdict[1]}'>{verdict[0]}</span></td>"
                     f"<td class=num>{html.escape(str(r.get('score', '')))}</td>"
                     f"<td class=num>{html.escape(str(r.get('margin', '')))}</td>"
                     f"<td class=num>{html.escape(str(r.get('defect_area_px', '')))}</td><td>{pic}</td></tr>")
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{len(items)} image(s), {n_anom} anomalous; sorted by score, highest first. "
            "margin = score − image threshold. Click a thumbnail for the full overlay.</p>"
            "<table><tr><th>file</th><th>verdict</th><th>score</th><th>margin</th><th>defect px</th>"
            "<th>overlay (image | anomaly map | defect region)</th></tr>" + "".join(items) + "</table></body></html>\n")
    path = out / "index.html"
    atomic_write_text(path, page)
    return path
