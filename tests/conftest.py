"""Generated IDX datasets, tiny configs built from the real ones, and test-only callbacks."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning import Callback
from omegaconf import DictConfig, open_dict

from aelab.data import DATASETS, raw_files

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
SIZES = {"train": 400, "test": 100}


def run_script(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run an entry point in a session of its own, so that a timeout ends its workers too."""
    with subprocess.Popen(
        [sys.executable, script, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            # generous: a sweep starts several Python processes, slow on a busy machine
            stdout, stderr = process.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the IDX format (big-endian sizes after a magic number)."""
    magic = 0x0800 | array.ndim
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_images(count: int, rng: np.random.Generator) -> np.ndarray:
    """Blurry strokes: a few bright lines on a dark square, like handwriting at 28x28."""
    images = np.zeros((count, 28, 28), dtype=np.float32)
    rows = np.arange(28)[:, None]
    cols = np.arange(28)[None, :]
    for image in images:
        for _ in range(3):
            a, b, c = rng.normal(size=3)
            distance = np.abs(a * (rows - 14) + b * (cols - 14) + 4 * c) / np.hypot(a, b)
            image += np.exp(-(distance**2) / 2.0) * (np.hypot(rows - 14, cols - 14) < 11)
    return (255 * np.clip(images, 0, 1)).astype(np.uint8)


def make_dataset(root: Path, dataset: str, seed: int = 0) -> Path:
    raw = root / DATASETS[dataset].__name__ / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train_images, train_labels, test_images, test_labels = raw_files(dataset)
    write_idx(raw / train_images, fake_images(SIZES["train"], rng))
    write_idx(raw / train_labels, rng.integers(0, 10, SIZES["train"]))
    write_idx(raw / test_images, fake_images(SIZES["test"], rng))
    write_idx(raw / test_labels, rng.integers(0, 10, SIZES["test"]))
    return root


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    for seed, dataset in enumerate(DATASETS):
        make_dataset(root, dataset, seed)
    return root


# overrides that shrink the study's recipe to a run of seconds on the generated data
TINY = [
    "data.val_size=100",
    "data.batch_size=20",
    "data.eval_batch_size=50",
    "data.download=false",
    "model.hidden_dims=[64,32]",
    "model.code_dim=8",
    "trainer.max_epochs=3",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def tiny_overrides(data_dir: Path, output_dir: Path) -> list[str]:
    return [*TINY, f"paths.data_dir={data_dir}", f"hydra.run.dir={output_dir}"]


def compose_config(name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose a config as the CLI would, with Hydra's runtime set to `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    return cfg


@pytest.fixture
def train_config(data_dir, tmp_path):
    """A factory for a tiny training config; extra overrides come last."""

    def make(*extra: str, output_dir: Path | None = None) -> DictConfig:
        output_dir = output_dir or tmp_path / "run"
        return compose_config("train", [*tiny_overrides(data_dir, output_dir), *extra], output_dir)

    return make


class PauseMidEpoch(Callback):
    """Writes `marker` after batch `batch` of epoch `epoch`, then waits to be killed."""

    def __init__(self, marker: str, epoch: int, batch: int) -> None:
        self.marker, self.epoch, self.batch = Path(marker), epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            self.marker.write_text(str(trainer.global_step))
            time.sleep(300)


class PoisonWeights(Callback):
    """Fills the weights with NaN before batch `batch` of epoch `epoch`, as a blow-up would."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            with torch.no_grad():
                for parameter in pl_module.parameters():
                    parameter.fill_(float("nan"))
