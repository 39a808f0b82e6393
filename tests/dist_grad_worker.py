"""torchrun worker for tests/integration/test_distributed.py: one training step's gradients, 2 ranks vs 1 process.

Run as ``torchrun --standalone --nproc_per_node 2 tests/dist_grad_worker.py``. For global batches of 5
(split 2 + 3) and of 1 (one rank empty), each rank runs its slice through the DDP-wrapped head with
global-batch batch norms and `global_batch_loss`; rank 0 prints one JSON line with, per batch size, the
largest gradient and batch-norm-statistics differences from the same step in one process, relative to
that tensor's largest magnitude. Gradients that are zero in exact arithmetic (a batch norm's bias right
before a Linear and another batch norm, whose shift that norm cancels) are float noise and left out.
"""
import copy
import json

import torch

from fdsl.config import ModelConfig
from fdsl.core.backbone import register_model_configs
from fdsl.core.losses import fdsl_loss
from fdsl.core.model import FDSL
from fdsl.engine import distributed, strategy


def main() -> None:
    register_model_configs()
    torch.manual_seed(0)
    model = FDSL.from_config(ModelConfig(model="FDSL-Tiny-ViT", pretrained="none", image_size=112,
                                         features_list=[1, 2, 3, 4], few_shot_features=[1, 2, 3, 4]))
    out = {}
    with distributed.session("cpu"):
        r, world = distributed.rank(), distributed.world_size()
        for B in (5, 1):
            g = torch.Generator().manual_seed(B)
            res = [torch.randn(B, 64, 64, generator=g).abs() for _ in range(4)]  # L × (B, N, C)
            mask = (torch.rand(B, 1, 112, 112, generator=g) > 0.8).float()

            single = copy.deepcopy(model)
            single.head.train()
            ref_loss = fdsl_loss(single.training_maps(res, 112), mask)
            ref_loss.backward()

            dist_model = copy.deepcopy(model)
            dist_model.head = strategy.convert_sync_batchnorm(dist_model.head)
            dist_model.head.train()
            step = strategy.ddp_training_maps(dist_model)
            lo, hi = r * B // world, (r + 1) * B // world
            loss, loss_sum, n = strategy.global_batch_loss(fdsl_loss, step([x[lo:hi] for x in res], 112),
                                                              mask[lo:hi])
            loss.backward()

            ref = dict(single.head.named_parameters())
            grads = {k: float((p.grad - ref[k].grad).abs().max() / ref[k].grad.abs().max())
                     for k, p in dist_model.head.named_parameters() if not k.endswith("fbatchNorm.bias")}
            ref_buf = dict(single.head.named_buffers())
            bufs = {k: float((b.double() - ref_buf[k].double()).abs().max() / ref_buf[k].double().abs().max())
                    for k, b in dist_model.head.named_buffers() if b.is_floating_point()
                    and not k.endswith("proj.1.running_mean")}  # shifted by the noise-only bias above
            out[B] = {"slice": [lo, hi], "loss": float(loss_sum / n), "ref_loss": float(ref_loss),
                      "grad": max(grads.values()), "buffers": max(bufs.values()), "n": n}
        if distributed.is_main():
            print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
