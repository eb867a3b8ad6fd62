"""The fully connected autoencoder, its penalty, its noise and its metrics."""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import nn
from torchmetrics import MeanSquaredError, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio

from aelab.data import NUM_PIXELS

DEFAULT_HIDDEN_DIMS = {3: [512, 256], 5: [512, 384, 256, 128]}
DEFAULT_TEST_VARIANCES = [0.1, 0.25, 0.5, 0.75, 1.0]
STAGES = ("train", "val", "test")


def mlp(dims: list[int], dropout: float, output: nn.Module | None) -> nn.Sequential:
    """Linear layers through `dims`, ReLU and dropout after each hidden one, `output` last."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(pairwise(dims)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
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


def psnr_metric() -> PeakSignalNoiseRatio:
    # peak 1.0 for pixels in [0, 1]; dim=1 gives one PSNR per image, then their mean
    return PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=1)


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
    ) -> None:
        super().__init__()
        hidden_dims = list(hidden_dims) if hidden_dims else DEFAULT_HIDDEN_DIMS[depth]
        test_variances = [float(v) for v in (test_variances or DEFAULT_TEST_VARIANCES)]
        # saved after normalising, so the checkpoint holds plain lists that load safely
        self.save_hyperparameters()

        dims = [NUM_PIXELS, *hidden_dims, code_dim]
        self.encoder = mlp(dims, dropout, output=None)
        self.decoder = mlp(dims[::-1], dropout, output=nn.Sigmoid())

        # MSE and PSNR of the reconstruction, one collection per stage
        for stage in STAGES:
            metrics = MetricCollection({"mse": MeanSquaredError(), "psnr": psnr_metric()})
            setattr(self, f"{stage}_metrics", metrics.clone(prefix=f"{stage}/"))
        self.psnr_noisy = nn.ModuleList(psnr_metric() for _ in test_variances)
        self.psnr_denoised = nn.ModuleList(psnr_metric() for _ in test_variances)

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

    def _shared_step(self, x: torch.Tensor, noise: torch.Tensor | None, stage: str):
        hp = self.hparams
        inputs = x if noise is None else corrupt(x, hp.noise_variance, noise, hp.clip_noisy)
        code = self.encoder(inputs)
        recon = self.decoder(code)
        mse = F.mse_loss(recon, x)
        penalty = self.l1_penalty(code)
        loss = mse + penalty

        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(recon, x)
        sync = stage != "train"
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=sync)
        self.log(f"{stage}/l1", penalty, on_step=False, on_epoch=True, sync_dist=sync)
        self.log_dict(metrics, on_step=False, on_epoch=True)
        return loss

    def training_step(self, x: torch.Tensor, batch_idx: int) -> torch.Tensor:
        noise = torch.randn_like(x) if self.hparams.noise_variance > 0 else None
        return self._shared_step(x, noise, "train")

    def validation_step(self, x: torch.Tensor, batch_idx: int) -> None:
        noise = None
        if self.hparams.noise_variance > 0:
            noise = self.fixed_noise(x, self.whole_set_batch_idx(batch_idx))
        self._shared_step(x, noise, "val")

    def test_step(self, x: torch.Tensor, batch_idx: int) -> None:
        # the clean test metrics: the model reconstructs uncorrupted images
        self._shared_step(x, None, "test")

        # denoising: the same standard normal draw scaled to every variance
        noise = self.fixed_noise(x, self.whole_set_batch_idx(batch_idx))
        for i, variance in enumerate(self.hparams.test_variances):
            noisy = corrupt(x, variance, noise, self.hparams.clip_noisy)
            self.psnr_noisy[i](noisy, x)
            self.psnr_denoised[i](self(noisy), x)
            name = variance_name(variance)
            self.log(f"test/psnr_noisy_{name}", self.psnr_noisy[i], on_step=False, on_epoch=True)
            self.log(f"test/psnr_denoised_{name}", self.psnr_denoised[i], on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
