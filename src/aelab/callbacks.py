"""Callbacks that watch a run: image grids for TensorBoard and time per epoch."""

from __future__ import annotations

import time

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid

from aelab.data import IMAGE_SIDE
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
