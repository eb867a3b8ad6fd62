"""Train one autoencoder from a composed config, test its best checkpoint, save the metrics."""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from aelab.callbacks import EpochTimer, RandomState, StopOnNonFiniteLoss
from aelab.checkpoint import DATAMODULE_KEY, AtomicCheckpointIO, read_checkpoint
from aelab.config import validate_train_config
from aelab.data import ImageDataModule
from aelab.errors import CheckpointError
from aelab.hardware import bfloat16_slowdown
from aelab.model import Autoencoder
from aelab.scale import prepare_job

log = logging.getLogger(__name__)

# the data are in memory already: worker processes would only add start-up time
warnings.filterwarnings("ignore", message=".*does not have many workers.*")

# steps between redraws of the progress bar: Lightning's default redraws it every step,
# which costs a terminal write and a metrics lookup each time
PROGRESS_BAR_REFRESH_RATE = 50


# Lightning sets this so that counting GPUs goes through NVML and does not start CUDA in a
# process that may fork
NVML_GPU_COUNT = "PYTORCH_NVML_BASED_CUDA_CHECK"


def count_gpus_directly_where_there_are_none() -> None:
    """Turn off the NVML way of counting GPUs on a machine that has none.

    torch caches the count only once CUDA has started, so without a GPU every optimizer
    step reopens the NVML library to count again: about 0.2 ms a step on a 2-core CPU, 2%
    of a step of the study's model. With no GPU there is no CUDA to start, and the direct
    count is cached.
    """
    if os.environ.get(NVML_GPU_COUNT) == "1" and not torch.cuda.is_available():
        os.environ[NVML_GPU_COUNT] = "0"


# how much slower than fp32 bfloat16 matrix products may be before a run is warned: where
# they are native (AVX512-BF16, AMX) they are faster, emulated they are 20-30x slower
BFLOAT16_SLOWDOWN_WARNING = 4.0


def warn_if_bfloat16_is_emulated(trainer: L.Trainer) -> None:
    """Say so when a run trains in bfloat16 on a CPU that only emulates its products."""
    if not str(trainer.precision).startswith("bf16"):
        return
    if trainer.strategy.root_device.type != "cpu":
        return
    slowdown = bfloat16_slowdown()
    if slowdown > BFLOAT16_SLOWDOWN_WARNING:
        log.warning(
            "trainer.precision=%s is slow here: this CPU multiplies bfloat16 matrices %.0fx "
            "slower than fp32 (no AVX512-BF16 or AMX); use trainer.precision=32-true",
            trainer.precision,
            slowdown,
        )


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    callbacks += [EpochTimer(), RandomState(), StopOnNonFiniteLoss()]
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


# what a resumed run must share with the run that wrote its checkpoint
RESUME_DATA_KEYS = ("name", "batch_size", "val_size", "split_seed")


def check_resume(ckpt_path: str, model: Autoencoder, datamodule: ImageDataModule) -> dict:
    """Read the checkpoint to resume from; raise if it was trained with another config."""
    checkpoint = read_checkpoint(ckpt_path)
    stored = {f"model.{k}": v for k, v in checkpoint["hyper_parameters"].items()}
    stored.update({f"data.{k}": checkpoint[DATAMODULE_KEY].get(k) for k in RESUME_DATA_KEYS})
    current = {f"model.{k}": v for k, v in model.hparams.items()}
    current.update({f"data.{k}": datamodule.hparams[k] for k in RESUME_DATA_KEYS})
    # the test variances only matter after training, so they may change
    differ = [
        f"{key}={stored[key]!r} (this config: {current.get(key)!r})"
        for key in stored
        if key != "model.test_variances" and stored[key] != current.get(key)
    ]
    if differ:
        source = Path(ckpt_path).resolve().parent.parent / ".hydra" / "overrides.yaml"
        where = f" (listed in {source})" if source.is_file() else ""
        raise CheckpointError(
            f"ckpt_path={ckpt_path!r} was trained with {', '.join(differ)}; "
            f"resume with the overrides of the run that wrote it{where}"
        )
    return checkpoint


def log_resume(ckpt_path: str, checkpoint: dict, output_dir: Path) -> None:
    """Say where the interrupted run's files are, since this run writes elsewhere."""
    # Limitation: a resumed run writes to a new run directory, not the interrupted one's.
    source = Path(ckpt_path).resolve()
    run_dir = source.parent.parent if source.parent.name == "checkpoints" else source.parent
    log.info(
        "resuming from %s (after epoch %d, step %d); this run writes to %s, the "
        "interrupted run's logs and checkpoints stay in %s",
        source,
        checkpoint["epoch"],
        checkpoint["global_step"],
        output_dir,
        run_dir,
    )


def write_metrics(path: Path, metrics: dict) -> None:
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    log.info("metrics written to %s", path)


def train(cfg: DictConfig) -> float:
    """Fit, test the best checkpoint and write `metrics.json`; return the last val PSNR."""
    validate_train_config(cfg)
    prepare_job(cfg)
    count_gpus_directly_where_there_are_none()
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    output_dir = Path(cfg.paths.output_dir)
    # Limitation: identical metrics for the same seed are guaranteed on the CPU only.
    L.seed_everything(cfg.seed, workers=True)

    # build the parts of the run, and check a checkpoint to resume from before any data
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, _convert_="all")
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path:
        log_resume(ckpt_path, check_resume(ckpt_path, model, datamodule), output_dir)
    callbacks = build_callbacks(cfg)
    loggers = [instantiate(lg) for lg in cfg.logger.values() if lg is not None]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()]
    )
    warn_if_bfloat16_is_emulated(trainer)

    # fit, then test the checkpoint with the best validation loss
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    checkpoint = next(c for c in callbacks if isinstance(c, ModelCheckpoint))
    val_psnr = float(trainer.callback_metrics.get("val/psnr", math.nan))
    tested = trainer.test(model, datamodule=datamodule, ckpt_path="best", weights_only=True)
    test_results = tested[0]

    # record the results beside the checkpoints
    timer = next(c for c in callbacks if isinstance(c, EpochTimer))
    metrics = {
        **{k: float(v) for k, v in test_results.items()},
        "best_checkpoint": checkpoint.best_model_path,
        "best_val_loss": float(checkpoint.best_model_score),
        "epochs": trainer.current_epoch,
        "epoch_times": timer.epoch_times,
        "seed": cfg.seed,
        "resumed_from": str(Path(ckpt_path).resolve()) if ckpt_path else None,
    }
    if trainer.is_global_zero:
        write_metrics(output_dir / "metrics.json", metrics)
        # the HPARAMS tab of TensorBoard: hyperparameters beside the final test metrics
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(model.hparams, test_results)
    return val_psnr
