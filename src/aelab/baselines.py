"""Classical baselines on the same images: PCA reconstruction and linear denoising.

Both are fitted on the training split the autoencoders train on and scored on the test
set with the autoencoders' own conventions (per-pixel MSE, per-image PSNR with peak 1.0,
the same fixed test noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

from aelab.model import corrupt, seeded_noise


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR with peak 1.0 per image, averaged over images, as the models report it."""
    value = peak_signal_noise_ratio(
        prediction, target, data_range=1.0, reduction="elementwise_mean", dim=1
    )
    return float(value)


def mse(prediction: torch.Tensor, target: torch.Tensor) -> float:
    return float(((prediction - target) ** 2).mean())


def fixed_test_noise(images: torch.Tensor, seed: int, batch_size: int) -> torch.Tensor:
    """The standard normal draw the models' test step uses, batch by batch."""
    batches = images.split(batch_size)
    return torch.cat([seeded_noise(batch, seed + i) for i, batch in enumerate(batches)])


@dataclass
class PCA:
    """Principal components of a set of flat images, fitted by eigendecomposition."""

    mean: torch.Tensor
    components: torch.Tensor  # (784, 784), columns by decreasing variance

    @classmethod
    def fit(cls, images: torch.Tensor) -> PCA:
        data = images.double()
        mean = data.mean(dim=0)
        centred = data - mean
        covariance = centred.T @ centred / (data.shape[0] - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        order = eigenvalues.argsort(descending=True)
        return cls(mean=mean, components=eigenvectors[:, order])

    def reconstruct(self, images: torch.Tensor, num_components: int) -> torch.Tensor:
        basis = self.components[:, :num_components]
        centred = images.double() - self.mean
        return (centred @ basis @ basis.T + self.mean).to(images.dtype)


@dataclass
class LinearDenoiser:
    """The best affine map from noisy to clean images in mean squared error (Wiener filter).

    Fitted on pairs drawn from the training set: x_hat = mean_x + A (y - mean_y) with
    A = cov(x, y) cov(y, y)^-1, the linear minimum mean squared error estimator. The
    covariances are measured on the noisy pairs themselves, so clipping of the noisy
    images is accounted for.
    """

    clean_mean: torch.Tensor
    noisy_mean: torch.Tensor
    weight: torch.Tensor

    @classmethod
    def fit(cls, clean: torch.Tensor, noisy: torch.Tensor, ridge: float = 1e-6) -> LinearDenoiser:
        x, y = clean.double(), noisy.double()
        x_mean, y_mean = x.mean(dim=0), y.mean(dim=0)
        xc, yc = x - x_mean, y - y_mean
        cov_yy = yc.T @ yc / (y.shape[0] - 1)
        cov_xy = xc.T @ yc / (y.shape[0] - 1)
        # a tiny ridge keeps the solve stable for pixels that are always zero
        cov_yy += ridge * torch.eye(cov_yy.shape[0], dtype=cov_yy.dtype)
        weight = torch.linalg.solve(cov_yy, cov_xy.T).T
        return cls(clean_mean=x_mean, noisy_mean=y_mean, weight=weight)

    def __call__(self, noisy: torch.Tensor) -> torch.Tensor:
        estimate = (noisy.double() - self.noisy_mean) @ self.weight.T + self.clean_mean
        return estimate.clamp(0.0, 1.0).to(noisy.dtype)


def pca_scores(train: torch.Tensor, test: torch.Tensor, code_dims: list[int]) -> list[dict]:
    """Test MSE and PSNR of PCA with as many components as each code dimension."""
    pca = PCA.fit(train)
    rows = []
    for k in code_dims:
        recon = pca.reconstruct(test, k).clamp(0.0, 1.0)
        rows.append({"code_dim": k, "mse": mse(recon, test), "psnr": psnr(recon, test)})
    return rows


def denoising_scores(
    train: torch.Tensor,
    test: torch.Tensor,
    variances: list[float],
    noise_seed: int,
    batch_size: int,
    clip: bool = True,
    fit_seed: int = 0,
) -> list[dict]:
    """PSNR of the noisy test input and of the linear denoiser fitted at each variance."""
    test_draw = fixed_test_noise(test, noise_seed, batch_size)
    train_draw = torch.randn(train.shape, generator=torch.Generator().manual_seed(fit_seed))
    rows = []
    for variance in variances:
        denoiser = LinearDenoiser.fit(train, corrupt(train, variance, train_draw, clip))
        noisy = corrupt(test, variance, test_draw, clip)
        rows.append(
            {
                "variance": float(variance),
                "psnr_noisy": psnr(noisy, test),
                "psnr_linear": psnr(denoiser(noisy), test),
            }
        )
    return rows
