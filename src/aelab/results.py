"""Collect the runs of one or more sweep directories into a table."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

# config keys copied into every row, under the names used in the README
CONFIG_COLUMNS = {
    "task_name": "sweep",
    "recipe": "recipe",
    "ablation": "ablation",
    "data.name": "dataset",
    "regularizer": "regularizer",
    "model.depth": "depth",
    "model.code_dim": "code_dim",
    "model.hidden_dims": "hidden_dims",
    "model.dropout": "dropout",
    "model.activation": "activation",
    "model.batch_norm": "batch_norm",
    "model.l1_weight": "l1_weight",
    "model.l1_target": "l1_target",
    "model.noise_variance": "noise_variance",
    "model.lr": "lr",
    "model.lr_schedule": "lr_schedule",
    "model.weight_decay": "weight_decay",
    "trainer.precision": "precision",
    "data.batch_size": "batch_size",
    "trainer.max_epochs": "max_epochs",
    "seed": "seed",
}


def expected_jobs(sweep_dir: Path) -> int | None:
    """How many jobs the sweep holds, from the `multirun.yaml` Hydra wrote at its start."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    hydra_cfg = OmegaConf.load(path).hydra
    params = hydra_cfg.sweeper.get("params") or {}
    # command-line overrides come last, as they take precedence over the config's
    lines = [*(f"{key}={value}" for key, value in params.items()), *hydra_cfg.overrides.task]
    overrides = OverridesParser.create().parse_overrides(lines)
    by_key = {o.key_or_group: o for o in overrides}
    return math.prod(
        len(list(o.sweep_iterator())) for o in by_key.values() if o.is_sweep_override()
    )


def read_run(run_dir: Path) -> dict:
    """One row: the run's config knobs, its test metrics and where its files are."""
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    row = {name: OmegaConf.select(cfg, key) for key, name in CONFIG_COLUMNS.items()}
    if isinstance(row["hidden_dims"], list | tuple) or OmegaConf.is_list(row["hidden_dims"]):
        row["hidden_dims"] = "-".join(str(d) for d in row["hidden_dims"])
    row["run_dir"] = str(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        return {**row, "status": "failed"}

    metrics = json.loads(metrics_path.read_text())
    times = metrics.get("epoch_times") or []
    row.update(
        status="ok",
        best_checkpoint=locate_checkpoint(run_dir, metrics.get("best_checkpoint")),
        best_val_loss=metrics.get("best_val_loss"),
        epochs=metrics.get("epochs"),
        mean_epoch_time=sum(times) / len(times) if times else None,
    )
    row.update(best_epoch_metrics(run_dir))
    row.update({k: v for k, v in metrics.items() if k.startswith("test/")})
    return row


def locate_checkpoint(run_dir: Path, recorded: str | None) -> str | None:
    """The recorded checkpoint path, or the same file in `run_dir` if the run was moved."""
    if not recorded or Path(recorded).is_file():
        return recorded
    moved = run_dir / "checkpoints" / Path(recorded).name
    return str(moved) if moved.is_file() else recorded


def best_epoch_metrics(run_dir: Path) -> dict:
    """Validation MSE and PSNR at the epoch with the lowest validation loss."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return {}
    history = pd.read_csv(path)
    val = history.dropna(subset=["val/loss"])
    if val.empty:
        return {}
    best = val.loc[val["val/loss"].idxmin()]
    return {"val/mse": float(best["val/mse"]), "val/psnr": float(best["val/psnr"])}


def loss_history(run_dir: str | Path) -> pd.DataFrame:
    """Training and validation loss per epoch of one run (columns epoch, train, val)."""
    history = pd.read_csv(Path(run_dir) / "csv" / "metrics.csv")
    train = history.dropna(subset=["train/loss"]).groupby("epoch")["train/loss"].last()
    val = history.dropna(subset=["val/loss"]).groupby("epoch")["val/loss"].last()
    return pd.DataFrame({"train": train, "val": val}).reset_index()


def collect(sweep_dirs: list[Path]) -> tuple[pd.DataFrame, list[str]]:
    """All runs of the sweeps as rows, and a list of problems (missing or failed jobs)."""
    rows, problems = [], []
    for sweep_dir in sweep_dirs:
        run_dirs = sorted(
            (p.parent.parent for p in sweep_dir.glob("*/.hydra/config.yaml")),
            key=lambda p: (len(p.name), p.name),
        )
        for run_dir in run_dirs:
            row = read_run(run_dir)
            rows.append(row)
            if row["status"] != "ok":
                problems.append(f"{run_dir}: no metrics.json (the job failed or was stopped)")
        expected = expected_jobs(sweep_dir)
        if expected is not None and expected > len(run_dirs):
            problems.append(
                f"{sweep_dir}: {expected - len(run_dirs)} of {expected} jobs never started"
            )
    for problem in problems:
        log.warning("%s", problem)
    return pd.DataFrame(rows), problems
