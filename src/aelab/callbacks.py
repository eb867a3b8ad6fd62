"""Callbacks that watch a run: image grids, time per epoch, random state and diverging losses."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid

from aelab.data import IMAGE_SIDE
from aelab.errors import DivergedError
from aelab.model import corrupt


def image_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """One grid image from equally long batches of flat images, one batch per row."""
    images = torch.cat(rows).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE).clamp(0.0, 1.0)
    return make_grid(images.cpu(), nrow=rows[0].shape[0], padding=2, pad_value=0.5)


class ReconstructionGrid(Callback):
    """Logs original / noisy / reconstructed validation images after each validation epoch.

    The images and their noise are the same every epoch, so the grids show the model
    learning. The noisy row is left out when the model is trained without noise.
    """

    def __init__(self, num_images: int = 8, seed: int = 0) -> None:
        self.num_images = num_images
        self.seed = seed

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if trainer.sanity_checking or not loggers or not trainer.is_global_zero:
            return
        images = trainer.datamodule.val_images[: self.num_images].to(pl_module.device)
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(self.seed))
        variance = pl_module.hparams.noise_variance
        noisy = corrupt(images, variance, noise.to(images), pl_module.hparams.clip_noisy)
        rows = [images, noisy] if variance > 0 else [images]

        was_training = pl_module.training
        pl_module.eval()
        rows.append(pl_module(rows[-1]))
        pl_module.train(was_training)

        grid = image_rows(rows)
        for logger in loggers:
            logger.experiment.add_image("val/reconstructions", grid, trainer.current_epoch)


class EpochTimer(Callback):
    """Logs the wall time of each training epoch as `train/epoch_time`, in seconds."""

    def __init__(self) -> None:
        self.epoch_times: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        elapsed = time.perf_counter() - self._start
        self.epoch_times.append(elapsed)
        pl_module.log("train/epoch_time", elapsed, on_step=False, on_epoch=True)


class RandomState(Callback):
    """Saves torch's global random state in every checkpoint and restores it on resume.

    The shuffling of the training set, the training noise and dropout all draw from it.
    Lightning restores weights, optimiser and loops but not this state, so without it a
    resumed run would see other batches and other noise than an uninterrupted one.
    """

    def state_dict(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return {"torch": torch.get_rng_state(), "cuda": cuda}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Limitation: exact only for checkpoints written at the end of an epoch; after a
        # mid-epoch one, the rest of the epoch is drawn in a new shuffled order.
        # called while the checkpoint is restored, before the first batch is drawn
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class StopOnNonFiniteLoss(Callback):
    """Stops the run with a DivergedError when the loss becomes NaN or infinite.

    Raising before any later checkpoint is written keeps `last.ckpt` and the best
    checkpoint as they were after the last good epoch. On the CPU each step's loss is read
    right away, which costs nothing there; on a GPU reading it would make the host wait for
    the device at every step, so the epoch's losses are read together after its last batch
    (before validation and the epoch's checkpoints), and the error names the first bad step.
    """

    def __init__(self, every_step: bool | None = None) -> None:
        # None: every step on the CPU, once per epoch elsewhere
        self.every_step = every_step
        self._losses: list[torch.Tensor] = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        every_step = self.every_step
        if every_step is None:
            every_step = pl_module.device.type == "cpu"
        if every_step:
            if not math.isfinite(value := float(loss)):
                self._stop(trainer, pl_module, "training loss", value, trainer.global_step)
            return
        self._losses.append(loss.detach())
        if trainer.is_last_batch:
            self._check_losses(trainer, pl_module)

    def _check_losses(self, trainer: Trainer, pl_module: LightningModule) -> None:
        losses = torch.stack(self._losses)
        self._losses = []
        finite = torch.isfinite(losses)
        if bool(finite.all()):
            return
        first = int((~finite).nonzero()[0])
        # the global step counts the steps done, the last of them this batch's
        step = trainer.global_step - (len(losses) - 1 - first)
        self._stop(trainer, pl_module, "training loss", float(losses[first]), step)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if not trainer.sanity_checking and loss is not None and not math.isfinite(float(loss)):
            self._stop(trainer, pl_module, "validation loss", float(loss), trainer.global_step)

    @staticmethod
    def _stop(
        trainer: Trainer, pl_module: LightningModule, what: str, value: float, step: int
    ) -> None:
        saved = [c.last_model_path for c in trainer.checkpoint_callbacks if c.last_model_path]
        last = saved[0] if saved else trainer.ckpt_path
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise DivergedError(
            f"{what} became {value} at epoch {trainer.current_epoch}, step {step}; "
            f"training stopped and {kept}; try a lower model.lr "
            f"(now {pl_module.hparams.lr:g})"
        )


class BestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that remembers the best score of a run resumed in a new directory.

    Lightning drops the best score when the checkpoint directory changes, so the first
    epoch after a resume would become "best" however bad it was. Here the interrupted
    run's best stays best until a later epoch beats it, and its file is never deleted.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_model_path = state_dict["best_model_path"]
        self.best_model_score = state_dict["best_model_score"]
        self.best_k_models = dict(state_dict.get("best_k_models", {}))
        self.kth_best_model_path = state_dict.get("kth_best_model_path", "")
        self.kth_value = state_dict.get("kth_value", self.kth_value)
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            self.last_model_path = state_dict.get("last_model_path", "")

    def _remove_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        # files of the interrupted run are its record: only delete this run's own
        if Path(filepath).parent == Path(self.dirpath):
            super()._remove_checkpoint(trainer, filepath)
