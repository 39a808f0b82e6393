"""Which normal images become a detector's shots when there are more than `fit --max_shots`.

* ``coreset`` (default): greedy k-center over the images' L2-normalised image-level embeddings: start with the
  image nearest the mean embedding, then repeatedly add the image farthest (cosine distance) from all chosen
  ones. The shots cover the variety of the good parts (poses, lighting, batches) instead of repeating the
  commonest look, which is what a nearest-neighbour memory needs.
* ``even``: every (n/N)-th image of the sorted file list: no feature pass, predictable, good when the folder is
  in time order.
Both are deterministic (no seed).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fdsl.config import SHOT_SELECTIONS as SELECTIONS  # the one list of names, in fdsl.config

if TYPE_CHECKING:
    from fdsl.core.model import FDSL

log = logging.getLogger(__name__)

LARGE_SHOTS = 16  # fitting more shots than this without --max_shots warns (memory and search time grow linearly)
LARGE_BYTES = 2 ** 30  # ... or a projected detector above 1 GiB


def even_indices(n_total: int, n: int) -> list[int]:
    """`n` indices spread evenly over ``range(n_total)``, first and last included (all when n >= n_total)."""
    if n >= n_total:
        return list(range(n_total))
    if n == 1:
        return [0]
    return sorted({int(round(i * (n_total - 1) / (n - 1))) for i in range(n)})


def greedy_coreset(features: torch.Tensor, n: int) -> list[int]:
    """Greedy k-center selection of `n` rows of (N, D) `features` (cosine distance); returns sorted indices.

    The first pick is the row nearest the mean direction; each next pick maximises the distance to its
    nearest already-picked row. Ties go to the lowest index.
    """
    total = features.shape[0]
    if n >= total:
        return list(range(total))
    f = torch.nn.functional.normalize(features.double(), dim=-1)  # (N, D)
    first = int(torch.argmax(f @ torch.nn.functional.normalize(f.mean(0), dim=0)))
    picked = [first]
    dist = 1.0 - f @ f[first]  # (N,) distance to the nearest picked row
    for _ in range(n - 1):
        i = int(torch.argmax(dist))
        picked.append(i)
        dist = torch.minimum(dist, 1.0 - f @ f[i])
    return sorted(picked)


def projected_cost(bytes_one_shot: int, n_shots: int) -> str:
    """A sentence projecting a detector of `n_shots` from one shot's memory size."""
    total = bytes_one_shot * n_shots
    return (f"the detector would hold {n_shots} shots, about {total / 2 ** 30:.2f} GiB of memory banks "
            f"({bytes_one_shot / 2 ** 20:.1f} MiB per shot), and every scored image would search all of them: "
            f"about {n_shots}x the nearest-neighbour search of a 1-shot detector")


def choose_shots(model: FDSL, tf: Any, files: list[tuple[Path, str]], max_shots: int | None, selection: str,
                 batch_size: int) -> tuple[list[tuple[Path, str]], str]:
    """The shots among `files` ((path, name) pairs) and how they were chosen ("all", "coreset", "even").

    Without `max_shots`, more than a few candidates cost one extra 1-shot encoding, to project the detector's
    size and search cost; a large projection is logged as a warning before the full encoding starts.
    """
    from fdsl.data.rgb import load_rgb

    n = len(files)
    if max_shots is None or max_shots >= n:
        if max_shots is None and n > 2:
            one = model.make_memory(model.encode_references(tf(load_rgb(files[0][0]))[None]))
            per_shot = one.nbytes()
            if n > LARGE_SHOTS or per_shot * n > LARGE_BYTES:
                log.warning("fitting on all %d normal images (no --max_shots): %s. Pass --max_shots N (e.g. 8) to "
                            "keep N shots chosen by greedy coreset over the image embeddings", n,
                            projected_cost(per_shot, n))
        return files, "all"
    if selection == "even":
        idx = even_indices(n, max_shots)
    else:
        embeds = []
        for s in range(0, n, batch_size):
            batch = torch.stack([tf(load_rgb(p)) for p, _ in files[s:s + batch_size]])  # (b, 3, S, S)
            embeds.append(model.extract(batch).image_embeds.float().cpu())  # (b, D)
        idx = greedy_coreset(torch.cat(embeds), max_shots)
    log.info("kept %d of %d normal images as shots (%s): %s", len(idx), n, selection,
             ", ".join(files[i][1] for i in idx[:10]) + (" ..." if len(idx) > 10 else ""))
    return [files[i] for i in idx], selection


__all__ = ["SELECTIONS", "choose_shots", "even_indices", "greedy_coreset", "projected_cost"]
