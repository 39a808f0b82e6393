"""`fdsl batch` on Ray Data: decode in CPU tasks, score in an actor pool, every input exactly once in Parquet.

Output folder (``--out``):
  results.parquet   one row per input image (`stages.TABLE_SCHEMA`), sorted by path, written atomically
  summary.json      counts, anomalies, failures, images/s, workers, the detector and its sha256
  batch_state.json  the detector's sha256 (and a --threshold override): a rerun with another one is refused
  parts/            result blocks of a run in progress (merged into results.parquet at its end)
  masks/, overlays/ PNGs of anomalous images (``--masks``, ``--overlays``)

Exactly once: the driver writes each result block under a name derived from the block's inputs (the sha1 of
its paths and identities), atomically, so a block delivered twice after a retry lands on the same file; the
final merge then keeps one row per path (the newest row whose size/mtime or content hash matches the file
now), checks that every input has its row, and scores any that is missing again before it gives up. A rerun
into the same folder scores only inputs with no row, or whose file changed (size/mtime, and then sha256).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from fdsl.errors import ConfigError, FDSLError
from fdsl.io import PathLike

log = logging.getLogger(__name__)

STATE = "batch_state.json"
RESULTS = "results.parquet"
PARTS = "parts"
STATE_FORMAT = 1
MISSING_ROUNDS = 2  # extra rounds that rescore inputs a finished Ray job returned no row for
DEVICES = ("cpu", "cuda")


# ----------------------------------------------------------------------------- Ray, local by default


def start_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to Ray: with no `address` a local instance on this machine (127.0.0.1, no dashboard, no usage
    statistics); ``auto`` or ``ray://host:10001`` an existing cluster. Returns True when this call started or
    joined Ray (the caller shuts it down), False when Ray was already initialised in this process."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # read by ray.init: nothing is reported anywhere
    import ray

    if ray.is_initialized():
        return False
    common = dict(configure_logging=False, log_to_driver=True,
                  runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    try:
        if not address or address == "local":
            ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **common)
        else:
            ray.init(address=address, **common)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"--address {address or 'local'}: cannot start or join Ray ({exc})") from exc
    return True


# ----------------------------------------------------------------------------- progress


class Progress:
    """One line with images done, rate and ETA (rewritten in place on a terminal, every 5 s otherwise)."""

    def __init__(self, total: int, enabled: bool = True, stream=None) -> None:
        self.total, self.done, self.errors = total, 0, 0
        self.enabled, self.stream = enabled, stream or sys.stderr
        self.t0 = self.last = time.time()
        self.first: tuple[float, int] | None = None  # (time, images) of the first block: the rate is measured
        #                                              from there, so start-up does not skew the ETA
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def line(self) -> str:
        now = time.time()
        if self.first is not None and now > self.first[0] and self.done > self.first[1]:
            rate = (self.done - self.first[1]) / (now - self.first[0])
        else:
            rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        eta_s = "?" if not math.isfinite(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
        return (f"batch: {self.done}/{self.total} images ({100 * self.done / max(self.total, 1):.1f}%), "
                f"{rate:.1f} img/s, ETA {eta_s}, {self.errors} error(s)")

    def update(self, n: int, errors: int, final: bool = False) -> None:
        self.done += n
        self.errors += errors
        now = time.time()
        if self.first is None and n:
            self.first = (now, self.done)
        if self.enabled and (final or now - self.last >= (0.5 if self.tty else 5.0)):
            self.last = now
            print(("\r" if self.tty else "") + self.line(), end="\n" if final or not self.tty else "",
                  file=self.stream, flush=True)


# ----------------------------------------------------------------------------- the table


def _block_name(table) -> str:
    """The file name of a result block, from its inputs (paths and identities): a block delivered again after
    a retry has the same name."""
    h = hashlib.sha1()
    for p, s, m in sorted(zip(table.column("path").to_pylist(), table.column("size").to_pylist(),
                              table.column("mtime_ns").to_pylist()), key=lambda t: t[0]):
        h.update(f"{p}\0{s}\0{m}\n".encode("utf-8", "surrogateescape"))
    return f"part-{h.hexdigest()[:24]}.parquet"


def picture_name(path: str) -> str:
    """A unique, safe file stem for an input's mask/overlay: a digest of the path and its sanitised stem."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem).lstrip(".")[:80] or "_"
    return f"{hashlib.sha1(path.encode('utf-8', 'surrogateescape')).hexdigest()[:12]}_{stem}"


def write_block(out: Path, table) -> Path:
    """Write one result block (`RESULT_SCHEMA`) as ``parts/<name>.parquet`` (`TABLE_SCHEMA`) atomically, its
    masks and overlays as PNGs beside; returns the part file."""
    import pyarrow as pa

    from fdsl.batch.stages import TABLE_SCHEMA
    from fdsl.io import atomic_open

    cols = {"mask": [], "overlay": []}
    for kind, column in (("mask", "mask_png"), ("overlay", "overlay_png")):
        for path, png in zip(table.column("path").to_pylist(), table.column(column).to_pylist()):
            f = out / f"{kind}s" / f"{picture_name(path)}.png"
            if png is None:
                if f.exists():
                    f.unlink()  # an earlier version of this input was anomalous
                cols[kind].append(None)
                continue
            with atomic_open(f, "wb") as fh:
                fh.write(png)
            cols[kind].append(f"{kind}s/{f.name}")
    kept = table.drop_columns(["mask_png", "overlay_png"])
    kept = kept.append_column("mask", pa.array(cols["mask"], pa.string()))
    kept = kept.append_column("overlay", pa.array(cols["overlay"], pa.string())).cast(TABLE_SCHEMA)
    part = out / PARTS / _block_name(table)
    _write_parquet(kept, part)
    return part


def _write_parquet(table, path: Path) -> None:
    import pyarrow.parquet as pq

    from fdsl.io import atomic_path

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_rows(out: Path) -> tuple[list[dict], list[Path]]:
    """Every row of ``results.parquet`` and of the block files in ``parts/`` (duplicates included), and the
    block files read. A block file that cannot be read (not ours) is skipped with a warning."""
    import pyarrow.parquet as pq

    from fdsl.batch.stages import TABLE_SCHEMA

    rows: list[dict] = []
    files = ([out / RESULTS] if (out / RESULTS).is_file() else []) + sorted((out / PARTS).glob("part-*.parquet"))
    parts = []
    for f in files:
        try:
            t = pq.read_table(f, schema=TABLE_SCHEMA)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a foreign or broken file
            if f.name == RESULTS:
                raise ConfigError(f"{f} cannot be read ({exc}); move it away to start over") from exc
            log.warning("skipping the unreadable block %s: %s", f, exc)
            continue
        rows += t.to_pylist()
        if f.name != RESULTS:
            parts.append(f)
    return rows, parts


def best_rows(rows: Sequence[dict], current: dict[str, tuple[int, int] | None]) -> dict[str, dict]:
    """One row per path: among a path's rows, those matching the file's current (size, mtime) first, then
    the newest (`scored_at`). `current` maps this run's inputs to their identity (None: cannot be stat'ed)."""
    best: dict[str, dict] = {}

    def rank(r: dict) -> tuple:
        ident = current.get(r["path"])
        return (ident is not None and (r["size"], r["mtime_ns"]) == tuple(ident), r["scored_at"] or 0.0)

    for r in rows:
        b = best.get(r["path"])
        if b is None or rank(r) > rank(b):
            best[r["path"]] = r
    return best


def is_done(row: dict | None, ident: tuple[int, int] | None, path: str) -> bool:
    """The input needs no scoring: its row matches the file (size and mtime; a file touched since, same size,
    with the recorded sha256), or the file is still missing and the row says so."""
    from fdsl.batch.inputs import sha256_of

    if row is None:
        return False
    if ident is None:
        return row["error"] is not None and row["size"] is None
    if (row["size"], row["mtime_ns"]) == tuple(ident):
        return True
    if row["size"] == ident[0] and row["sha256"] is not None and sha256_of(path) == row["sha256"]:
        row["mtime_ns"] = ident[1]  # touched, same bytes: the merged row takes the new mtime
        return True
    return False


# ----------------------------------------------------------------------------- the state


def check_state(out: Path, detector: Path, digest: str, threshold: float | None) -> dict:
    """The folder's state for this detector; refuses (one line) a folder holding another detector's results."""
    state = {"format": STATE_FORMAT, "detector": str(detector.resolve()), "detector_sha256": digest,
             "threshold_override": threshold}
    try:
        old = json.loads((out / STATE).read_text())
    except FileNotFoundError:
        old = None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--out {out}: {out / STATE} is unreadable ({exc}); delete it only together with "
                          f"{out / RESULTS} and {out / PARTS}") from exc
    if old is None:
        if (out / RESULTS).exists() or any((out / PARTS).glob("*.parquet")):
            raise ConfigError(f"--out {out} holds batch results but no {STATE}: which detector scored them is "
                              "unknown; choose another --out")
        return state
    if not isinstance(old, dict) or old.get("detector_sha256") != digest:
        was = old.get("detector") if isinstance(old, dict) else None
        sha = str(old.get("detector_sha256") if isinstance(old, dict) else "")[:12]
        raise ConfigError(f"--out {out} holds results of another detector ({was}, sha256 {sha}...); --detector "
                          f"{detector} has sha256 {digest[:12]}...: results are not mixed, choose another --out")
    if old.get("threshold_override") != threshold:
        raise ConfigError(f"--out {out} was scored with --threshold {old.get('threshold_override')}, this run "
                          f"gives {threshold}: results are not mixed, choose another --out")
    return state


# ----------------------------------------------------------------------------- the job


def run_batch(detector: PathLike, input: str, out: PathLike, *, address: str | None = None, workers: int = 2,
              batch_size: int = 8, device: str = "cpu", gpus_per_worker: float = 0.0, cpus_per_worker: int = 1,
              threshold: float | None = None, pretrained: str | None = None, masks: bool = True,
              overlays: bool = False, progress: bool = True,
              on_rows: Callable[[object], None] | None = None) -> dict:
    """Score every image of `input` (folder, glob or .txt/.csv list) with `detector` on Ray; returns the summary.

    `workers` scoring actors (each loads the detector once, `cpus_per_worker` CPUs and `gpus_per_worker` GPUs);
    decoding runs as CPU tasks. `on_rows(table)` is called with each result block as it arrives (a pyarrow
    table of `RESULT_SCHEMA`). See the module docstring for the output folder and the exactly-once rules.
    """
    from fdsl.batch.inputs import identity, list_inputs
    from fdsl.batch.stages import detector_digest
    from fdsl.checks import positive_int
    from fdsl.io import atomic_write_json, clean_stale_temp_files, prepare_run_dir
    from fdsl.outputs.thresholds import check_threshold
    from fdsl.outputs.writers import folder_lock

    out, det = Path(out), Path(detector)
    positive_int(workers, "--workers")
    positive_int(batch_size, "--batch_size")
    positive_int(cpus_per_worker, "--cpus_per_worker")
    threshold = check_threshold(threshold, "--threshold")
    if device not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if not (math.isfinite(gpus_per_worker) and gpus_per_worker >= 0):
        raise ConfigError(f"--gpus_per_worker must be a number >= 0, got {gpus_per_worker}")
    if device == "cuda" and gpus_per_worker == 0:
        gpus_per_worker = 1.0
    if device == "cpu" and gpus_per_worker > 0:
        raise ConfigError(f"--gpus_per_worker {gpus_per_worker} with --device cpu: give --device cuda")
    if not det.exists():
        raise ConfigError(f"--detector {str(det)!r} does not exist")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a folder")
    inputs = list_inputs(input, exclude=out)
    digest = detector_digest(det)
    prepare_run_dir(out, "--out", clean=False)
    with folder_lock(out):
        clean_stale_temp_files(out)  # ours now: an earlier owner's leftovers, never a live run's
        state = check_state(out, det, digest, threshold)
        atomic_write_json(out / STATE, state)
        current = {p: identity(p) for p in inputs}
        rows, _ = read_rows(out)
        best = best_rows(rows, current)
        todo = [p for p in inputs if not is_done(best.get(p), current[p], p)]
        n_done_before = len(inputs) - len(todo)
        if n_done_before:
            log.info("resuming: %d of %d input(s) already have their row in %s; scoring %d", n_done_before,
                     len(inputs), out, len(todo))
        seconds, rounds, delivered = 0.0, 0, 0
        t0 = time.time()
        if todo:
            owned = start_ray(address, _local_cpus(workers, cpus_per_worker) if not address else None)
            try:
                missing = todo
                while missing and rounds <= MISSING_ROUNDS:
                    if rounds:
                        log.warning("%d input(s) got no row from the Ray job: scoring them again (round %d)",
                                    len(missing), rounds + 1)
                    got = _score_on_ray(det, missing, out, workers=workers, batch_size=batch_size, device=device,
                                        gpus=gpus_per_worker, cpus=cpus_per_worker, threshold=threshold,
                                        pretrained=pretrained, masks=masks, overlays=overlays, progress=progress,
                                        on_rows=on_rows)
                    delivered += sum(got.values())
                    missing = [p for p in missing if p not in got]
                    rounds += 1
            finally:
                if owned:
                    import ray

                    ray.shutdown()
            if missing:
                raise FDSLError(f"{len(missing)} input(s) got no row after {rounds} Ray job(s) (e.g. {missing[0]}); "
                                f"rerun with the same --out to score only those")
            seconds = time.time() - t0
        final = merge(out, inputs, current)
        n_errors = sum(1 for p in todo if final[p]["error"] is not None)
        summary = _summary(det, digest, inputs, todo, final, seconds, workers, batch_size, device, address,
                           duplicates=delivered - len(todo), rounds=rounds)
        atomic_write_json(out / "summary.json", summary)
        log.info("batch: %d scored, %d already done, %d error row(s); %s", len(todo) - n_errors, n_done_before,
                 n_errors, out / RESULTS)
        return summary


def _local_cpus(workers: int, cpus_per_worker: int) -> int:
    """Logical CPUs of a local Ray: the machine's, and at least the actors' plus one for the decode tasks (the
    actors would otherwise hold every CPU and no image would be decoded)."""
    return max(os.cpu_count() or 1, workers * cpus_per_worker + 1)


def _score_on_ray(det: Path, paths: list[str], out: Path, *, workers: int, batch_size: int, device: str,
                  gpus: float, cpus: int, threshold: float | None, pretrained: str | None, masks: bool,
                  overlays: bool, progress: bool, on_rows) -> dict[str, int]:
    """One Ray Data job over `paths`; result blocks written as they arrive. Returns {path: rows delivered}."""
    import ray
    import ray.data

    from fdsl.batch.stages import DecodeImages, ScoreImages

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our one progress line instead
    n_blocks = max(1, min(math.ceil(len(paths) / batch_size), 100_000))
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=n_blocks)
    kwargs = {"detector": str(det.resolve()), "device": device, "threads": cpus, "threshold": threshold,
              "pretrained": pretrained, "masks": masks, "overlays": overlays}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Ray's notices about its own keyword arguments
        ds = ds.map_batches(DecodeImages(), batch_size=batch_size, batch_format="pyarrow", num_cpus=0.5,
                            max_retries=4)  # a plain instance: Ray runs it as tasks (retried when a worker dies)
        ds = ds.map_batches(ScoreImages, fn_constructor_kwargs=kwargs, batch_size=batch_size,
                            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers),
                            num_cpus=cpus, num_gpus=gpus or None,
                            max_restarts=-1, max_task_retries=-1)  # a dead actor is restarted, its batch retried
    got: dict[str, int] = {}
    bar = Progress(len(paths), progress)
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if table.num_rows == 0:
            continue
        write_block(out, table)
        names = table.column("path").to_pylist()
        fresh = [p for p in names if p not in got]
        for p in names:
            got[p] = got.get(p, 0) + 1
        bar.update(len(fresh), sum(1 for p, e in zip(names, table.column("error").to_pylist())
                                   if e is not None and p in fresh))
        if on_rows is not None:
            on_rows(table)
    bar.update(0, 0, final=True)
    return got


def merge(out: Path, inputs: Sequence[str], current: dict) -> dict[str, dict]:
    """Merge ``results.parquet`` and the block files into one row per path (`best_rows`), check that every
    input has exactly one row, write ``results.parquet`` atomically and delete the merged blocks. Rows of
    earlier runs' other inputs are kept. Returns the rows by path."""
    import pyarrow as pa

    from fdsl.batch.stages import TABLE_SCHEMA

    rows, parts = read_rows(out)
    best = best_rows(rows, current)
    for p in inputs:  # a touched file whose bytes did not change keeps its row, with the new mtime
        r, ident = best.get(p), current.get(p)
        if r is not None and ident is not None and r["size"] == ident[0] and r["mtime_ns"] != ident[1]:
            is_done(r, ident, p)
    missing = [p for p in inputs if p not in best]
    if missing:
        raise FDSLError(f"{len(missing)} input(s) have no row in {out} (e.g. {missing[0]}); rerun with the same "
                        "--out to score them")
    ordered = [best[p] for p in sorted(best)]
    table = pa.Table.from_pylist(ordered, schema=TABLE_SCHEMA)
    if len(set(table.column("path").to_pylist())) != table.num_rows:  # by construction; checked, not assumed
        raise FDSLError(f"internal error: {out / RESULTS} would hold a path twice")
    _write_parquet(table, out / RESULTS)
    for f in parts:
        f.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (out / PARTS).rmdir()  # only when empty
    return best


def _summary(det: Path, digest: str, inputs: Sequence[str], todo: Sequence[str], final: dict[str, dict],
             seconds: float, workers: int, batch_size: int, device: str, address: str | None, duplicates: int,
             rounds: int) -> dict:
    mine = [final[p] for p in inputs]
    errors = [r for r in mine if r["error"] is not None]
    anomalous = sorted((r for r in mine if r["is_anomalous"]), key=lambda r: -r["score"])
    thresholds = sorted({r["threshold"] for r in mine if r["threshold"] is not None})
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:  # pragma: no cover - run_batch needs ray to score anything
        ray_version = None
    return {
        "detector": str(det), "detector_sha256": digest,
        "n_inputs": len(inputs), "n_scored": len(todo), "n_skipped_done": len(inputs) - len(todo),
        "n_rows": len(final), "n_kept_earlier": len(final) - len(inputs),
        "n_ok": len(mine) - len(errors), "n_errors": len(errors), "n_anomalous": len(anomalous),
        "image_threshold": thresholds[0] if len(thresholds) == 1 else (thresholds or None),
        "anomalies": [{"path": r["path"], "score": r["score"], "margin": r["margin"],
                       "defect_area_px": r["defect_area_px"], "mask": r["mask"]} for r in anomalous[:1000]],
        "failures": [{"path": r["path"], "error": r["error"]} for r in errors[:1000]],
        "seconds": round(seconds, 3),
        "images_per_second": round(len(todo) / seconds, 3) if seconds > 0 and todo else None,
        "workers": workers, "batch_size": batch_size, "device": device, "address": address or "local",
        "ray_jobs": rounds, "duplicate_rows_dropped": duplicates,
        "outputs": {"table": RESULTS, "masks": "masks/", "overlays": "overlays/"},
        "ray_version": ray_version,
    }
