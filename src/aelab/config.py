"""Checks on a composed config, so that bad values fail before any data is read."""

from __future__ import annotations

from omegaconf import DictConfig

from aelab.data import DATASETS, NUM_PIXELS
from aelab.errors import ConfigError
from aelab.model import ACTIVATIONS, DEFAULT_HIDDEN_DIMS, LR_SCHEDULES

REGULARIZERS = ("none", "lasso", "dropout")
L1_TARGETS = ("weights", "code")


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate_train_config(cfg: DictConfig) -> None:
    """Raise a one-line ConfigError for the first value outside what the study supports."""
    data, model, trainer = cfg.data, cfg.model, cfg.trainer
    _require(data.name in DATASETS, "data.name", data.name, f"use one of {sorted(DATASETS)}")
    _require(
        cfg.regularizer in REGULARIZERS,
        "regularizer",
        cfg.regularizer,
        f"use one of {REGULARIZERS}",
    )

    depths = sorted(DEFAULT_HIDDEN_DIMS)
    _require(model.depth in depths, "model.depth", model.depth, f"use one of {depths}")
    _require(
        isinstance(model.code_dim, int) and 1 <= model.code_dim < NUM_PIXELS,
        "model.code_dim",
        model.code_dim,
        f"use an integer from 1 to {NUM_PIXELS - 1}",
    )
    if model.hidden_dims is not None:
        _require(
            len(model.hidden_dims) == model.depth - 1
            and all(isinstance(d, int) and d > 0 for d in model.hidden_dims),
            "model.hidden_dims",
            list(model.hidden_dims),
            f"give {model.depth - 1} positive widths for depth {model.depth}, or null",
        )
    _require(
        _is_number(model.dropout) and 0 <= model.dropout < 1,
        "model.dropout",
        model.dropout,
        "use a rate in [0, 1)",
    )
    for key in ("l1_weight", "noise_variance", "weight_decay"):
        value = model[key]
        _require(_is_number(value) and value >= 0, f"model.{key}", value, "use a number >= 0")
    _require(
        model.l1_target in L1_TARGETS, "model.l1_target", model.l1_target, f"use {L1_TARGETS}"
    )
    _require(_is_number(model.lr) and model.lr > 0, "model.lr", model.lr, "use a number > 0")
    for key, allowed in (("activation", sorted(ACTIVATIONS)), ("lr_schedule", LR_SCHEDULES)):
        value = model[key]
        _require(value in allowed, f"model.{key}", value, f"use one of {list(allowed)}")
    _require(
        isinstance(model.batch_norm, bool),
        "model.batch_norm",
        model.batch_norm,
        "use true or false",
    )
    for variance in model.test_variances:
        _require(
            _is_number(variance) and variance >= 0,
            "model.test_variances",
            list(model.test_variances),
            "use a list of numbers >= 0",
        )

    for key, value in (
        ("data.batch_size", data.batch_size),
        ("trainer.max_epochs", trainer.max_epochs),
    ):
        _require(isinstance(value, int) and value > 0, key, value, "use an integer > 0")
    # Lightning's seed_everything accepts what numpy does: an unsigned 32-bit integer
    _require(
        isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool) and 0 <= cfg.seed < 2**32,
        "seed",
        cfg.seed,
        f"use an integer from 0 to {2**32 - 1}",
    )
