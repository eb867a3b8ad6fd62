"""Bad input fails early in one line; crashes, blow-ups and failed sweep jobs lose nothing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    CONF_DIR,
    ROOT,
    compose_config,
    make_dataset,
    run_script,
    tiny_overrides,
)
from omegaconf import OmegaConf

from aelab.callbacks import BestCheckpoint, StopOnNonFiniteLoss
from aelab.checkpoint import AtomicCheckpointIO
from aelab.cli import check_group_choices
from aelab.config import validate_train_config
from aelab.errors import CheckpointError, ConfigError, DataError, DivergedError
from aelab.evaluation import evaluate
from aelab.training import train


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if "[ERROR]" in line]


def final_metrics(path: Path) -> dict:
    metrics = json.loads(path.read_text())
    return {k: v for k, v in metrics.items() if k.startswith("test/") or k == "best_val_loss"}


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("model.depth=4", "use one of [3, 5]"),
        ("model.code_dim=0", "from 1 to 783"),
        ("model.code_dim=784", "from 1 to 783"),
        ("model.dropout=1.0", "[0, 1)"),
        ("model.dropout=-0.1", "[0, 1)"),
        ("model.l1_weight=-1e-5", ">= 0"),
        ("model.noise_variance=-0.5", ">= 0"),
        ("model.weight_decay=-0.01", ">= 0"),
        ("data.batch_size=0", "> 0"),
        ("trainer.max_epochs=0", "> 0"),
        ("model.lr=0", "> 0"),
        ("model.lr=-0.001", "> 0"),
        ("seed=-1", "from 0 to 4294967295"),
        ("model.activation=tanh", "use one of ['gelu', 'leaky_relu', 'relu', 'silu']"),
        ("model.lr_schedule=step", "use one of ['constant', 'cosine', 'onecycle']"),
        ("model.batch_norm=1", "use true or false"),
    ],
)
def test_bad_config_value_is_one_line_naming_key_value_and_range(train_config, override, allowed):
    cfg = train_config(override)
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as info:
        validate_train_config(cfg)
    message = str(info.value)
    assert message.startswith(f"{key}={OmegaConf.select(cfg, key)!r} is not allowed: ")
    assert allowed in message and "\n" not in message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data=bogus"], "data='bogus' is not allowed: use one of ['fmnist', 'mnist']"),
        (["regularizer=l2"], "regularizer='l2' is not allowed: use one of ['dropout', 'lasso'"),
        (["model.depth=5", "data=mnist,svhn"], "data='svhn' is not allowed"),
        (["recipe=fast"], "recipe='fast' is not allowed: use one of ['best', 'seed']"),
        (
            ["experiment=gird"],
            "experiment='gird' is not allowed: use one of ['best', 'best_ablation', "
            "'best_denoise', 'denoise', 'grid', 'lasso_search', 'seed']",
        ),
    ],
)
def test_unknown_config_group_option_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        check_group_choices(CONF_DIR, overrides)
    assert str(info.value).startswith(message)


def test_known_config_group_options_pass():
    args = ["-m", "data=mnist,fmnist", "regularizer=lasso", "seed=0", "+foo=1", "hydra.verbose=1"]
    check_group_choices(CONF_DIR, args)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data=bogus", "data='bogus' is not allowed: use one of ['fmnist', 'mnist']"),
        ("model.depth=4", "model.depth=4 is not allowed: use one of [3, 5]"),
    ],
)
def test_bad_config_on_the_command_line_exits_2_with_one_line(tmp_path, override, message):
    result = run_script("train.py", override, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert [line.split(" - ", 1)[1] for line in error_lines(result)] == [message]
    assert "Traceback" not in result.stderr


@pytest.fixture
def broken_data(tmp_path):
    """A fresh copy of the generated datasets that a test may damage."""
    return make_dataset(tmp_path / "data", "mnist")


def test_truncated_data_file_is_named_from_the_command_line(broken_data, tmp_path):
    images = broken_data / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    result = run_script("train.py", *tiny_overrides(broken_data, tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-2000:]
    errors = error_lines(result)
    assert len(errors) == 1 and f"{images}: size is 5000 bytes" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda data: b"\x00\x00\x08\x07" + data[4:], "wrong magic number 0x00000807"),
        (lambda data: data[:8] + (32).to_bytes(4, "big") * 2 + data[16:], "images are 32x32"),
        (lambda data: data[:6], "file is truncated (6 bytes)"),
    ],
)
def test_corrupt_data_file_is_named(broken_data, tmp_path, damage, problem):
    images = broken_data / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(damage(images.read_bytes()))
    cfg = compose_config("train", tiny_overrides(broken_data, tmp_path / "run"), tmp_path / "run")
    with pytest.raises(DataError) as info:
        train(cfg)
    assert str(info.value).startswith(f"{images}: {problem}")


def test_missing_data_files_offline_are_named(broken_data, tmp_path):
    shutil.rmtree(broken_data / "MNIST")
    cfg = compose_config("train", tiny_overrides(broken_data, tmp_path / "run"), tmp_path / "run")
    with pytest.raises(DataError, match="mnist files not found in .*MNIST/raw"):
        train(cfg)


@pytest.fixture
def bad_checkpoints(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint\n")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, foreign)
    return {
        tmp_path / "missing.ckpt": "no such file",
        junk: "is not a readable checkpoint: UnpicklingError",
        foreign: "is not an autoencoder checkpoint written by train.py",
    }


def test_bad_checkpoint_to_resume_from_is_one_line(train_config, bad_checkpoints):
    for path, problem in bad_checkpoints.items():
        with pytest.raises(CheckpointError) as info:
            train(train_config(f"ckpt_path={path}"))
        assert str(info.value).startswith(f"ckpt_path='{path}'") and problem in str(info.value)


def test_resuming_with_other_settings_is_refused_in_one_line(train_config, tmp_path):
    train(train_config("trainer.max_epochs=1", output_dir=tmp_path / "first"))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    cfg = train_config("model.code_dim=4", "data.batch_size=25", f"ckpt_path={last}")
    with pytest.raises(CheckpointError) as info:
        train(cfg)
    assert str(info.value) == (
        f"ckpt_path='{last}' was trained with model.code_dim=8 (this config: 4), "
        "data.batch_size=20 (this config: 25); resume with the overrides of the run that "
        "wrote it"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_checkpoint_to_evaluate_is_one_line(tmp_path, bad_checkpoints):
    with pytest.raises(CheckpointError, match="^ckpt_path is missing: give the checkpoint"):
        evaluate(compose_config("evaluate", [], tmp_path / "eval"))
    for path, problem in bad_checkpoints.items():
        cfg = compose_config("evaluate", [f"ckpt_path={path}"], tmp_path / "eval")
        with pytest.raises(CheckpointError, match=problem):
            evaluate(cfg)
    result = run_script(
        "evaluate.py", f"ckpt_path={tmp_path / 'junk.ckpt'}", f"hydra.run.dir={tmp_path}"
    )
    assert result.returncode == 2 and len(error_lines(result)) == 1
    assert "is not a readable checkpoint" in error_lines(result)[0]


# --- crashes and blow-ups ----------------------------------------------------------------


def test_checkpoint_written_atomically_survives_a_crash_while_writing(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 1}, path)

    def crash_halfway(obj, file):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_resumed_run_keeps_the_interrupted_runs_best_checkpoint(tmp_path):
    old = tmp_path / "old" / "checkpoints" / "best-epoch03.ckpt"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"weights")
    score = torch.tensor(0.1)
    state = {
        "dirpath": str(old.parent),
        "best_model_path": str(old),
        "best_model_score": score,
        "best_k_models": {str(old): score},
        "kth_best_model_path": str(old),
        "kth_value": score,
        "last_model_path": str(old.parent / "last.ckpt"),
    }
    new_dir = tmp_path / "new" / "checkpoints"
    checkpoint = BestCheckpoint(dirpath=new_dir, monitor="val/loss", save_top_k=1)
    checkpoint.load_state_dict(state)

    # a worse epoch after the resume does not become the best, a better one does
    removed = []
    strategy = SimpleNamespace(
        reduce_boolean_decision=lambda d, **_: d, remove_checkpoint=removed.append
    )
    trainer = SimpleNamespace(strategy=strategy)
    assert checkpoint.best_model_path == str(old) and checkpoint.best_model_score == score
    assert not checkpoint.check_monitor_top_k(trainer, torch.tensor(0.2))
    assert checkpoint.check_monitor_top_k(trainer, torch.tensor(0.05))
    # the interrupted run's file is never deleted, this run's own are
    checkpoint._remove_checkpoint(trainer, str(old))
    checkpoint._remove_checkpoint(trainer, str(new_dir / "best-epoch05.ckpt"))
    assert removed == [str(new_dir / "best-epoch05.ckpt")]


@pytest.mark.parametrize("every_step", [True, False], ids=["every-step", "end-of-epoch"])
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    train_config, tmp_path, monkeypatch, every_step
):
    # end-of-epoch: how the losses are read on a GPU, without a host sync per step
    monkeypatch.setattr(StopOnNonFiniteLoss.__init__, "__defaults__", (every_step,))
    cfg = train_config(
        "+callbacks.poison._target_=conftest.PoisonWeights",
        "+callbacks.poison.epoch=1",
        "+callbacks.poison.batch=4",
    )
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(DivergedError) as info:
        train(cfg)
    message = str(info.value)
    assert message.startswith("training loss became nan at epoch 1, step 20;")
    assert f"the last good checkpoint is {last}" in message and "\n" not in message

    kept = torch.load(last, weights_only=True)
    assert kept["epoch"] == 0
    assert all(torch.isfinite(w).all() for w in kept["state_dict"].values())
    assert [p.name for p in last.parent.glob("best-*.ckpt")] == ["best-epoch00.ckpt"]
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_too_high_learning_rate_is_reported_as_divergence(train_config):
    with pytest.raises(DivergedError, match=r"became nan at epoch 0, .*try a lower model\.lr"):
        train(train_config("model.lr=1e6"))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(data_dir, tmp_path):
    # noise and dropout make the result depend on the random state at the resume
    recipe = [
        *tiny_overrides(data_dir, tmp_path)[:-1],
        "trainer.max_epochs=2",
        "model.noise_variance=0.1",
        "regularizer=dropout",
        "seed=7",
    ]
    # the killed run imports its pause callback from conftest
    paths = [str(ROOT / "tests"), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    marker = tmp_path / "paused"
    pause = [
        "+callbacks.pause._target_=conftest.PauseMidEpoch",
        f"+callbacks.pause.marker={marker}",
        "+callbacks.pause.epoch=1",
        "+callbacks.pause.batch=5",
    ]

    def start(run: str, *extra: str) -> subprocess.Popen:
        args = [sys.executable, "train.py", *recipe, f"hydra.run.dir={tmp_path / run}", *extra]
        # output to a file: a full pipe nobody reads would block the run
        with (tmp_path / f"{run}.out").open("w") as out:
            return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=out)

    # the uninterrupted run and the one to kill, side by side
    whole = start("whole")
    killed = start("killed", *pause)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), (tmp_path / "killed.out").read_text()[-2000:]
        killed.send_signal(signal.SIGKILL)
        assert whole.wait(timeout=240) == 0, (tmp_path / "whole.out").read_text()[-2000:]
    finally:
        for process in (whole, killed):
            if process.poll() is None:
                process.kill()
            process.wait()

    # the kill came mid-epoch 1, so the last checkpoint is the one written after epoch 0
    old_run = tmp_path / "killed"
    last = old_run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0
    assert not (old_run / "metrics.json").exists()

    resumed = run_script(
        "train.py", *recipe, f"hydra.run.dir={tmp_path / 'resumed'}", f"ckpt_path={last}", env=env
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert final_metrics(tmp_path / "resumed" / "metrics.json") == final_metrics(
        tmp_path / "whole" / "metrics.json"
    )
    assert f"the interrupted run's logs and checkpoints stay in {old_run}" in resumed.stderr
    assert last.is_file() and (old_run / "train.log").is_file()


# --- sweeps and seeds --------------------------------------------------------------------


def test_sweep_over_seeds_uses_each_seed_and_reports_the_failed_job(data_dir, tmp_path):
    overrides = [o for o in tiny_overrides(data_dir, tmp_path) if not o.startswith("hydra.")]
    # the sweep directory as the default config names it, interpolated from paths.log_dir
    result = run_script(
        "train.py",
        "-m",
        *overrides,
        "trainer.max_epochs=1",
        "seed=0,1,0,-1",
        f"paths.log_dir={tmp_path / 'outputs'}",
    )
    (sweep,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()

    # the failed job is named at the end, the others' results are intact
    assert result.returncode != 0
    last_lines = result.stderr.strip().splitlines()[-3:]
    assert any(line.startswith("job 3 (") and "seed=-1" in line for line in last_lines)
    assert "seed=-1 is not allowed" in result.stderr
    failures = (sweep / "failures.txt").read_text().splitlines()
    assert len(failures) == 1 and failures[0].startswith("job 3 (")
    assert failures[0].endswith(
        "failed: seed=-1 is not allowed: use an integer from 0 to 4294967295"
    )
    jobs = [json.loads(line) for line in (sweep / "jobs.jsonl").read_text().splitlines()]
    assert [job["status"] for job in jobs] == ["completed", "completed", "completed", "failed"]

    # each job ran with its own seed; the same seed gives the same metrics, another does not
    runs = [json.loads((sweep / str(job) / "metrics.json").read_text()) for job in range(3)]
    assert [run["seed"] for run in runs] == [0, 1, 0]
    same, other, again = (final_metrics(sweep / str(job) / "metrics.json") for job in range(3))
    assert same == again
    assert same["test/mse"] != other["test/mse"]
