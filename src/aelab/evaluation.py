"""Evaluate a trained autoencoder from its checkpoint alone."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image

from aelab.callbacks import image_rows
from aelab.checkpoint import DATAMODULE_KEY, read_checkpoint
from aelab.data import ImageDataModule
from aelab.errors import CheckpointError
from aelab.model import Autoencoder, corrupt, variance_name
from aelab.training import write_metrics

log = logging.getLogger(__name__)


def model_from_checkpoint(checkpoint: dict, **overrides) -> Autoencoder:
    """Rebuild the model from the hyperparameters and weights stored in the checkpoint."""
    model = Autoencoder(**{**checkpoint["hyper_parameters"], **overrides})
    model.load_state_dict(checkpoint["state_dict"])
    return model


@torch.no_grad()
def save_denoising_grids(model: Autoencoder, images: torch.Tensor, output_dir: Path) -> list[Path]:
    """One PNG per test variance: originals, noisy inputs and denoised outputs as rows."""
    model.eval()
    noise = model.fixed_noise(images, batch_idx=0)
    paths = []
    for variance in model.hparams.test_variances:
        noisy = corrupt(images, variance, noise, model.hparams.clip_noisy)
        path = output_dir / f"denoising_{variance_name(variance)}.png"
        save_image(image_rows([images, noisy, model(noisy)]), path)
        paths.append(path)
    return paths


def evaluate(cfg: DictConfig) -> dict:
    """Run the test metrics of a checkpoint and write them, with image grids, to the run dir."""
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise CheckpointError(
            "ckpt_path is missing: give the checkpoint to evaluate, "
            "e.g. ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt"
        )
    checkpoint = read_checkpoint(cfg.ckpt_path)
    output_dir = Path(cfg.paths.output_dir)
    overrides = {}
    if cfg.test_variances is not None:
        overrides["test_variances"] = [float(v) for v in cfg.test_variances]
    model = model_from_checkpoint(checkpoint, **overrides)
    data_hparams = {**checkpoint[DATAMODULE_KEY], "data_dir": cfg.paths.data_dir}
    datamodule = ImageDataModule(**data_hparams)

    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    results = trainer.test(model, datamodule=datamodule)[0]

    metrics = {k: float(v) for k, v in results.items()}
    metrics["checkpoint"] = str(Path(cfg.ckpt_path).resolve())
    write_metrics(output_dir / "metrics.json", metrics)
    images = datamodule.test_images[: cfg.num_images].to(model.device)
    for path in save_denoising_grids(model, images, output_dir):
        log.info("denoising grid written to %s", path)
    return metrics
