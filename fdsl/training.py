"""Cross-dataset training of the scorers and NAM (METHOD.md §8); resumable, checkpoints written atomically."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import load_head, save_checkpoint
from .config import TrainConfig, config_to_dict
from .datasets import AnomalyDataset, load_reference_images, sample_k_shot, write_k_shot_file
from .errors import FDSLError
from .losses import fdsl_loss
from .memory import MemoryBank
from .model import FDSL
from .run import RunContext
from .utils import seed_everything, setup_logging

log = logging.getLogger(__name__)


def latest_checkpoint(save_path: Path) -> Optional[Path]:
    """The `epoch_N.pth` in `save_path` with the largest N, if any."""
    found = [(int(m.group(1)), p) for p in save_path.glob("epoch_*.pth")
             if (m := re.fullmatch(r"epoch_(\d+)\.pth", p.name))]
    return max(found)[1] if found else None


class Trainer:
    """Runs a `TrainConfig`: memory banks from k train shots per class, loss on the test split."""

    def __init__(self, cfg: TrainConfig, model: Optional[FDSL] = None) -> None:
        self.ctx = RunContext(cfg, cfg.train_data_path, cfg.image_size, model)
        self.cfg = cfg
        self.device, self.root, self.meta, self.classes, self.save_path = (
            self.ctx.device, self.ctx.root, self.ctx.meta, self.ctx.classes, self.ctx.save_path)
        # Reference shots are drawn before the (slow) model build, so a too-large --k_shot fails at once.
        self.shots = {c: sample_k_shot(self.meta, c, cfg.k_shot, cfg.seed) for c in self.classes}
        seed_everything(cfg.seed)
        self.model = self.ctx.build_model()[0]
        self.augment = {"auto": cfg.dataset, "none": None}.get(cfg.augment, cfg.augment)
        if cfg.winmode != "nan":
            log.info("--winmode %s is a test-time branch: training fits the scorers and NAM on the global "
                     "branch, whose weights the window branch shares", cfg.winmode)

    @torch.no_grad()
    def build_banks(self) -> Dict[str, MemoryBank]:
        """k-shot memory banks of every training class (train split, normal images)."""
        write_k_shot_file(self.save_path / "k_shot.txt", self.shots)
        banks = {}
        for c in tqdm(self.classes, desc="memory banks", leave=False, dynamic_ncols=True, disable=None):
            imgs = load_reference_images(self.root, self.shots[c], self.cfg.image_size)  # (k, 3, S, S)
            refs = self.model.encode_references(imgs, self.cfg.batch_size, windows=False)
            banks[c] = self.model.make_memory(refs).global_bank
        return banks

    def run(self) -> List[float]:
        """Train; returns the mean loss of each epoch run now. Resumes from the newest checkpoint."""
        cfg = self.cfg
        self.ctx.write_config()
        head = self.model.head
        opt = torch.optim.Adam(head.parameters(), lr=cfg.learning_rate, betas=(0.5, 0.999))
        start = 1
        last = latest_checkpoint(self.save_path) if cfg.resume else None
        if last is not None:
            meta = load_head(head, last, len(cfg.features_list), cfg.use_nam)
            if meta["optimizer"]:
                opt.load_state_dict(meta["optimizer"])
            start = int(meta["epoch"] or 0) + 1
            log.info("resuming from %s (epoch %d done)", last, start - 1)
            if start > cfg.epoch:
                log.info("all %d epochs already done in %s", cfg.epoch, self.save_path)
                return []
        banks = self.build_banks()
        ds = AnomalyDataset(self.root, "test", self.classes, cfg.image_size, cfg.image_size, meta=self.meta,
                            augment=self.augment, aug_seed=cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        cuda = self.device.type == "cuda"
        losses = []
        for epoch in range(start, cfg.epoch + 1):
            ds.set_epoch(epoch)
            gen.manual_seed(cfg.seed * 1000 + epoch)
            loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                                num_workers=cfg.num_workers, drop_last=False,
                                pin_memory=cuda)  # pinned batches copy to the GPU asynchronously
            head.train()
            total, count = 0.0, 0
            bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epoch}", leave=False, dynamic_ncols=True, disable=None)
            for batch in bar:
                with torch.no_grad():
                    feats = self.model.extract(batch["image"].to(self.device, non_blocking=cuda))
                    res = self.model.batch_residuals(feats, list(batch["cls_name"]), banks)
                maps = self.model.training_maps(res, cfg.image_size)
                loss = fdsl_loss(maps, batch["mask"].to(self.device, non_blocking=cuda))
                if not torch.isfinite(loss):
                    raise FDSLError(f"training diverged at epoch {epoch}: loss {loss.item()}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                b = batch["image"].shape[0]
                total += loss.item() * b
                count += b
                bar.set_postfix(loss=f"{loss.item():.4f}")
            head.eval()
            losses.append(total / max(count, 1))
            log.info("epoch %d/%d: mean loss %.5f over %d samples", epoch, cfg.epoch, losses[-1], count)
            if epoch % cfg.save_freq == 0 or epoch == cfg.epoch:
                path = self.save_path / f"epoch_{epoch}.pth"
                save_checkpoint(path, head, config_to_dict(self.ctx.model_config), epoch, opt)
                log.info("saved %s", path)
        return losses


def train(cfg: TrainConfig, model: Optional[FDSL] = None) -> List[float]:
    """Run `train.py`'s job: log to `<save_path>/log.txt`, train, save checkpoints.

    `model` is an already built model to train (the demo shares one between training and testing).
    """
    Path(cfg.save_path).mkdir(parents=True, exist_ok=True)
    setup_logging(Path(cfg.save_path) / "log.txt")
    return Trainer(cfg, model).run()
