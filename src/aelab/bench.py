"""Time the project's training against plain PyTorch and the tutorial pipeline, side by side.

python -m aelab.bench --data-dir /path/to/datasets --depths 3 5 --epochs 10

Everything runs in one process on the same data and the same model, so that only the
ratios between the three ways of training matter, not the load of the machine:

- project: `aelab.training.train` on the composed Hydra config, as `train.py` runs it
  (Lightning Trainer, `ImageDataModule`, `Autoencoder`, TensorBoard and CSV loggers,
  checkpoints, image grids, progress bar with its output discarded), then its test;
- plain: a bare PyTorch loop over the same in-memory tensors (shuffled slices of 128,
  MSE, the model's own optimizer), plus one forward pass over the validation images
  per epoch, as the project's epoch also validates. Its epochs run between the
  project's, each just before the project's epoch of the same number, so that a change
  in the machine's load falls on both;
- tutorial: torchvision's dataset with `ToTensor()` behind a shuffling `DataLoader`, the
  images flattened in the step, in Lightning without loggers, checkpoints, progress
  bar or validation.

It prints seconds per epoch, samples per second, the ratios project/plain and
tutorial/project, the training FLOP/s against this machine's measured matmul peak, and
the time to evaluate a model on the test set at every noise variance. With
`--precision bf16-mixed` all three train under bfloat16 autocast (Lightning's mixed
precision, the plain loop's own autocast) and the FLOP/s are set against the bf16 peak.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchvision.transforms import ToTensor

from aelab.data import DATASETS, ImageDataModule
from aelab.evaluation import model_from_checkpoint, read_checkpoint
from aelab.hardware import matmul_seconds, synchronize
from aelab.model import Autoencoder, corrupt
from aelab.training import train

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# wall time is what a run costs; the process's CPU time is steadier on a busy machine
# (use it with --threads 1, as idle threads also count)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


# the matrix products' number type under each trainer precision the benchmark offers
PRECISIONS = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def matmul_peak(
    device: torch.device, now: Callable[[], float], dtype: torch.dtype, repeats: int = 5
) -> float:
    """FLOP/s of the best of a few large square matrix products of `dtype` on `device`.

    The size doubles from 256 while a product takes under 0.1 s, up to 2048 (8192 on a
    GPU): hardware that only emulates `dtype` (bfloat16 on CPUs without AVX512-BF16 or
    AMX, about 1 GFLOP/s) is measured in a second rather than in minutes.
    """
    largest = 8192 if device.type == "cuda" else 2048
    n = 256
    while True:
        best = matmul_seconds(n, dtype, device, now, repeats)
        if n >= largest or best > 0.1:
            return 2 * n**3 / best
        n *= 2


def peak_name(dtype: torch.dtype) -> str:
    """fp32, bf16, fp16."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def linear_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def training_flops_per_sample(model: nn.Module) -> int:
    """Multiply-adds x 2 of one training step, per sample, in the linear layers.

    Forward, the weights' gradients and the inputs' gradients each cost 2 FLOPs per
    weight, except that no gradient is computed for the images fed to the first layer.
    """
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    return 6 * linear_weights(model) - 2 * first.weight.numel()


class EpochClock(L.Callback):
    """Time of each training epoch of a Lightning run, validation included.

    `between_epochs`, if set, runs before each epoch's clock starts: the plain loop's
    epoch of the same number.
    """

    # the clock of the latest run, also when Hydra built it from the config
    latest: EpochClock | None = None
    between_epochs: Callable[[], object] | None = None

    def __init__(self, clock: str = "wall") -> None:
        self.now = CLOCKS[clock]
        self.times: list[float] = []
        EpochClock.latest = self

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.between_epochs is not None:
            self.between_epochs()
        synchronize(pl_module.device)
        self._start = self.now()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        synchronize(pl_module.device)
        self.times.append(self.now() - self._start)


# the project: train.py's own code path on the composed config


def project_config(args, depth: int, output_dir: Path) -> DictConfig:
    """The config train.py would compose, shrunk to the benchmark's epochs and batches."""
    overrides = [
        f"data={args.dataset}",
        f"paths.data_dir={args.data_dir}",
        f"paths.log_dir={output_dir}",
        f"paths.output_dir={output_dir}",
        "data.download=false",
        f"model.depth={depth}",
        f"model.code_dim={args.code_dim}",
        f"trainer.max_epochs={args.epochs}",
        f"trainer.accelerator={'gpu' if args.device.type == 'cuda' else 'cpu'}",
        f"trainer.precision={args.precision}",
        # the class of this very module, also when it runs as __main__
        f"+callbacks.epoch_clock._target_={EpochClock.__module__}.EpochClock",
        f"+callbacks.epoch_clock.clock={args.clock}",
        *args.override,
    ]
    if args.limit_batches:
        overrides.append(f"trainer.limit_train_batches={args.limit_batches}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def run_project(cfg: DictConfig) -> tuple[list[float], Path]:
    """Train as train.py does, with one more callback that times the epochs."""
    # the progress bar draws on stdout: keep its cost, drop its output
    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    return EpochClock.latest.times, Path(metrics["best_checkpoint"])


# the floor: plain PyTorch over the same tensors


class PlainLoop:
    """A bare loop: shuffled slices, MSE, backward, the model's own optimizer.

    Under a mixed precision the forward pass runs in autocast, as Lightning runs it.
    """

    def __init__(self, args, cfg: DictConfig, datamodule: ImageDataModule) -> None:
        self.args = args
        torch.manual_seed(0)
        self.model = instantiate(cfg.model, _convert_="all").to(args.device)
        # the optimizer alone: a learning rate schedule needs a trainer to count its steps
        optimizer = self.model.configure_optimizers()
        if isinstance(optimizer, dict):
            optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.model.lr, fused=True)
        self.optimizer = optimizer
        self.train_images = datamodule.train_images.to(args.device)
        self.val_images = datamodule.val_images.to(args.device)
        self.batch_size, self.eval_batch_size = cfg.data.batch_size, cfg.data.eval_batch_size
        self.now = CLOCKS[args.clock]
        self.times: list[float] = []
        dtype = PRECISIONS[args.precision]
        self.autocast = torch.autocast(
            args.device.type, dtype=dtype, enabled=dtype is not torch.float32
        )

    def epoch(self) -> None:
        """One epoch of training and validation, its time appended to `times`."""
        model, images, device = self.model, self.train_images, self.args.device
        synchronize(device)
        start = self.now()

        model.train()
        order = torch.randperm(len(images), device=device)
        for step, rows in enumerate(order.split(self.batch_size)):
            if self.args.limit_batches and step >= self.args.limit_batches:
                break
            x = images[rows]
            with self.autocast:
                loss = F.mse_loss(model(x), x)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()

        # the project's epoch validates too
        model.eval()
        with torch.inference_mode(), self.autocast:
            for x in self.val_images.split(self.eval_batch_size):
                F.mse_loss(model(x), x)

        synchronize(device)
        self.times.append(self.now() - start)


# the tutorial: torchvision dataset, ToTensor, DataLoader, flatten in the step


class TutorialAutoencoder(L.LightningModule):
    def __init__(self, reference: Autoencoder) -> None:
        super().__init__()
        self.encoder, self.decoder = reference.encoder, reference.decoder

    def training_step(self, batch, batch_idx):
        x, _ = batch
        x = x.view(x.size(0), -1)
        loss = F.mse_loss(self.decoder(self.encoder(x)), x)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def run_tutorial(args, cfg: DictConfig) -> list[float]:
    dataset = DATASETS[args.dataset](str(args.data_dir), train=True, transform=ToTensor())
    val_size = cfg.data.val_size
    generator = torch.Generator().manual_seed(0)
    train_set, _ = random_split(dataset, [len(dataset) - val_size, val_size], generator)
    loader = DataLoader(train_set, batch_size=cfg.data.batch_size, shuffle=True)
    clock = EpochClock(args.clock)
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        max_epochs=args.epochs,
        limit_train_batches=args.limit_batches or None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(TutorialAutoencoder(instantiate(cfg.model, _convert_="all")), loader)
    return clock.times


# evaluation of one model at every test variance


def time_it(fn: Callable[[], object], args) -> float:
    now = CLOCKS[args.clock]
    synchronize(args.device)
    start = now()
    fn()
    synchronize(args.device)
    return now() - start


def time_evaluation(args, cfg, checkpoint: Path, datamodule: ImageDataModule) -> dict:
    """Seconds for the project's test (trainer.test) and for the bare forward passes."""
    model = model_from_checkpoint(read_checkpoint(checkpoint)).to(args.device)
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    test = time_it(lambda: trainer.test(model, datamodule=datamodule, verbose=False), args)
    test_images = datamodule.test_images.to(args.device)

    @torch.inference_mode()
    def forward_passes():
        model.eval()
        for variance in model.hparams.test_variances:
            for batch_idx, x in enumerate(test_images.split(cfg.data.eval_batch_size)):
                noise = model.fixed_noise(x, batch_idx)
                model(corrupt(x, variance, noise, clip=True))

    return {"trainer.test": test, "forward passes": time_it(forward_passes, args)}


# the report


def row(label: str, values: list[str]) -> str:
    return f"{label:<24}" + "".join(f"{v:>11}" for v in values)


def report_depth(
    depth: int,
    times: dict[str, list[float]],
    samples: int,
    model: nn.Module,
    peak: float,
    dtype: torch.dtype,
):
    weights = linear_weights(model)
    print(f"\ndepth {depth}: {weights:,} linear weights, {samples:,} samples per epoch")
    names = list(times)
    print(row("epoch (s)", names))
    for epoch in range(max(len(t) for t in times.values())):
        cells = [f"{t[epoch]:.3f}" if epoch < len(t) else "-" for t in times.values()]
        print(row(f"  {epoch + 1}", cells))
    means = {name: statistics.fmean(t) for name, t in times.items()}
    print(row("mean (s)", [f"{means[n]:.3f}" for n in names]))
    print(row("slowest / first", [f"{max(t) / t[0]:.2f}" for t in times.values()]))
    print(row("samples/s", [f"{samples / means[n]:,.0f}" for n in names]))
    flops = {n: training_flops_per_sample(model) * samples / means[n] for n in names}
    print(row("train GFLOP/s", [f"{flops[n] / 1e9:.1f}" for n in names]))
    print(f"{peak_name(dtype)} matmul peak {peak / 1e9:.1f} GFLOP/s (the best measured so far)")
    print(row("% of matmul peak", [f"{100 * flops[n] / peak:.0f}%" for n in names]))
    by_epoch = [p / q for p, q in zip(times["project"], times["plain"], strict=True)]
    print(
        f"project / plain    = {means['project'] / means['plain']:.2f} "
        f"(median of the epochs' ratios {statistics.median(by_epoch):.2f})"
    )
    print(f"tutorial / project = {means['tutorial'] / means['project']:.2f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    summary = __doc__.split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m aelab.bench", description=summary)
    parser.add_argument("--data-dir", default=os.environ.get("AELAB_DATA_DIR", "data"))
    parser.add_argument("--dataset", default="mnist", choices=sorted(DATASETS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--depths", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--code-dim", type=int, default=100)
    parser.add_argument(
        "--limit-batches", type=int, default=0, help="training batches per epoch; 0: all"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's own")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS))
    parser.add_argument(
        "--precision",
        default="32-true",
        choices=list(PRECISIONS),
        help="trainer precision of all three; the FLOP/s are set against this type's peak",
    )
    parser.add_argument(
        "--override",
        nargs="*",
        default=[],
        help="extra Hydra overrides of the project's run, e.g. model.compile=true",
    )
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    # the data once, as the project's data module reads and splits them
    with tempfile.TemporaryDirectory(prefix="aelab-bench-") as tmp:
        cfg = project_config(args, args.depths[0], Path(tmp))
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    batches = math.ceil(len(datamodule.train_images) / cfg.data.batch_size)
    if args.limit_batches:
        batches = min(batches, args.limit_batches)
    samples = min(batches * cfg.data.batch_size, len(datamodule.train_images))

    dtype = PRECISIONS[args.precision]
    peak = matmul_peak(args.device, CLOCKS[args.clock], dtype)
    print(
        f"{args.dataset} on {args.device}, {torch.get_num_threads()} threads, {args.clock} clock, "
        f"precision {args.precision}: {args.epochs} epochs of {batches} batches of "
        f"{cfg.data.batch_size}; {peak_name(dtype)} matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    if args.override:
        print("project overrides: " + " ".join(args.override))

    for depth in args.depths:
        with tempfile.TemporaryDirectory(prefix="aelab-bench-") as tmp:
            cfg = project_config(args, depth, Path(tmp))
            plain = PlainLoop(args, cfg, datamodule)
            EpochClock.between_epochs = plain.epoch
            try:
                project, best = run_project(cfg)
            finally:
                EpochClock.between_epochs = None
            times = {"plain": plain.times, "project": project}
            times["tutorial"] = run_tutorial(args, cfg)
            # measured again after the runs: the machine's load varies, the peak does not
            peak = max(peak, matmul_peak(args.device, CLOCKS[args.clock], dtype))
            report_depth(depth, times, samples, plain.model, peak, dtype)

            seconds = time_evaluation(args, cfg, best, datamodule)
            print(
                f"evaluation of {len(datamodule.test_images):,} test images at "
                f"{len(cfg.model.test_variances)} variances: "
                + ", ".join(f"{name} {s:.2f} s" for name, s in seconds.items())
            )


if __name__ == "__main__":
    main()
