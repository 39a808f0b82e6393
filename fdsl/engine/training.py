"""Cross-dataset training of the scorers and NAM (docs/method.md §8); resumable, checkpoints written atomically."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from tqdm import tqdm

from fdsl.config import TrainConfig, config_to_dict, config_warnings, settings
from fdsl.core.checkpoint_io import load_head
from fdsl.core.losses import fdsl_loss
from fdsl.core.memory import MemoryBank
from fdsl.core.model import FDSL
from fdsl.core.runtime import seed_everything
from fdsl.data.datasets import AnomalyDataset, warn_nonbinary_masks
from fdsl.data.shots import load_reference_images, sample_k_shot, write_k_shot_file
from fdsl.engine.checkpoint import save_checkpoint
from fdsl.engine.context import JobContext
from fdsl.engine.signals import interruptible
from fdsl.engine.strategy import current as current_strategy
from fdsl.errors import ConfigError
from fdsl.io import PathLike, prepare_run_dir, setup_logging
from fdsl.options import renamed_settings
from fdsl.progress import bars_shown, progress_lines

log = logging.getLogger(__name__)

# Settings that change no number of a training run: a resumed run may differ in these (and --epoch, to train
# longer). Every other setting must match the run being resumed.
RESUME_NEUTRAL = settings(TrainConfig, resume_neutral=True)


def check_resume_config(saved: dict, current: dict, where: PathLike) -> None:
    """Raise ConfigError when resuming would mix settings: `saved` is the run's config.json, `current` this run's.

    Only settings present in both are compared; `RESUME_NEUTRAL` ones may differ.
    """
    changed = [k for k in current if k in saved and k not in RESUME_NEUTRAL and saved[k] != current[k]]
    if changed:
        k = changed[0]
        more = f" (and {len(changed) - 1} more: {', '.join(changed[1:])})" if len(changed) > 1 else ""
        raise ConfigError(f"{where} records the run being resumed with --{k} {saved[k]} but this run sets "
                          f"--{k} {current[k]}{more}; resuming would mix the two. Use the same settings, another "
                          "--save_path, or --resume 0 to start over")


def latest_checkpoint(save_path: Path) -> Path | None:
    """The `epoch_N.pth` in `save_path` with the largest N, if any."""
    found = [(int(m.group(1)), p) for p in save_path.glob("epoch_*.pth")
             if (m := re.fullmatch(r"epoch_(\d+)\.pth", p.name))]
    return max(found)[1] if found else None


class Trainer:
    """Runs a `TrainConfig`: memory banks from k train shots per class, loss on the test split."""

    def __init__(self, cfg: TrainConfig, model: FDSL | None = None) -> None:
        self.ctx = JobContext(cfg, cfg.train_data_path, cfg.image_size, model)
        self.cfg, self.strategy = cfg, self.ctx.strategy
        self.device, self.root, self.meta, self.classes, self.save_path = (
            self.ctx.device, self.ctx.root, self.ctx.meta, self.ctx.classes, self.ctx.save_path)
        # Reference shots are drawn before the (slow) model build, so a too-large --k_shot fails at once.
        self.shots = {c: sample_k_shot(self.meta, c, cfg.k_shot, cfg.seed) for c in self.classes}
        seed_everything(cfg.seed)
        self.model = self.ctx.build_model()[0]
        self.augment = {"auto": cfg.dataset, "none": None}.get(cfg.augment, cfg.augment)
        self._nonbinary_warned: set = set()
        if cfg.winmode != "nan":
            log.info("--winmode %s is a test-time branch: training fits the scorers and NAM on the global "
                     "branch, whose weights the window branch shares", cfg.winmode)

    def check_resume(self) -> None:
        """Before resuming in --save_path: its config.json must hold this run's settings (see RESUME_NEUTRAL)."""
        path = self.save_path / "config.json"
        try:
            saved = json.loads(path.read_text())
        except FileNotFoundError:
            log.warning("%s has checkpoints but no config.json; cannot check that they used these settings",
                        path.parent)
            return
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path} ({exc}) to check the run being resumed; fix or delete it, "
                              "or pass --resume 0 to start over") from exc
        check_resume_config(renamed_settings(saved) if isinstance(saved, dict) else saved,
                            config_to_dict(self.cfg), path)

    @torch.no_grad()
    def build_banks(self) -> dict[str, MemoryBank]:
        """k-shot memory banks of every training class (train split, normal images)."""
        if self.strategy.is_main:  # one process writes
            write_k_shot_file(self.save_path / "k_shot.txt", self.shots)
        banks = {}
        for c in tqdm(self.classes, desc="memory banks", leave=False, dynamic_ncols=True,
                      disable=self.strategy.tqdm_disable()):
            imgs = load_reference_images(self.root, self.shots[c], self.cfg.image_size,
                                         self.model.backbone.preprocess)  # (k, 3, S, S)
            refs = self.model.encode_references(imgs, self.cfg.batch_size, windows=False)
            banks[c] = self.model.make_memory(refs).global_bank
        return banks

    def run(self) -> list[float]:
        """Train; returns the mean loss of each epoch run now. Resumes from the newest checkpoint.

        Every step that depends on the number of processes is the strategy's (`fdsl.engine.strategy`).
        """
        cfg, strategy = self.cfg, self.strategy
        last = latest_checkpoint(self.save_path) if cfg.resume else None
        if strategy.is_main:  # one process owns the run folder
            prepare_run_dir(self.save_path)
            if last is not None:
                self.check_resume()
            self.ctx.write_config()
        self.model.head = head = strategy.prepare_head(self.model.head, cfg.batch_size)
        opt = torch.optim.Adam(head.parameters(), lr=cfg.learning_rate, betas=(0.5, 0.999))
        start = 1
        last, meta = strategy.from_main(lambda: self._resume_state(last), "reading the checkpoint")
        if last is not None:
            head.load_state_dict(meta["head"])
            if meta["optimizer"]:
                opt.load_state_dict(meta["optimizer"])
            start = int(meta["epoch"] or 0) + 1
            log.info("resuming from %s (epoch %d done)", last, start - 1)
            if start > cfg.epoch:
                log.info("all %d epochs already done in %s", cfg.epoch, self.save_path)
                return []
        banks = self.build_banks()
        ds = AnomalyDataset(self.root, "test", self.classes, cfg.image_size, cfg.image_size, meta=self.meta,
                            augment=self.augment, aug_seed=cfg.seed, norm=self.model.backbone.preprocess)
        cuda = self.device.type == "cuda"
        training_maps = strategy.training_maps(self.model)
        losses = []
        for epoch in range(start, cfg.epoch + 1):
            ds.set_epoch(epoch)
            loader = strategy.train_loader(ds, cfg.batch_size, cfg.seed, epoch, cfg.num_workers, cfg.image_size,
                                           pin_memory=cuda)
            head.train()
            total, count = 0.0, 0
            lines = progress_lines(interruptible(loader), len(loader), f"epoch {epoch}/{cfg.epoch}",
                                   enabled=strategy.is_main and not bars_shown())
            bar = tqdm(lines, total=len(loader), desc=f"epoch {epoch}/{cfg.epoch}", leave=False,
                       dynamic_ncols=True, disable=strategy.tqdm_disable())
            for batch in strategy.batches(bar, f"loading a training batch (epoch {epoch})"):
                warn_nonbinary_masks(batch, self._nonbinary_warned)
                with torch.no_grad():
                    feats = self.model.extract(batch["image"].to(self.device, non_blocking=cuda))
                    res = self.model.batch_residuals(feats, list(batch["cls_name"]), banks)
                maps = training_maps(res, cfg.image_size)
                mask = batch["mask"].to(self.device, non_blocking=cuda)
                loss, shown, b = strategy.loss(fdsl_loss, maps, mask)
                if not torch.isfinite(shown):  # under torchrun every rank sees the same global loss
                    raise strategy.failure(f"training diverged at epoch {epoch}: loss {shown.item()}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += shown.item() * b
                count += b
                bar.set_postfix(loss=f"{shown.item():.4f}")
            head.eval()
            losses.append(total / max(count, 1))
            log.info("epoch %d/%d: mean loss %.5f over %d samples", epoch, cfg.epoch, losses[-1], count)
            if strategy.is_main and (epoch % cfg.save_freq == 0 or epoch == cfg.epoch):  # one process writes
                path = self.save_path / f"epoch_{epoch}.pth"
                save_checkpoint(path, head, config_to_dict(self.ctx.model_config), epoch, opt)
                log.info("saved %s", path)
        return losses

    def _resume_state(self, last: Path | None) -> tuple[Path | None, dict]:
        """The checkpoint to resume from (read once, on rank 0 under torchrun) and its head, optimizer and epoch."""
        if last is None:
            return None, {}
        meta = load_head(self.model.head, last, len(self.cfg.features_list), self.cfg.use_nam)
        return last, {"head": self.model.head.state_dict(), "optimizer": meta["optimizer"], "epoch": meta["epoch"]}


def train(cfg: TrainConfig, model: FDSL | None = None) -> list[float]:
    """Run `train.py`'s job: log to `<save_path>/log.txt`, train, save checkpoints.

    `model` is an already built model to train (the demo shares one between training and testing).
    """
    strategy = current_strategy()  # torchrun: rank 0 prepares the folder and logs; the others report errors only
    setup_logging(prepare_run_dir(cfg.save_path) / "log.txt" if strategy.is_main else None,
                  level=strategy.log_level(), replay=config_warnings(cfg))
    return Trainer(cfg, model).run()
