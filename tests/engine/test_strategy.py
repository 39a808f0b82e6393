"""fdsl.engine.strategy: outside torchrun the strategy is the plain single-process run, step by step."""
from __future__ import annotations

import pytest
import torch

from fdsl.engine import strategy as strategy_mod
from fdsl.errors import FDSLError


def test_single_process_strategy_is_the_plain_run() -> None:
    s = strategy_mod.current()
    assert type(s) is strategy_mod.SingleProcess and s.is_main and s.tqdm_disable() is None
    assert s.from_main(lambda: 5, "x") == 5 and s.gather("part") == ["part"]
    items = [1, 2]
    assert s.batches(items, "x") is items and s.shard(items, 4) is items
    head = torch.nn.Linear(2, 2)
    assert s.prepare_head(head, 6) is head  # no global-batch check, no sync batch norm
    with pytest.raises(ValueError, match="boom"), s.step("x"):
        raise ValueError("boom")
    assert type(s.failure("diverged")) is FDSLError
    maps, mask = [torch.ones(3, 2)], torch.zeros(3, 1)
    loss, shown, b = s.loss(lambda m, k: m[0].mean() * 2, maps, mask)
    assert loss is shown and float(loss) == 2.0 and b == 3


def test_single_process_loader_draws_the_global_batches_of_one_rank() -> None:
    """The single-process order is what `GlobalBatchSampler` gives one rank of one (the torchrun contract)."""
    s = strategy_mod.SingleProcess()
    ds = list(range(11))
    for epoch in (1, 2):
        got = [b.tolist() for b in s.train_loader(ds, 4, 7, epoch, 0, 8, pin_memory=False)]
        sampler = strategy_mod.GlobalBatchSampler(len(ds), 4, 7, rank_=0, world=1)
        sampler.set_epoch(epoch)
        assert got == list(sampler) and sorted(x for b in got for x in b) == ds
    assert got != [b.tolist() for b in s.train_loader(ds, 4, 7, 1, 0, 8, pin_memory=False)]  # epochs differ
