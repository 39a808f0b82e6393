"""The FastAPI application of `fdsl serve`: one page and a JSON API around a loaded detector.

    GET  /                 the page (self-contained HTML: inspect images, fit a new detector)
    GET  /api/detector     the served detector's metadata
    POST /api/predict      multipart `files` (one or more images) -> [{name, score, map_max, threshold, margin,
                           is_anomalous, defect_area_px, region, overlay_png_base64, input_warnings}], the values
                           of `fdsl predict`; input_warnings: how the image differs from the shots (mode, aspect)
    POST /api/fit          multipart `normal` (shots), `val_normal`, `val_anomalous` images, `max_fpr` -> a new
                           detector fitted with the served head and backbone, calibrated, kept in the work folder
    GET  /api/fitted/{id}  download a fitted detector file; POST /api/fitted/{id}/use serves it instead

The model is loaded once and kept; requests are scored one at a time (a lock) in a worker thread, so the
event loop stays free. Every failure of a request is answered (400 bad upload, 413 past a limit, 500
otherwise, each with a one-line `detail`) and never stops the server.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import logging
import re
import secrets
import shutil
import threading
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from PIL import Image

from fdsl.config import RuntimeConfig
from fdsl.data.images import image_transform
from fdsl.errors import FDSLError
from fdsl.inspect.detector import Detector
from fdsl.io import PathLike
from fdsl.outputs.input_check import differences, reference_profile
from fdsl.outputs.verdicts import overlay_array, png_bytes, verdict_record
from fdsl.serve.uploads import (
    Limits,
    Part,
    UploadError,
    check_request_pixels,
    decode_image,
    display_name,
    parse_multipart,
    pixel_batches,
)

log = logging.getLogger(__name__)

_ID_CHARS = set("0123456789abcdef")


def is_exported(det) -> bool:
    """True for a folder written by `fdsl export` (`fdsl.deploy.ExportedDetector`): it scores, it cannot fit."""
    return not hasattr(det, "model")


def fitted_detector_info(det) -> dict:
    """The detector's own metadata: the `.fdsl` file's, or the ``detector`` record of an export contract."""
    return (det.info.get("detector") or {}) if is_exported(det) else det.info


def detector_metadata(det, name: str) -> dict:
    """What `GET /api/detector` returns: file name, thresholds, model, backbone, checkpoint, normal images;
    ``can_fit`` is false for an exported model (fitting needs the PyTorch detector)."""
    info = fitted_detector_info(det)
    return {"name": name, "can_fit": not is_exported(det),
            "runtime": det.runtime if is_exported(det) else "torch",
            "fdsl_version": info.get("fdsl_version"), "created": info.get("created"),
            "image_threshold": det.image_threshold, "pixel_threshold": det.pixel_threshold,
            "thresholds": det.info.get("thresholds", {}), "cal_image_size": det.cal_image_size,
            "model_config": info.get("model_config") or {}, "backbone": info.get("backbone") or {},
            "checkpoint": info.get("checkpoint", {}),
            "n_normal_images": len(info.get("normal_images") or []),
            "normal_images": [n.get("name") for n in info.get("normal_images") or []]}


def fit_from_images(base: Detector, images: Sequence[Image.Image], names: Sequence[str],
                    digests: Sequence[str], modes: Sequence[str], batch_size: int = 8) -> Detector:
    """A new detector for another part: `base`'s head and backbone, `images` (RGB) as the shots, no thresholds.

    `names`, `digests` (sha256) and `modes` (the uploads' own colour modes) are recorded per shot.

    Encodes exactly as `Detector.fit` does (same transform, `encode_references`, `make_memory`).
    """
    model = base.model
    tf = image_transform(model.cfg.image_size, model.backbone.preprocess)  # the backbone's mean/std
    batch = torch.stack([tf(im) for im in images])  # (k, 3, S, S)
    memory = model.make_memory(model.encode_references(batch, batch_size))
    info = copy.deepcopy(base.info)
    info.update(created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                normal_images=[{"name": n, "sha256": d, "mode": m, "size": list(im.size)}
                               for n, d, m, im in zip(names, digests, modes, images)],
                shots={"selection": "all", "candidates": len(images), "max_shots": None},
                thresholds={"image": None, "pixel": None})
    return Detector(model, memory, info)


def release_freed_memory() -> None:
    """Hand memory freed by a request back to the OS (glibc keeps it in per-thread arenas otherwise, so parallel
    requests on other worker threads would each keep their own peak). No-op where glibc is absent."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


FITTED_NAME = re.compile(r"[0-9a-f]{16}\.fdsl")


class Service:
    """The server's state: the detector in use, its lock, the work folder, the upload limits, and the detectors
    fitted on the page (at most `max_fitted` files in ``<workdir>/fitted/``, the newest kept, found again at
    restart)."""

    def __init__(self, detector, name: str, workdir: Path, limits: Limits,
                 batch_size: int = 8, runtime: RuntimeConfig | str = "cpu",
                 pretrained: str | None = None, max_fitted: int = 20) -> None:
        self.detector, self.name = detector, name
        self.runtime = runtime
        self.pretrained = pretrained
        self.workdir = workdir
        self.limits = limits
        self.batch_size = batch_size
        self.max_fitted = max_fitted
        self.lock = threading.Lock()
        self.served_path: Path | None = None  # the fitted file in use, never removed while it is
        folder = workdir / "fitted"
        found = sorted((p for p in folder.glob("*.fdsl") if FITTED_NAME.fullmatch(p.name) and p.is_file()),
                       key=lambda p: (p.stat().st_mtime, p.name)) if folder.is_dir() else []
        self.fitted: dict[str, Path] = {p.stem: p for p in found}  # oldest first
        self._prune()
        if self.fitted:
            log.info("%d detector(s) fitted earlier are in %s", len(self.fitted), folder)

    def _prune(self) -> None:
        """Remove the oldest fitted detectors beyond `max_fitted` (the one in use is kept)."""
        for fid in list(self.fitted):
            if len(self.fitted) <= self.max_fitted:
                break
            path = self.fitted[fid]
            if path == self.served_path:
                continue
            del self.fitted[fid]
            path.unlink(missing_ok=True)
            log.info("removed the fitted detector %s: at most %d are kept (--max_fitted)", path, self.max_fitted)

    # ------------------------------------------------------------------ work (in a worker thread)
    def predict(self, parts: list[Part]) -> list[dict]:
        """Score the uploaded images as `fdsl predict` does; one record per file, in order.

        The request's pixels are counted from the headers first (413 past `max_request_pixels`); then, under
        the scoring lock, images are decoded and scored in batches of at most `batch_size` images and
        `batch_pixels` pixels, so one request, or many in parallel, hold one batch of decoded images at a time.
        """
        files = [p for p in parts if p.filename is not None and p.field == "files"]
        if not files:
            raise UploadError(400, "no images: send one or more files in the multipart field 'files'")
        names = [display_name(p.filename or "") for p in files]
        sizes = check_request_pixels([(n, p.data) for n, p in zip(names, files)], self.limits)
        with self.lock:
            det = self.detector
            thr, pix = det.image_threshold, det.pixel_threshold
            profile = reference_profile(fitted_detector_info(det).get("normal_images") or [])
            out = []
            for idx in pixel_batches(sizes, self.batch_size, self.limits):
                chunk = []
                for i in idx:
                    chunk.append((names[i], *decode_image(files[i].data, names[i], self.limits)))
                    files[i].data = bytearray()  # the upload's bytes are no longer needed
                preds = det.score_images([im for _, im, _ in chunk], threshold=thr)
                for (name, im, mode), pr in zip(chunk, preds):
                    rec = {"name": name, **verdict_record(pr, thr)}
                    rec["overlay_png_base64"] = base64.b64encode(
                        png_bytes(overlay_array(im, pr, name, thr, pix))).decode("ascii")
                    rec["input_warnings"] = differences(profile, mode, im.size) if profile else []
                    out.append(rec)
                del chunk, preds
            release_freed_memory()
        return out

    def fit(self, parts: list[Part]) -> dict:
        """Fit and calibrate a detector from uploads; it is written to `<workdir>/fitted/<id>.fdsl`.

        Validation images are decoded one at a time (under the lock) into the job folder; the shots are held.
        """
        if is_exported(self.detector):
            raise UploadError(400, f"fitting needs the PyTorch detector: this server runs the exported model "
                                   f"{self.name!r} (fdsl export), which only scores; serve a .fdsl detector file "
                                   "(fdsl serve --detector part.fdsl) to fit new ones")
        groups: dict[str, list] = {"normal": [], "val_normal": [], "val_anomalous": []}
        fields = {p.field: bytes(p.data).decode("utf-8", "replace").strip() for p in parts if p.filename is None}
        for p in parts:
            if p.filename is not None and p.field in groups:
                groups[p.field].append((display_name(p.filename), p))
        if not groups["normal"]:
            raise UploadError(400, "no good images: send the shots in the multipart field 'normal'")
        if not groups["val_normal"]:
            raise UploadError(400, "no validation images: send good validation images in 'val_normal' "
                                   "(other than the shots) to set the thresholds")
        max_fpr: float | None = None
        if fields.get("max_fpr"):
            try:
                max_fpr = float(fields["max_fpr"])
            except ValueError as exc:
                raise UploadError(400, f"max_fpr must be a number, got {fields['max_fpr']!r}") from exc
        if max_fpr is None and not groups["val_anomalous"]:
            raise UploadError(400, "give defect validation images ('val_anomalous') or a max_fpr")
        check_request_pixels([(n, p.data) for g in groups.values() for n, p in g], self.limits)
        job = self.workdir / "jobs" / secrets.token_hex(8)
        try:
            with self.lock:
                folders = {}
                for key in ("val_normal", "val_anomalous"):  # calibration reads files: generated names only
                    folder = job / key
                    folder.mkdir(parents=True)
                    for i, (name, p) in enumerate(groups[key]):
                        decode_image(p.data, name, self.limits)[0].save(folder / f"{i:04d}.png", format="PNG")
                        p.data = bytearray()
                    folders[key] = folder
                shots = [(name, *decode_image(p.data, name, self.limits), hashlib.sha256(p.data).hexdigest())
                         for name, p in groups["normal"]]
                names, ims, modes, digests = zip(*shots)
                det = fit_from_images(self.detector, ims, names, digests, modes, self.batch_size)
                del shots, ims
                rep = det.calibrate(folders["val_normal"],
                                    folders["val_anomalous"] if groups["val_anomalous"] else None,
                                    max_fpr=max_fpr, batch_size=self.batch_size)
            fid = secrets.token_hex(8)
            path = det.save(self.workdir / "fitted" / f"{fid}.fdsl")
            self.fitted[fid] = path
            self._prune()
        finally:
            shutil.rmtree(job, ignore_errors=True)
        keep = ("n_normal", "n_anomalous", "image", "pixel", "image_method", "pixel_method", "image_fpr",
                "image_tpr", "image_f1")
        from fdsl.outputs.report import small_set_warnings

        return {"id": fid, "download": f"/api/fitted/{fid}", "n_shots": len(groups["normal"]),
                "calibration": {k: rep[k] for k in keep if k in rep},
                "warnings": small_set_warnings(rep["n_normal"], rep["n_anomalous"]),
                "kept": f"the {self.max_fitted} newest fitted detectors are kept in {self.workdir / 'fitted'}"}

    def use(self, fid: str) -> dict:
        """Serve the fitted detector `fid` from now on; returns its metadata."""
        path = self.fitted.get(fid)
        if path is None or not path.is_file():
            raise UploadError(404, f"no fitted detector {fid!r} in this session")
        with self.lock:
            self.detector = Detector.load(path, runtime=self.runtime, pretrained=self.pretrained)
            self.name = path.name
            self.served_path = path
        return detector_metadata(self.detector, self.name)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message})


def create_app(detector, name: str = "detector.fdsl", workdir: PathLike = "fdsl_serve",
               limits: Limits | None = None, batch_size: int = 8,
               runtime: RuntimeConfig | str = "cpu", allowed_hosts: Sequence[str] | None = None,
               pretrained: str | None = None, max_fitted: int = 20) -> FastAPI:
    """The web application around a loaded `detector`; fitted detectors and calibration scratch go to `workdir`.

    Args:
        detector: loaded once here and kept for every request: a `Detector`, or an `ExportedDetector` (a folder
            written by `fdsl export`; it scores, and the fit tab says fitting needs the PyTorch detector).
        name: the detector's file name, shown on the page.
        workdir: the only folder the server writes to (fitted detectors, temporary validation images).
        limits: files per request, bytes per file, pixels per image and per request, pixels decoded at once.
        max_fitted: detectors fitted on the page kept in ``<workdir>/fitted/`` (the oldest are removed).
        runtime: how a fitted detector is loaded when the page switches to it (a `RuntimeConfig` or a device).
        pretrained: the backbone weights file the served detector was loaded with (``--pretrained``), used
            for the detectors fitted on the page too (they share its backbone).
        allowed_hosts: the ``Host`` headers answered (``127.0.0.1:8000``, ...), against DNS rebinding; None
            answers any. Independently, a request whose ``Origin`` is another site than its ``Host`` is refused
            (403): a page elsewhere cannot make the browser post images or fit detectors here.
    """
    service = Service(detector, name, Path(workdir), limits or Limits(), batch_size, runtime, pretrained,
                      max_fitted)
    app = FastAPI(title="FDSL inspection", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    page = resources.files("fdsl.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    @app.middleware("http")
    async def same_site_only(request: Request, call_next):
        host = request.headers.get("host", "").lower()
        if hosts is not None and host not in hosts:
            return _error(403, f"unexpected Host header {host!r}: open the page at http://{sorted(hosts)[0]}/")
        origin = request.headers.get("origin")
        if origin is not None and origin.lower() not in (f"http://{host}", f"https://{host}"):
            return _error(403, f"cross-site request from {origin!r} refused")
        return await call_next(request)

    async def run(request: Request, work) -> JSONResponse:
        try:
            parts = await parse_multipart(request.headers.get("content-type", ""), request.stream(),
                                          service.limits)
            return JSONResponse(await anyio.to_thread.run_sync(work, parts))
        except UploadError as exc:
            return _error(exc.status, str(exc))
        except FDSLError as exc:
            return _error(400, str(exc))
        except Exception as exc:  # noqa: BLE001  one request's failure never stops the server
            log.exception("request %s failed", request.url.path)
            return _error(500, f"{type(exc).__name__}: {exc}")

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/api/detector")
    def get_detector() -> dict:
        return detector_metadata(service.detector, service.name)

    @app.post("/api/predict")
    async def post_predict(request: Request) -> JSONResponse:
        return await run(request, service.predict)

    @app.post("/api/fit")
    async def post_fit(request: Request) -> JSONResponse:
        return await run(request, service.fit)

    def _fitted(fid: str) -> Path | None:
        return service.fitted.get(fid) if set(fid) <= _ID_CHARS else None

    @app.get("/api/fitted/{fid}")
    def get_fitted(fid: str):
        path = _fitted(fid)
        if path is None:
            return _error(404, f"no fitted detector {fid!r} in this session")
        return FileResponse(path, filename=f"fitted_{fid}.fdsl", media_type="application/octet-stream")

    @app.post("/api/fitted/{fid}/use")
    async def use_fitted(fid: str) -> JSONResponse:
        if _fitted(fid) is None:
            return _error(404, f"no fitted detector {fid!r} in this session")
        try:
            return JSONResponse(await anyio.to_thread.run_sync(service.use, fid))
        except Exception as exc:  # noqa: BLE001
            log.exception("switching detector failed")
            return _error(500, f"{type(exc).__name__}: {exc}")

    return app


__all__ = ["create_app", "detector_metadata", "fit_from_images", "Service"]
