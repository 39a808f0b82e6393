"""Bounded, in-memory multipart parsing for the web app: uploads never touch the disk under their own names.

Starlette's own form parser spools files above 1 MB to the system temp folder; this one keeps every part in
memory, stops at `max_files` files of at most `max_file_bytes` each, and rejects a body above the total.
"""
from __future__ import annotations

import io
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath

from PIL import Image, UnidentifiedImageError

from fdsl.data.images import to_rgb, upright
from fdsl.errors import DataError


class UploadError(Exception):
    """A request the server refuses: `status` is the HTTP code (400, 413), the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Part:
    """One multipart part: its field name, the browser's file name (None for a plain field) and its bytes."""

    field: str
    filename: str | None
    data: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True)
class Limits:
    """Upload limits: files per request, bytes per file, pixels per image, pixels per request; and the bound on
    the pixels decoded at once (a scoring batch holds at most `batch_pixels`, or one image when it is larger)."""

    max_files: int = 64
    max_file_bytes: int = 20 * 2 ** 20
    max_pixels: int = 50_000_000
    max_request_pixels: int = 100_000_000
    batch_pixels: int = 16_000_000

    @property
    def max_body_bytes(self) -> int:
        return self.max_files * (self.max_file_bytes + 4096) + 65536


def display_name(filename: str) -> str:
    """The base name of an uploaded file, for display only (never used as a path), at most 200 characters."""
    base = PureWindowsPath(PurePosixPath(filename).name).name
    base = "".join(ch for ch in base if ch.isprintable())
    return base[:200] or "upload"


async def parse_multipart(content_type: str, stream: AsyncIterator[bytes], limits: Limits) -> list[Part]:
    """Parse a multipart/form-data body from `stream`; returns its parts in order.

    Raises:
        UploadError: 400 for a body that is not multipart, 413 past a limit.
    """
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(400, "send the images as multipart/form-data (an HTML form or curl -F files=@a.png)")
    parts: list[Part] = []
    headers: dict[bytes, bytes] = {}
    cur = {"name": b"", "value": b""}
    n_files = 0

    def on_part_begin() -> None:
        headers.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        cur["name"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        cur["value"] += data[start:end]

    def on_header_end() -> None:
        headers[cur["name"].lower()] = cur["value"]
        cur["name"], cur["value"] = b"", b""

    def on_headers_finished() -> None:
        nonlocal n_files
        _, opts = parse_options_header(headers.get(b"content-disposition", b""))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        filename = opts[b"filename"].decode("utf-8", "replace") if b"filename" in opts else None
        if filename is not None:
            n_files += 1
            if n_files > limits.max_files:
                raise UploadError(413, f"too many files: at most {limits.max_files} per request")
        parts.append(Part(name, filename))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = parts[-1]
        part.data += data[start:end]
        cap = limits.max_file_bytes if part.filename is not None else 65536
        if len(part.data) > cap:
            what = f"file {display_name(part.filename)!r}" if part.filename is not None else f"field {part.field!r}"
            raise UploadError(413, f"{what} is larger than {cap // 2 ** 20 or 1} MiB")

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data})
    total = 0
    try:
        async for chunk in stream:
            total += len(chunk)
            if total > limits.max_body_bytes:
                raise UploadError(413, f"request larger than {limits.max_body_bytes // 2 ** 20} MiB")
            parser.write(chunk)
        parser.finalize()
    except UploadError:
        raise
    except Exception as exc:  # python_multipart's parse errors
        raise UploadError(400, f"malformed multipart body: {exc}") from exc
    return parts


def image_pixels(data: bytes, name: str, limits: Limits) -> int:
    """W·H of an uploaded image, read from its header only (nothing decoded).

    Raises:
        UploadError: 400 naming the file when it is empty, not an image, or has more than `max_pixels`.
    """
    if not data:
        raise UploadError(400, f"{name!r} is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except UnidentifiedImageError as exc:
        raise UploadError(400, f"{name!r} is not an image (no format Pillow reads: PNG, JPEG, BMP, TIFF, ...)") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UploadError(400, f"{name!r} is not a readable image ({type(exc).__name__}: {exc}); "
                               "it is corrupt or truncated") from exc
    if w * h > limits.max_pixels:
        raise UploadError(400, f"{name!r} has {w}x{h} pixels, more than {limits.max_pixels}")
    return w * h


def check_request_pixels(items: list[tuple[str, bytes]], limits: Limits) -> list[int]:
    """Pixels of each (name, bytes) upload, from the headers; the request's total within `max_request_pixels`.

    Raises:
        UploadError: 400 for an unreadable image, 413 naming the per-request pixel budget.
    """
    sizes = [image_pixels(data, name, limits) for name, data in items]
    total = sum(sizes)
    if total > limits.max_request_pixels:
        raise UploadError(413, f"the request's {len(items)} images hold {total / 1e6:.1f} megapixels, more than "
                               f"the per-request pixel budget of {limits.max_request_pixels / 1e6:g} megapixels "
                               "(fdsl serve --max_request_mp); send fewer or smaller images per request")
    return sizes


def pixel_batches(sizes: list[int], batch_size: int, limits: Limits) -> list[list[int]]:
    """Indices of the uploads in scoring batches of at most `batch_size` images and `batch_pixels` pixels
    (an image larger than `batch_pixels` alone), in order."""
    out: list[list[int]] = []
    cur: list[int] = []
    px = 0
    for i, n in enumerate(sizes):
        if cur and (len(cur) >= batch_size or px + n > limits.batch_pixels):
            out.append(cur)
            cur, px = [], 0
        cur.append(i)
        px += n
    if cur:
        out.append(cur)
    return out


def decode_image(data: bytes, name: str, limits: Limits) -> tuple:
    """Decode uploaded bytes as an image; returns (RGB PIL image, the file's own mode).

    Raises:
        UploadError: 400 naming the file when it is not a readable image or has too many pixels.
    """
    if not data:
        raise UploadError(400, f"{name!r} is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > limits.max_pixels:
                raise UploadError(400, f"{name!r} has {w}x{h} pixels, more than {limits.max_pixels}")
            img.load()
            raw = upright(img)  # EXIF orientation applied, as `fdsl predict` (load_rgb) does
    except UploadError:
        raise
    except UnidentifiedImageError as exc:
        raise UploadError(400, f"{name!r} is not an image (no format Pillow reads: PNG, JPEG, BMP, TIFF, ...)") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UploadError(400, f"{name!r} is not a readable image ({type(exc).__name__}: {exc}); "
                               "it is corrupt or truncated") from exc
    try:
        return to_rgb(raw, name), raw.mode
    except DataError as exc:
        raise UploadError(400, str(exc)) from exc
