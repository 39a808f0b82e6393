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

from typing import List

import torch

from fdsl.config import SHOT_SELECTIONS as SELECTIONS  # the one list of names, in fdsl.config

LARGE_SHOTS = 16  # fitting more shots than this without --max_shots warns (memory and search time grow linearly)
LARGE_BYTES = 2 ** 30  # ... or a projected detector above 1 GiB


def even_indices(n_total: int, n: int) -> List[int]:
    """`n` indices spread evenly over ``range(n_total)``, first and last included (all when n >= n_total)."""
    if n >= n_total:
        return list(range(n_total))
    if n == 1:
        return [0]
    return sorted({int(round(i * (n_total - 1) / (n - 1))) for i in range(n)})


def greedy_coreset(features: torch.Tensor, n: int) -> List[int]:
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


__all__ = ["SELECTIONS", "even_indices", "greedy_coreset", "projected_cost"]
