import json
import logging
import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import compose_config, run_script, tiny_overrides

from aelab import training
from aelab.evaluation import evaluate
from aelab.hardware import bfloat16_slowdown
from aelab.training import (
    NVML_GPU_COUNT,
    count_gpus_directly_where_there_are_none,
    train,
    warn_if_bfloat16_is_emulated,
)


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    """One tiny training run on the composed config, shared by the tests below."""
    output_dir = tmp_path_factory.mktemp("train")
    cfg = compose_config("train", tiny_overrides(data_dir, output_dir), output_dir)
    val_psnr = train(cfg)
    return output_dir, val_psnr


def test_train_writes_metrics_checkpoints_and_logs(trained_run):
    output_dir, val_psnr = trained_run
    metrics = json.loads((output_dir / "metrics.json").read_text())

    for variance in ("0.1", "0.25", "0.5", "0.75", "1.0"):
        assert metrics[f"test/psnr_denoised_{variance}"] > 0
        assert metrics[f"test/psnr_noisy_{variance}"] > 0
    # more noise, lower PSNR of the noisy input
    assert metrics["test/psnr_noisy_0.1"] > metrics["test/psnr_noisy_1.0"]
    assert 0 < metrics["test/mse"] < 0.2 and metrics["test/psnr"] > 5
    assert metrics["epochs"] == 3 and len(metrics["epoch_times"]) == 3
    assert val_psnr > 5

    assert Path(metrics["best_checkpoint"]).is_file()
    assert (output_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((output_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (output_dir / "csv" / "metrics.csv").read_text().count("val/loss") == 1


def test_checkpoint_loads_with_weights_only(trained_run):
    output_dir, _ = trained_run
    checkpoint = torch.load(output_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["code_dim"] == 8
    assert checkpoint["hyper_parameters"]["hidden_dims"] == [64, 32]


def test_evaluate_reproduces_the_training_test_metrics(trained_run, data_dir, tmp_path):
    train_dir, _ = trained_run
    trained = json.loads((train_dir / "metrics.json").read_text())
    overrides = [
        f"ckpt_path={trained['best_checkpoint']}",
        f"paths.data_dir={data_dir}",
        "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu",
    ]
    evaluated = evaluate(compose_config("evaluate", overrides, tmp_path))

    for key, value in trained.items():
        if key.startswith("test/"):
            assert evaluated[key] == pytest.approx(value, rel=1e-6), key
    assert json.loads((tmp_path / "metrics.json").read_text()) == evaluated
    assert sorted(p.name for p in tmp_path.glob("denoising_*.png")) == [
        f"denoising_{v}.png" for v in ("0.1", "0.25", "0.5", "0.75", "1.0")
    ]


@pytest.mark.parametrize(
    ("regularizer", "l1_weight", "dropout"), [("lasso", 1e-5, 0.0), ("dropout", 0.0, 0.2)]
)
def test_regularizer_group_sets_the_model(train_config, regularizer, l1_weight, dropout):
    cfg = train_config(f"regularizer={regularizer}")
    assert cfg.regularizer == regularizer
    assert (cfg.model.l1_weight, cfg.model.dropout) == (l1_weight, dropout)
    # a later override still wins over the group
    assert train_config("regularizer=lasso", "model.l1_weight=1e-3").model.l1_weight == 1e-3


@pytest.mark.parametrize("experiment", ["lasso_search", "denoise"])
def test_study_sweeps_use_each_datasets_best_architecture(experiment, tmp_path):
    def model(*overrides: str):
        cfg = compose_config("train", [f"experiment={experiment}", *overrides], tmp_path)
        return cfg.model.depth, cfg.model.code_dim

    assert model("data=mnist") == (3, 50)
    assert model("data=fmnist") == (3, 30)
    assert model("data=fmnist", "model.code_dim=100") == (3, 100)


def test_two_job_multirun_gives_two_run_directories(data_dir, tmp_path):
    overrides = [o for o in tiny_overrides(data_dir, tmp_path) if not o.startswith("hydra.")]
    result = run_script(
        "train.py",
        "-m",
        *overrides,
        "trainer.max_epochs=1",
        "model.code_dim=4,8",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert [p.parent.name for p in metrics] == ["0", "1"]
    checkpoints = [json.loads(p.read_text())["best_checkpoint"] for p in metrics]
    codes = [torch.load(c, weights_only=True)["hyper_parameters"]["code_dim"] for c in checkpoints]
    assert codes == [4, 8]


def test_bad_data_path_gives_one_clear_line(tmp_path):
    empty = tmp_path / "nothing-here"
    result = run_script(
        "train.py",
        f"paths.data_dir={empty}",
        "data.download=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, result.stderr[-2000:]
    assert str(empty / "MNIST" / "raw") in errors[0] and "AELAB_DATA_DIR" in errors[0]
    assert "Traceback" not in result.stderr


def test_recipe_knobs_train_and_evaluate_from_the_checkpoint(train_config, data_dir, tmp_path):
    knobs = ["model.activation=silu", "model.batch_norm=true", "model.lr_schedule=onecycle"]
    cfg = train_config(*knobs, output_dir=tmp_path / "run")
    train(cfg)
    trained = json.loads((tmp_path / "run" / "metrics.json").read_text())
    checkpoint = torch.load(trained["best_checkpoint"], weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    assert (hparams["activation"], hparams["batch_norm"], hparams["lr_schedule"]) == (
        "silu",
        True,
        "onecycle",
    )

    # the batch norm statistics travel in the checkpoint: evaluation gives the same numbers
    overrides = [
        f"ckpt_path={trained['best_checkpoint']}",
        f"paths.data_dir={data_dir}",
        "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu",
    ]
    evaluated = evaluate(compose_config("evaluate", overrides, tmp_path / "eval"))
    assert evaluated["test/mse"] == pytest.approx(trained["test/mse"], rel=1e-6)


@pytest.mark.parametrize(
    ("precision", "slowdown", "warned"),
    [("bf16-mixed", 25.0, True), ("bf16-mixed", 0.5, False), ("32-true", 25.0, False)],
)
def test_bfloat16_is_warned_only_where_the_cpu_emulates_it(
    precision, slowdown, warned, monkeypatch, caplog
):
    trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False)
    monkeypatch.setattr(training, "bfloat16_slowdown", lambda: slowdown)
    with caplog.at_level(logging.WARNING, logger="aelab.training"):
        warn_if_bfloat16_is_emulated(trainer)
    assert ("25x slower than fp32" in caplog.text) == warned
    assert ("use trainer.precision=32-true" in caplog.text) == warned


def test_bfloat16_slowdown_is_a_measured_ratio():
    slowdown = bfloat16_slowdown(size=64, repeats=2)
    assert math.isfinite(slowdown) and slowdown > 0


@pytest.mark.parametrize(("gpus", "counted_by"), [(False, "0"), (True, "1")])
def test_gpus_are_counted_through_nvml_only_where_there_are_some(gpus, counted_by, monkeypatch):
    monkeypatch.setenv(NVML_GPU_COUNT, "1")  # as Lightning sets it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus)
    count_gpus_directly_where_there_are_none()
    assert os.environ[NVML_GPU_COUNT] == counted_by
