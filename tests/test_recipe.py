"""The training recipes: the study's original kept as it was, and the best one, trained small."""

import json

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf
from torch import nn

from aelab.data import ImageDataModule
from aelab.evaluation import DATAMODULE_KEY, model_from_checkpoint, read_checkpoint
from aelab.training import train

SEED_RECIPE = {
    "model.depth": 3,
    "model.hidden_dims": None,
    "model.code_dim": 100,
    "model.activation": "relu",
    "model.batch_norm": False,
    "model.lr": 1e-3,
    "model.lr_schedule": "constant",
    "model.l1_weight": 0.0,
    "model.dropout": 0.0,
    "data.batch_size": 128,
    "trainer.max_epochs": 10,
    "trainer.precision": "32-true",
}


def selected(cfg, keys) -> dict:
    return {key: OmegaConf.select(cfg, key) for key in keys}


def changed(cfg, reference) -> set[str]:
    """The recipe's keys whose values differ between two configs."""
    ours, theirs = selected(cfg, SEED_RECIPE), selected(reference, SEED_RECIPE)
    return {key for key in SEED_RECIPE if ours[key] != theirs[key]}


@pytest.mark.parametrize("overrides", [[], ["recipe=seed"], ["experiment=seed"]])
def test_seed_recipe_is_the_original_study(overrides, tmp_path):
    cfg = compose_config("train", overrides, tmp_path)
    assert selected(cfg, SEED_RECIPE) == SEED_RECIPE
    assert cfg.recipe == "seed"


def test_best_recipe_changes_only_what_it_names(tmp_path):
    seed = compose_config("train", ["recipe=seed"], tmp_path)
    best = compose_config("train", ["recipe=best"], tmp_path)
    assert changed(best, seed) == {
        "model.hidden_dims",
        "model.activation",
        "model.batch_norm",
        "model.lr",
        "model.lr_schedule",
        "trainer.max_epochs",
    }
    # a command-line override still wins over the recipe
    assert compose_config("train", ["recipe=best", "model.lr=1e-4"], tmp_path).model.lr == 1e-4


@pytest.mark.parametrize(
    ("experiment", "swept"),
    [
        ("seed", {"data", "model.code_dim"}),
        ("best", {"data", "model.code_dim"}),
        ("best_denoise", {"data", "model.noise_variance"}),
        ("best_ablation", {"ablation"}),
    ],
)
def test_recipe_experiments_sweep_their_grid(experiment, swept, tmp_path):
    cfg = compose_config("train", [f"experiment={experiment}"], tmp_path)
    assert set(cfg.hydra.sweeper.params) == swept
    assert cfg.recipe == ("seed" if experiment == "seed" else "best")
    assert cfg.task_name == experiment


@pytest.mark.parametrize(
    "ablation", ["relu", "no_batch_norm", "constant_lr", "seed_widths", "seed_epochs"]
)
def test_each_ablation_takes_one_ingredient_back_to_the_seed(ablation, tmp_path):
    best = compose_config("train", ["recipe=best"], tmp_path)
    seed = compose_config("train", ["recipe=seed"], tmp_path)
    ablated = compose_config("train", ["recipe=best", f"ablation={ablation}"], tmp_path)
    assert ablated.ablation == ablation
    taken_back = changed(ablated, best)
    assert taken_back
    assert selected(ablated, taken_back) == selected(seed, taken_back)


def test_tiny_best_recipe_trains_and_beats_the_tiny_seed_recipe(train_config, tmp_path):
    # both recipes at the tiny widths and for the same number of epochs
    runs = {}
    for recipe in ("seed", "best"):
        output_dir = tmp_path / recipe
        train(train_config(f"recipe={recipe}", "trainer.max_epochs=10", output_dir=output_dir))
        runs[recipe] = output_dir
    metrics = {r: json.loads((d / "metrics.json").read_text()) for r, d in runs.items()}
    assert metrics["best"]["test/mse"] < 0.9 * metrics["seed"]["test/mse"]

    # the model is built and trained the way the recipe says
    checkpoint = read_checkpoint(metrics["best"]["best_checkpoint"])
    model = model_from_checkpoint(checkpoint)
    layers = [*model.encoder, *model.decoder]
    assert any(isinstance(m, nn.BatchNorm1d) for m in layers)
    assert any(isinstance(m, nn.GELU) for m in layers)
    last = torch.load(runs["best"] / "checkpoints" / "last.ckpt", weights_only=True)
    schedule = last["lr_schedulers"][0]
    # one-cycle, stepped after every batch to the end of the run
    assert schedule["total_steps"] == schedule["last_epoch"] > 0

    # and it does better than the best constant guess, the mean training image
    datamodule = ImageDataModule(**{**checkpoint[DATAMODULE_KEY], "download": False})
    datamodule.setup()
    mean_image = datamodule.train_images.mean(dim=0)
    mean_mse = float((datamodule.test_images - mean_image).square().mean())
    assert metrics["best"]["test/mse"] < 0.9 * mean_mse
