"""A once-per-run warning when inputs do not look like the normal images a detector was fitted on.

A grayscale photo scored against colour shots, or a crop of another aspect ratio, gets a whole-image
anomaly: the warning names such files before anyone trusts their verdicts.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from PIL import Image

from fdsl.io import PathLike
from fdsl.outputs.files import sha256_file

log = logging.getLogger(__name__)

ASPECT_TOLERANCE = 1.25  # aspect ratios differing by more than this factor are "strongly" different
AREA_TOLERANCE = 4.0  # so are pixel counts differing by more than this factor
_SHOWN = 10


def _colour(mode: str) -> str:
    """A mode's colour kind: 'gray' (L, I;16, I, F, 1, LA) or 'colour' (RGB, RGBA, P, CMYK, YCbCr, ...)."""
    return "gray" if mode in ("1", "L", "LA", "I", "F") or mode.startswith("I;16") else "colour"


def image_profile(path: PathLike) -> tuple[str, tuple[int, int]] | None:
    """(mode, (W, H) as shown, EXIF orientation applied) from the file's header (nothing is decoded); None
    when it cannot be opened."""
    from fdsl.data.rgb import upright_size

    try:
        with Image.open(path) as img:
            return img.mode, upright_size(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def reference_profile(normal_images: Sequence[dict]) -> dict | None:
    """The normal images' usual colour kind and median size from a detector's ``normal_images`` entries
    (``mode`` and ``size`` recorded at fit time); None for a file written before they were recorded."""
    entries = [n for n in normal_images if n.get("mode") and n.get("size")]
    if not entries:
        return None
    kinds = Counter(_colour(n["mode"]) for n in entries)
    ws = sorted(int(n["size"][0]) for n in entries)
    hs = sorted(int(n["size"][1]) for n in entries)
    return {"colour": kinds.most_common(1)[0][0], "modes": sorted({n["mode"] for n in entries}),
            "size": (ws[len(ws) // 2], hs[len(hs) // 2])}


def differences(profile: dict, mode: str, size: tuple[int, int]) -> list[str]:
    """How one input (mode, (W, H)) differs from the reference `profile`: [] when it does not, strongly."""
    out = []
    if _colour(mode) != profile["colour"]:
        out.append(f"mode {mode} ({_colour(mode)}) vs {'/'.join(profile['modes'])} ({profile['colour']})")
    (w, h), (rw, rh) = size, profile["size"]
    aspect, ref_aspect = w / max(h, 1), rw / max(rh, 1)
    if max(aspect / ref_aspect, ref_aspect / aspect) > ASPECT_TOLERANCE:
        out.append(f"aspect {aspect:.2f} vs {ref_aspect:.2f}")
    elif max(w * h / max(rw * rh, 1), rw * rh / max(w * h, 1)) > AREA_TOLERANCE:
        out.append(f"size {w}x{h} vs {rw}x{rh}")
    return out


def warn_unlike_normals(normal_images: Sequence[dict], inputs: Sequence[tuple[PathLike, str]]) -> dict[str, list[str]]:
    """Log one warning naming the inputs whose colour mode or size/aspect differs from the normal images'.

    Args:
        normal_images: the detector's ``info["normal_images"]``.
        inputs: (path, display name) of each input.
    Returns:
        {display name: [differences]} of the flagged inputs (empty when none, or for old detector files).
    """
    profile = reference_profile(normal_images)
    if profile is None:
        log.debug("the detector file records no mode/size of its normal images: input check skipped")
        return {}
    odd: dict[str, list[str]] = {}
    for path, name in inputs:
        prof = image_profile(path)
        if prof is not None:
            diff = differences(profile, *prof)
            if diff:
                odd[name] = diff
    if odd:
        listed = "; ".join(f"{n} ({', '.join(d)})" for n, d in list(odd.items())[:_SHOWN])
        more = f"; and {len(odd) - _SHOWN} more" if len(odd) > _SHOWN else ""
        log.warning("%d input(s) differ from the normal images the detector was fitted on (%s, median %dx%d); "
                    "their scores may reflect the difference rather than a defect: %s%s", len(odd),
                    "/".join(profile["modes"]), *profile["size"], listed, more)
    return odd


def reused_images(info: dict, paths: Sequence[PathLike]) -> dict[str, list[str]]:
    """Which of `paths` the detector already knows, by sha256: ``{"calibration": [...], "shots": [...]}``.

    Verdicts on calibration images say nothing about unseen parts (the thresholds were set on them); a shot
    scores near zero by construction. Reads each path once; empty lists when the detector records no digests.
    """
    cal = set((info.get("thresholds") or {}).get("calibration_images") or [])
    shots = {e.get("sha256") for e in info.get("normal_images") or [] if isinstance(e, dict)}
    out: dict[str, list[str]] = {"calibration": [], "shots": []}
    if not cal and not shots:
        return out
    for p in paths:
        try:
            digest = sha256_file(p)
        except OSError:
            continue  # unreadable: predict reports it in errors.csv
        if digest in cal:
            out["calibration"].append(str(p))
        if digest in shots:
            out["shots"].append(str(p))
    return out


def warn_known_images(info: dict, paths: Sequence[PathLike]) -> None:
    """Warn when inputs are the detector's calibration images or its shots (known by their sha256)."""
    known = reused_images(info, paths)
    if known["calibration"]:
        n, ex = len(known["calibration"]), ", ".join(known["calibration"][:3])
        log.warning("%d of the %d input image(s) were used by `calibrate` to set the thresholds (%s%s): their "
                    "verdicts and calibrate's FPR / TPR say nothing about parts it has not seen; judge the "
                    "thresholds on other images", n, len(paths), ex, " ..." if n > 3 else "")
    if known["shots"]:
        n, ex = len(known["shots"]), ", ".join(known["shots"][:3])
        log.warning("%d of the %d input image(s) are the detector's own normal shots (%s%s): they score near zero "
                    "by construction", n, len(paths), ex, " ..." if n > 3 else "")
