"""Settings a job applies before training when it shares the machine or spans several ranks."""

from __future__ import annotations

import logging
import os
import sys

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, read_write

from aelab.errors import ConfigError

log = logging.getLogger(__name__)

BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
# what Lightning's DDP launcher leaves in the environment of the process that started the ranks
RANK_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def set_torch_threads(threads: int | None) -> None:
    """Cap torch's intra-op threads, so that parallel jobs do not oversubscribe the cores."""
    if threads is None:
        return
    torch.set_num_threads(threads)
    log.info("torch uses %d thread(s)", threads)


def launches_ranks(trainer: DictConfig) -> bool:
    """Whether Lightning will start the other ranks by running this script again."""
    # under SLURM every rank is a task of its own, started by srun
    return trainer.strategy == "ddp" and trainer.devices != 1 and "SLURM_NTASKS" not in os.environ


def pin_ranks_to_this_job(trainer: DictConfig) -> None:
    """Make the ranks Lightning starts for DDP run this job alone, in its run directory.

    Lightning starts ranks > 0 with this process's command line plus
    `hydra.run.dir=<run.dir>`. In a multirun that command line is the whole sweep and
    `run.dir` is not the job's directory, so both are narrowed to this job here.
    """
    if not HydraConfig.initialized():
        return  # called outside a Hydra app (the benchmark, a notebook): nothing to narrow
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN or not launches_ranks(trainer):
        return
    if hydra.launcher._target_ != BASIC_LAUNCHER:
        # Limitation: DDP that re-runs the script works in a multirun of the default launcher only
        raise ConfigError(
            "trainer=ddp re-runs train.py for its ranks, which only the default launcher "
            "allows in a multirun; leave out launcher=..., or use launcher=slurm"
        )
    sys.argv = [sys.argv[0], *hydra.overrides.task, "hydra.mode=RUN"]
    with read_write(hydra.run):
        hydra.run.dir = hydra.runtime.output_dir


def prepare_job(cfg: DictConfig) -> None:
    """What a training job sets up before `train`: its thread budget and its DDP ranks."""
    set_torch_threads(cfg.get("torch_threads"))
    pin_ranks_to_this_job(cfg.trainer)


class ReleaseRanks(Callback):
    """After each job of a multirun, end the DDP process group the job started.

    Otherwise the next job of the sweep, in the same process, finds the variables of the
    last one, takes itself for a rank that was started for it and waits on ranks that
    have exited.
    """

    def on_job_end(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or os.environ.get("LOCAL_RANK") != "0":
            return
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name in RANK_VARIABLES:
            os.environ.pop(name, None)
