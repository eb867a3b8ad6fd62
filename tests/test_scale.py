"""Scaling out through Lightning's and Hydra's own engines: DDP, launchers, Optuna."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import TINY, compose_config, run_script
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from aelab.data import ImageDataModule
from aelab.errors import ConfigError
from aelab.evaluation import evaluate
from aelab.scale import pin_ranks_to_this_job


def sweep_overrides(data_dir: Path, sweep_dir: Path) -> list[str]:
    return [*TINY, f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep_dir}"]


def job_metrics(sweep_dir: Path) -> dict[str, dict]:
    """metrics.json of every job of a sweep, by job number."""
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")}


def batch_rows(loader) -> list[list[int]]:
    """The rows of every batch the loader's sampler yields (lists, tensors or slices)."""
    rows = []
    for batch in loader.sampler:
        if isinstance(batch, slice):
            batch = range(batch.start, batch.stop)
        rows.append([int(row) for row in batch])
    return rows


def sharded(data_dir: Path, world_size: int, **hparams) -> list[ImageDataModule]:
    """One data module per rank, set up as under DDP."""
    modules = []
    for rank in range(world_size):
        datamodule = ImageDataModule(data_dir=str(data_dir), val_size=100, **hparams)
        strategy = SimpleNamespace(root_device=torch.device("cpu"))
        datamodule.trainer = SimpleNamespace(
            world_size=world_size, global_rank=rank, strategy=strategy
        )
        datamodule.setup()
        modules.append(datamodule)
    return modules


def test_data_module_gives_each_rank_its_own_batches(data_dir):
    ranks = sharded(data_dir, 2, batch_size=20, eval_batch_size=30)

    # training: disjoint halves of the 300 training images, the same number of steps
    train = [sum(batch_rows(dm.train_dataloader()), []) for dm in ranks]
    assert len(train[0]) == len(train[1]) == 150
    assert sorted(train[0] + train[1]) == list(range(300))
    # a new epoch reshuffles
    loader = ranks[0].train_dataloader()
    loader.sampler.set_epoch(1)
    assert sum(batch_rows(loader), []) != train[0]

    # validation and test: the batches of one process, dealt out in turn, each image once
    whole = [list(range(start, min(start + 30, 100))) for start in range(0, 100, 30)]
    for stage in ("val", "test"):
        batches = [batch_rows(getattr(dm, f"{stage}_dataloader")()) for dm in ranks]
        assert batches == [whole[0::2], whole[1::2]], stage

    # the loaders still yield whole batches of flat images
    assert next(iter(ranks[1].train_dataloader())).shape == (20, 784)


def test_data_module_refuses_a_rank_without_evaluation_batches(data_dir):
    with pytest.raises(ConfigError, match="data.eval_batch_size=50 .* at most 33"):
        sharded(data_dir, 3, eval_batch_size=50)[0].val_dataloader()


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_writes_one_run_directory(data_dir, tmp_path):
    result = run_script(
        "train.py",
        *TINY,
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.max_epochs=2",
        f"paths.data_dir={data_dir}",
        f"paths.log_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr

    runs = list((tmp_path / "train" / "runs").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    assert Path(metrics["best_checkpoint"]).parent == run / "checkpoints"
    # the second rank logged into the same directory, next to rank 0
    assert (run / "train_ddp_process_1.log").is_file()

    # the ranks' test metrics cover all test images, with the same fixed noise as one
    # process: evaluating the checkpoint in a single process gives the same numbers
    overrides = [f"ckpt_path={metrics['best_checkpoint']}", f"paths.data_dir={data_dir}"]
    overrides += ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
    evaluated = evaluate(compose_config("evaluate", overrides, tmp_path / "evaluate"))
    for key in [k for k in metrics if k.startswith("test/")]:
        assert evaluated[key] == pytest.approx(metrics[key], rel=1e-5), key


@pytest.mark.slow
def test_ddp_jobs_of_a_multirun_each_keep_their_ranks_in_their_directory(data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_script(
        "train.py",
        "-m",
        *sweep_overrides(data_dir, sweep),
        f"paths.log_dir={tmp_path}",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.max_epochs=1",
        "model.code_dim=4,8",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(job_metrics(sweep)) == ["0", "1"]
    assert sorted(p.parent.name for p in sweep.glob("*/train_ddp_process_1.log")) == ["0", "1"]
    # no rank started a sweep or a run of its own
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["parallel", "submitit_local"])
def test_local_launcher_runs_a_two_job_sweep(launcher, data_dir, tmp_path):
    result = run_script(
        "train.py",
        "-m",
        f"launcher={launcher}",
        *TINY,
        f"paths.data_dir={data_dir}",
        f"paths.log_dir={tmp_path}",
        "trainer.max_epochs=1",
        "model.code_dim=4,8",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # the jobs, each in a process of its own, found the sweep directory the launcher made
    sweeps = list((tmp_path / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1, sweeps
    metrics = job_metrics(sweeps[0])
    assert sorted(metrics) == ["0", "1"]
    assert all(m["test/psnr"] > 5 for m in metrics.values())
    # each job ran with the launcher's thread budget
    for job in ("0", "1"):
        assert "torch uses 1 thread(s)" in (sweeps[0] / job / "train.log").read_text()


def test_slurm_launcher_renders_the_cluster_submission(tmp_path, monkeypatch):
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    overrides = [
        "launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.nodes=2",
        "hydra.launcher.tasks_per_node=4",
        f"hydra.sweep.dir={tmp_path}",
    ]
    cfg = compose_config("train", overrides, tmp_path / "job")
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.accelerator == "gpu"
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.torch_threads) == (4, 2, 4)
    plugin = cfg.trainer.plugins[0]
    assert plugin._target_.endswith("SLURMEnvironment") and plugin.auto_requeue

    # the parameters as Hydra's submitit launcher hands them to submitit
    launcher = instantiate(cfg.hydra.launcher)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {
        k if k in base else f"slurm_{k}": v
        for k, v in launcher.params.items()
        if k not in ("submitit_folder", "max_num_timeout")
    }
    # there is no SLURM here: skip submitit's check for srun
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    executor = submitit.AutoExecutor(folder=tmp_path / ".submitit", cluster="slurm")
    executor.update_parameters(**params)
    sbatch = _make_sbatch_string(
        command="python -m submitit.core._submit",
        folder=tmp_path / ".submitit",
        map_count=20,
        **executor._executor.parameters,
    ).splitlines()

    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=32GB",
        "#SBATCH --time=240",
        "#SBATCH --array=0-19%8",
        "#SBATCH --signal=USR1@120",
    ):
        assert line in sbatch, "\n".join(sbatch)


@pytest.mark.slow
def test_optuna_search_reports_the_best_trial(data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_script(
        "train.py",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        *sweep_overrides(data_dir, sweep),
        "trainer.max_epochs=1",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(job_metrics(sweep)) == ["0", "1", "2"]

    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best = results["best_params"]
    assert sorted(best) == ["model.dropout", "model.l1_weight", "model.lr"]
    assert 5 < results["best_value"] < 60
    # the best trial is one of the jobs, and its overrides rerun it
    trials = [yaml.safe_load(p.read_text()) for p in sweep.glob("*/.hydra/overrides.yaml")]
    chosen = [f"{k}={v}" for k, v in best.items()]
    assert any(set(chosen) <= set(trial) for trial in trials)


def test_ddp_ranks_of_a_multirun_job_rerun_that_job_alone(tmp_path, monkeypatch):
    overrides = ["hydra.mode=MULTIRUN", "trainer=ddp", "model.code_dim=4"]
    cfg = compose_config("train", overrides, tmp_path / "3")
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "model.code_dim=4,8"])
    monkeypatch.delenv("SLURM_NTASKS", raising=False)

    pin_ranks_to_this_job(cfg.trainer)
    assert sys.argv == ["train.py", "trainer=ddp", "model.code_dim=4", "hydra.mode=RUN"]
    assert HydraConfig.get().run.dir == str(tmp_path / "3")

    # a launcher with processes of its own cannot have its job re-run for the ranks
    cfg = compose_config("train", ["launcher=parallel", *overrides], tmp_path / "3")
    with pytest.raises(ConfigError, match="trainer=ddp re-runs train.py"):
        pin_ranks_to_this_job(cfg.trainer)
