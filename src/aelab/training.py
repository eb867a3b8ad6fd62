"""Train one autoencoder from a composed config, test its best checkpoint, save the metrics."""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from aelab.callbacks import EpochTimer
from aelab.config import validate_train_config

log = logging.getLogger(__name__)

# the data are in memory already: worker processes would only add start-up time
warnings.filterwarnings("ignore", message=".*does not have many workers.*")

# steps between redraws of the progress bar: Lightning's default redraws it every step,
# which costs a terminal write and a metrics lookup each time
PROGRESS_BAR_REFRESH_RATE = 50


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    callbacks.append(EpochTimer())
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(TQDMProgressBar(refresh_rate=PROGRESS_BAR_REFRESH_RATE))
    if cfg.early_stopping.enabled:
        callbacks.append(
            EarlyStopping(
                monitor="val/loss",
                patience=cfg.early_stopping.patience,
                min_delta=cfg.early_stopping.min_delta,
            )
        )
    return callbacks


def write_metrics(path: Path, metrics: dict) -> None:
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    log.info("metrics written to %s", path)


def train(cfg: DictConfig) -> float:
    """Fit, test the best checkpoint and write `metrics.json`; return the last val PSNR."""
    validate_train_config(cfg)
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)

    # build the parts of the run
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, _convert_="all")
    callbacks = build_callbacks(cfg)
    loggers = [instantiate(lg) for lg in cfg.logger.values() if lg is not None]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)

    # fit, then test the checkpoint with the best validation loss
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    checkpoint = next(c for c in callbacks if isinstance(c, ModelCheckpoint))
    val_psnr = float(trainer.callback_metrics.get("val/psnr", math.nan))
    test_results = trainer.test(model, datamodule=datamodule, ckpt_path="best")[0]

    # record the results beside the checkpoints
    timer = next(c for c in callbacks if isinstance(c, EpochTimer))
    metrics = {
        **{k: float(v) for k, v in test_results.items()},
        "best_checkpoint": checkpoint.best_model_path,
        "best_val_loss": float(checkpoint.best_model_score),
        "epochs": trainer.current_epoch,
        "epoch_times": timer.epoch_times,
    }
    if trainer.is_global_zero:
        write_metrics(output_dir / "metrics.json", metrics)
        # the HPARAMS tab of TensorBoard: hyperparameters beside the final test metrics
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(model.hparams, test_results)
    return val_psnr
