"""The fully connected autoencoder, its penalty, its noise and its metrics."""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import nn
from torchmetrics import MeanSquaredError, Metric, MetricCollection

from aelab.data import NUM_PIXELS

DEFAULT_HIDDEN_DIMS = {3: [512, 256], 5: [512, 384, 256, 128]}
DEFAULT_TEST_VARIANCES = [0.1, 0.25, 0.5, 0.75, 1.0]
ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU, "silu": nn.SiLU}
LR_SCHEDULES = ("constant", "cosine", "onecycle")


def mlp(
    dims: list[int],
    dropout: float,
    output: nn.Module | None,
    activation: str = "relu",
    batch_norm: bool = False,
) -> nn.Sequential:
    """Linear layers through `dims`, `output` last.

    After each hidden layer: batch norm (if asked for), the activation, then dropout.
    """
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(pairwise(dims)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            if batch_norm:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    if output is not None:
        layers.append(output)
    return nn.Sequential(*layers)


def corrupt(x: torch.Tensor, variance: float, noise: torch.Tensor, clip: bool) -> torch.Tensor:
    """Add Gaussian noise of the given variance to `x`, given standard normal `noise`."""
    # the study specifies noise by its variance: scale by the standard deviation
    noisy = x + variance**0.5 * noise
    return noisy.clamp(0.0, 1.0) if clip else noisy


def seeded_noise(like: torch.Tensor, seed: int) -> torch.Tensor:
    """Standard normal noise shaped like `like`, drawn on its device from `seed` alone."""
    generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def psnr_of_mse(mse: torch.Tensor) -> torch.Tensor:
    """PSNR for a mean squared error, with a peak of 1.0: 10 log10(1 / mse)."""
    return -10.0 * torch.log10(mse)


def image_psnr(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR of each image against its target, with a peak of 1.0."""
    return psnr_of_mse((recon - target).square().mean(dim=1))


class MeanImagePSNR(Metric):
    """PSNR per image (peak 1.0), averaged over all images seen.

    The same value as torchmetrics' PeakSignalNoiseRatio(data_range=1.0, dim=1), kept as a
    running sum and a count instead of a list of every image's value, so that updating,
    logging and syncing it cost the same at the last batch as at the first.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # float64: the sum runs over tens of thousands of values near 20
        self.add_state("psnr_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, recon: torch.Tensor, target: torch.Tensor) -> None:
        psnr = image_psnr(recon, target)
        self.psnr_sum += psnr.sum()
        self.images += psnr.numel()

    def compute(self) -> torch.Tensor:
        return (self.psnr_sum / self.images).float()


def psnr_metric() -> MeanImagePSNR:
    return MeanImagePSNR()


def variance_name(variance: float) -> str:
    """How a noise variance appears in metric names: 0.1, 0.25, 1.0."""
    return repr(float(variance))


class Autoencoder(LightningModule):
    """Encoder of `depth` linear layers down to `code_dim`, decoder mirrored, sigmoid output.

    Trained on mean squared error against the clean image plus an optional L1 (lasso)
    penalty. With `noise_variance` > 0 the inputs are corrupted during training and
    validation, which makes it a denoising autoencoder.
    """

    def __init__(
        self,
        depth: int = 3,
        code_dim: int = 100,
        hidden_dims: list[int] | None = None,
        dropout: float = 0.0,
        l1_weight: float = 0.0,
        l1_target: str = "weights",
        noise_variance: float = 0.0,
        clip_noisy: bool = True,
        lr: float = 1e-3,
        test_variances: list[float] | None = None,
        noise_seed: int = 2024,
        compile: bool = False,
        activation: str = "relu",
        batch_norm: bool = False,
        lr_schedule: str = "constant",
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        hidden_dims = list(hidden_dims) if hidden_dims else DEFAULT_HIDDEN_DIMS[depth]
        test_variances = [float(v) for v in (test_variances or DEFAULT_TEST_VARIANCES)]
        # saved after normalising, so the checkpoint holds plain lists that load safely
        self.save_hyperparameters()

        dims = [NUM_PIXELS, *hidden_dims, code_dim]
        self.encoder = mlp(dims, dropout, None, activation, batch_norm)
        self.decoder = mlp(dims[::-1], dropout, nn.Sigmoid(), activation, batch_norm)

        # MSE and PSNR of the reconstruction in validation and test, one collection each
        for stage in ("val", "test"):
            metrics = MetricCollection({"mse": MeanSquaredError(), "psnr": psnr_metric()})
            setattr(self, f"{stage}_metrics", metrics.clone(prefix=f"{stage}/"))
        # the training metrics of the epoch so far: each step's loss and penalty, and each
        # image's summed squared error, reduced once at the end of the epoch
        self.train_steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.psnr_noisy = nn.ModuleList(psnr_metric() for _ in test_variances)
        self.psnr_denoised = nn.ModuleList(psnr_metric() for _ in test_variances)

        # torch.compile of the training loss (forward and, through it, backward): no faster
        # on a CPU at batch 128 and costs seconds to compile, so it is off by default
        self.training_loss = torch.compile(self._loss) if compile else self._loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def l1_penalty(self, code: torch.Tensor) -> torch.Tensor:
        """The lasso term: weight times the L1 norm of the encoder weights or of the code."""
        if self.hparams.l1_weight == 0:
            return code.new_zeros(())
        if self.hparams.l1_target == "code":
            norm = code.abs().sum(dim=1).mean()
        else:
            norm = sum(m.weight.abs().sum() for m in self.encoder if isinstance(m, nn.Linear))
        return self.hparams.l1_weight * norm

    def fixed_noise(self, x: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Standard normal noise that depends only on the seed and the batch index."""
        return seeded_noise(x, self.hparams.noise_seed + batch_idx)

    def whole_set_batch_idx(self, batch_idx: int) -> int:
        """Index of this evaluation batch in the whole set, however many ranks share it."""
        # the data module gives rank r the batches r, r + world_size, ... of the set
        return batch_idx * self.trainer.world_size + self.global_rank

    def _loss(self, x: torch.Tensor, noise: torch.Tensor | None):
        """Reconstruction of `x` (corrupted by `noise` if given), the loss and its penalty."""
        hp = self.hparams
        inputs = x if noise is None else corrupt(x, hp.noise_variance, noise, hp.clip_noisy)
        code = self.encoder(inputs)
        recon = self.decoder(code)
        penalty = self.l1_penalty(code)
        return recon, F.mse_loss(recon, x) + penalty, penalty

    def _evaluation_step(self, x: torch.Tensor, noise: torch.Tensor | None, stage: str) -> None:
        recon, loss, penalty = self._loss(x, noise)
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(recon.float(), x)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log(f"{stage}/l1", penalty, on_step=False, on_epoch=True, sync_dist=True)
        self.log_dict(metrics, on_step=False, on_epoch=True)

    def training_step(self, x: torch.Tensor, batch_idx: int) -> torch.Tensor:
        noise = torch.randn_like(x) if self.hparams.noise_variance > 0 else None
        recon, loss, penalty = self.training_loss(x, noise)
        self._accumulate_train_metrics(x, recon, loss, penalty)
        return loss

    @torch.no_grad()
    def _accumulate_train_metrics(self, x, recon, loss, penalty) -> None:
        # three kernels and no host sync per step; the rest waits for the end of the epoch
        squared_errors = (recon.detach().float() - x).square_().sum(dim=1)
        self.train_steps.append((loss.detach(), penalty.detach(), squared_errors))

    def on_train_epoch_end(self) -> None:
        if not self.train_steps:
            return
        losses, penalties, squared_errors = zip(*self.train_steps, strict=True)
        self.train_steps = []
        sizes = torch.tensor([len(e) for e in squared_errors], device=losses[0].device)
        squared_errors = torch.cat(squared_errors).double()
        images = squared_errors.new_tensor(len(squared_errors))
        # loss and l1 are per-process means weighted by batch size, as Lightning's epoch
        # logging computes them; mse and psnr are over the images of all processes, as
        # torchmetrics syncs them
        loss = (torch.stack(losses).double() * sizes).sum() / images
        penalty = (torch.stack(penalties).double() * sizes).sum() / images
        psnr = psnr_of_mse(squared_errors / NUM_PIXELS)
        sums = torch.stack([squared_errors.sum(), psnr.sum(), images])
        squared_errors, psnr, images = self.trainer.strategy.reduce(sums, reduce_op="sum")
        self.log("train/loss", loss.float())
        self.log("train/l1", penalty.float())
        self.log("train/mse", (squared_errors / (images * NUM_PIXELS)).float())
        self.log("train/psnr", (psnr / images).float())

    def validation_step(self, x: torch.Tensor, batch_idx: int) -> None:
        noise = None
        if self.hparams.noise_variance > 0:
            noise = self.fixed_noise(x, self.whole_set_batch_idx(batch_idx))
        self._evaluation_step(x, noise, "val")

    def test_step(self, x: torch.Tensor, batch_idx: int) -> None:
        # the clean test metrics: the model reconstructs uncorrupted images
        self._evaluation_step(x, None, "test")

        # denoising: the same standard normal draw scaled to every variance
        noise = self.fixed_noise(x, self.whole_set_batch_idx(batch_idx))
        for i, variance in enumerate(self.hparams.test_variances):
            noisy = corrupt(x, variance, noise, self.hparams.clip_noisy)
            self.psnr_noisy[i].update(noisy, x)
            self.psnr_denoised[i].update(self(noisy), x)
            name = variance_name(variance)
            self.log(f"test/psnr_noisy_{name}", self.psnr_noisy[i], on_step=False, on_epoch=True)
            self.log(f"test/psnr_denoised_{name}", self.psnr_denoised[i], on_epoch=True)

    def configure_optimizers(self):
        # the fused kernel updates the weights in one pass instead of several per tensor;
        # Lightning cannot clip the gradients of a fused optimizer under mixed precision
        trainer = self._trainer
        clipped_mixed = (
            trainer is not None and trainer.gradient_clip_val and "mixed" in trainer.precision
        )
        # weight decay is decoupled from the gradient (AdamW); without it, plain Adam
        if self.hparams.weight_decay > 0:
            optimizer = torch.optim.AdamW(
                self.parameters(),
                lr=self.hparams.lr,
                weight_decay=self.hparams.weight_decay,
                fused=not clipped_mixed,
            )
        else:
            optimizer = torch.optim.Adam(
                self.parameters(), lr=self.hparams.lr, fused=not clipped_mixed
            )
        if self.hparams.lr_schedule == "constant":
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self._lr_scheduler(optimizer), "interval": "step"},
        }

    def _lr_scheduler(self, optimizer: torch.optim.Optimizer):
        """The learning rate over the whole run, stepped after every batch.

        cosine: from `lr` down to zero; onecycle: up from lr / 25 to `lr` over the first
        30% of the steps, then down to almost zero (Smith and Topin's one-cycle policy).
        """
        steps = self.trainer.estimated_stepping_batches
        if self.hparams.lr_schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.lr, total_steps=steps
        )
