"""What the entry points share: turning a user error into one line and an exit code."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from aelab.errors import UserError

log = logging.getLogger("aelab")


def run_task(task: Callable[[DictConfig], object], cfg: DictConfig):
    """Run `task`; a UserError becomes one logged line and exit code 2.

    In a multirun the error is raised again instead, so that Hydra records the job as
    failed and goes on with the others.
    """
    try:
        return task(cfg)
    except UserError as err:
        log.error("%s", err)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        sys.exit(2)
