"""`fdsl batch` on a two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`): a scoring worker
process killed by its pid mid-run; the job completes and every input has exactly one row."""
from __future__ import annotations

import os
import signal
import time

import pyarrow.parquet as pq
import pytest
from batch_fixtures import add_bad_files, make_images
from fdsl_test_utils import small_calibrated_part

pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    c.add_node(num_cpus=2)
    yield c
    ray.shutdown()
    c.shutdown()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_killed_worker_every_row_exactly_once(cluster, tmp_path):
    from fdsl.batch.job import run_batch

    part = small_calibrated_part(tmp_path)
    imgs = tmp_path / "imgs"
    make_images(imgs, 160, seed=3)
    add_bad_files(imgs)
    killed: list[int] = []

    def kill_first_worker(table) -> None:
        if not killed:  # the first block back: its worker still has batches ahead of it
            pid = int(table.column("worker")[0].as_py().rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    out = tmp_path / "out"
    s = run_batch(part.path, str(imgs), out, address=cluster.address, workers=2, batch_size=4, progress=False,
                  on_rows=kill_first_worker)
    assert killed
    for _ in range(50):
        if not _alive(killed[0]):
            break
        time.sleep(0.1)
    assert not _alive(killed[0])
    rows = pq.read_table(out / "results.parquet").to_pylist()
    paths = [r["path"] for r in rows]
    expected = sorted(str(p) for p in imgs.rglob("*") if p.is_file())
    assert len(paths) == len(set(paths)) == len(expected) == 163 and sorted(paths) == expected
    assert s["n_scored"] == 163 and s["n_errors"] == 3
    assert all(r["score"] is not None for r in rows if not r["error"])
    assert not (out / "parts").exists()  # merged into the one table
