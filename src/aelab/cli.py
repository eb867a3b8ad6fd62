"""What the entry points share: user errors as one line and an exit code, sweep reports."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from aelab.errors import ConfigError, UserError

log = logging.getLogger("aelab")

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


class JobFailed(CompactHydraException):
    """A sweep job stopped by a user error; Hydra prints its message without a traceback."""


def run_task(task: Callable[[DictConfig], object], cfg: DictConfig):
    """Run `task`; a UserError becomes one logged line and exit code 2.

    In a multirun it is raised again as a JobFailed, so that Hydra records the job as
    failed, goes on with the others and ends the sweep with that one line.
    """
    try:
        return task(cfg)
    except UserError as err:
        log.error("%s", err)
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            line = job_failure(hydra_cfg.job.num, hydra_cfg.overrides.task, err)
            # Limitation: Hydra ends a sweep with its first failure only; the file has all.
            failures = Path(hydra_cfg.sweep.dir) / "failures.txt"
            raise JobFailed(f"{line} (every failed job is listed in {failures})") from err
        sys.exit(2)


def job_failure(num: int, overrides: list[str], err: BaseException) -> str:
    """One line naming a failed sweep job, its overrides and the reason."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"job {num} ({' '.join(overrides) or 'no overrides'}) failed: {reason}"


def check_group_choices(config_dir: Path, args: list[str]) -> None:
    """Raise a ConfigError for an override that picks a config file that does not exist.

    Hydra reports an unknown option of a config group (`data=bogus`) with a page of text
    about its search path; this names the key, the value and the options in one line.
    Overrides Hydra cannot parse are left for Hydra to report.
    """
    candidates = [a for a in args if not a.startswith("-") and "=" in a]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except Exception:
        return
    for override in overrides:
        group = override.key_or_group
        group_dir = config_dir / group
        # Limitation: Hydra's own groups (hydra/launcher=...) keep Hydra's message.
        if group.startswith("hydra") or override.is_delete() or not group_dir.is_dir():
            continue
        options = sorted(p.stem for p in group_dir.glob("*.yaml"))
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())
        else:
            value = override.value()
            values = [] if value is None else [str(value)]
        for value in values:
            if value not in options:
                raise ConfigError(f"{group}={value!r} is not allowed: use one of {options}")


def exit_on_unknown_choice(config_dir: Path, args: list[str]) -> None:
    """Stop with one logged line and exit code 2 before Hydra composes a bad choice."""
    try:
        check_group_choices(config_dir, args)
    except ConfigError as err:
        # Hydra has not set up logging yet
        logging.basicConfig(format=LOG_FORMAT, stream=sys.stderr)
        log.error("%s", err)
        sys.exit(2)


class SweepReport(Callback):
    """Records every sweep job's outcome in `jobs.jsonl` and failures in `failures.txt`.

    Both lie in the sweep directory and are appended to as each job ends, so they are
    complete even when a job takes the whole sweep down.
    """

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        # the job's whole config: `job_return.hydra_cfg` lacks the keys that the sweep
        # directory interpolates (`paths.log_dir`)
        hydra_cfg = config.hydra
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return
        sweep_dir = Path(hydra_cfg.sweep.dir)
        record = {
            "job": hydra_cfg.job.num,
            "overrides": list(job_return.overrides),
            "status": job_return.status.name.lower(),
            "output_dir": hydra_cfg.runtime.output_dir,
        }
        if job_return.status == JobStatus.FAILED:
            # `return_value` raises a failed job's exception; it is kept in `_return_value`
            err = job_return._return_value
            cause = err.__cause__ if isinstance(err, JobFailed) else err
            line = job_failure(hydra_cfg.job.num, job_return.overrides, cause)
            record["error"] = line
            log.error("%s", line)
            with (sweep_dir / "failures.txt").open("a") as file:
                file.write(line + "\n")
        with (sweep_dir / "jobs.jsonl").open("a") as file:
            file.write(json.dumps(record) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        log.info("sweep finished, every job succeeded: %s", config.hydra.sweep.dir)
