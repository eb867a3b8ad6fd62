import math

import pytest
import torch
from lightning import Callback, Trainer
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanSquaredError
from torchmetrics.image import PeakSignalNoiseRatio

from aelab.model import Autoencoder, corrupt, psnr_metric


@pytest.mark.parametrize("depth", [3, 5])
@pytest.mark.parametrize("code_dim", [15, 30, 50, 100])
def test_each_depth_and_code_size_builds(depth, code_dim):
    model = Autoencoder(depth=depth, code_dim=code_dim)
    encoder = [m for m in model.encoder if isinstance(m, nn.Linear)]
    decoder = [m for m in model.decoder if isinstance(m, nn.Linear)]

    assert len(encoder) == len(decoder) == depth
    assert encoder[-1].out_features == code_dim
    # the decoder mirrors the encoder's widths
    assert [m.in_features for m in encoder] == [m.out_features for m in reversed(decoder)]
    assert min(m.out_features for m in encoder[:-1]) > 100
    recon = model(torch.rand(4, 784))
    assert recon.shape == (4, 784) and 0 <= recon.min() and recon.max() <= 1


def test_dropout_follows_hidden_activations_only():
    model = Autoencoder(depth=3, dropout=0.3)
    kinds = [type(m).__name__ for m in model.encoder]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert all(m.p == 0.3 for m in model.decoder if isinstance(m, nn.Dropout))
    assert not any(isinstance(m, nn.Dropout) for m in Autoencoder(depth=3).modules())


def test_batch_norm_and_activation_follow_every_hidden_layer():
    model = Autoencoder(depth=3, dropout=0.1, activation="gelu", batch_norm=True)
    hidden = ["Linear", "BatchNorm1d", "GELU", "Dropout"]
    assert [type(m).__name__ for m in model.encoder] == [*hidden, *hidden, "Linear"]
    assert [type(m).__name__ for m in model.decoder] == [*hidden, *hidden, "Linear", "Sigmoid"]
    norms = [m.num_features for m in model.encoder if isinstance(m, nn.BatchNorm1d)]
    assert norms == [512, 256]


class LearningRates(Callback):
    """Records the learning rate of every training step."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def bare_trainer(tmp_path, epochs: int, callbacks: list | None = None) -> Trainer:
    """A CPU trainer without loggers, checkpoints or progress output."""
    return Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )


def learning_rates(tmp_path, schedule: str, epochs: int = 4, batches: int = 10) -> list[float]:
    model = Autoencoder(hidden_dims=[32, 16], code_dim=8, lr=0.01, lr_schedule=schedule)
    recorder = LearningRates()
    trainer = bare_trainer(tmp_path, epochs, callbacks=[recorder])
    data = DataLoader([torch.rand(5, 784) for _ in range(batches)], batch_size=None)
    trainer.fit(model, train_dataloaders=data)
    return recorder.rates


def test_learning_rate_schedules_run_over_every_step_of_the_run(tmp_path):
    constant = learning_rates(tmp_path, "constant")
    assert constant == [0.01] * 40

    cosine = learning_rates(tmp_path, "cosine")
    assert len(cosine) == 40 and cosine[0] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(cosine, cosine[1:], strict=False))
    assert cosine[20] == pytest.approx(0.005, rel=0.01) and cosine[-1] < 1e-4

    onecycle = learning_rates(tmp_path, "onecycle")
    peak = max(range(40), key=onecycle.__getitem__)
    assert onecycle[0] == pytest.approx(0.01 / 25)
    assert onecycle[peak] == pytest.approx(0.01, rel=0.01) and 10 <= peak <= 13
    assert onecycle[-1] < 0.01 / 100


def test_weight_decay_is_decoupled_and_absent_by_default():
    assert type(Autoencoder().configure_optimizers()) is torch.optim.Adam

    model = Autoencoder(hidden_dims=[16, 8], code_dim=4, lr=0.1, weight_decay=0.5)
    optimizer = model.configure_optimizers()
    assert type(optimizer) is torch.optim.AdamW
    # with no gradient, a step only shrinks every weight by lr x weight_decay
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for old, new in zip(before, model.parameters(), strict=True):
        torch.testing.assert_close(new.detach(), old * (1 - 0.1 * 0.5))


def test_l1_penalty_on_weights_is_the_weight_times_their_l1_norm():
    model = Autoencoder(depth=3, code_dim=30, l1_weight=1e-5)
    by_hand = sum(m.weight.abs().sum() for m in model.encoder if isinstance(m, nn.Linear))
    penalty = model.l1_penalty(torch.zeros(2, 30))
    assert penalty.item() == pytest.approx(1e-5 * by_hand.item(), rel=1e-6)
    assert Autoencoder(l1_weight=0.0).l1_penalty(torch.ones(2, 100)).item() == 0.0


def test_l1_penalty_on_code_is_the_mean_l1_norm_per_image():
    model = Autoencoder(code_dim=3, l1_weight=0.5, l1_target="code")
    code = torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 4.0]])
    assert model.l1_penalty(code).item() == pytest.approx(0.5 * (3.0 + 4.0) / 2)


@pytest.mark.parametrize("variance", [0.1, 0.5, 1.0])
def test_noise_has_the_configured_variance_not_standard_deviation(variance):
    x = torch.full((2000, 784), 0.5)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    noisy = corrupt(x, variance, noise, clip=False)
    assert (noisy - x).var().item() == pytest.approx(variance, rel=0.01)
    clipped = corrupt(x, variance, noise, clip=True)
    assert clipped.min() >= 0 and clipped.max() <= 1


def test_psnr_is_the_mean_over_images_with_peak_one():
    x = torch.rand(3, 784)
    y = (x + 0.1 * torch.randn(3, 784)).clamp(0, 1)
    per_image = [10 * math.log10(1.0 / ((y[i] - x[i]) ** 2).mean().item()) for i in range(3)]
    metric = psnr_metric()
    metric.update(y[:2], x[:2])
    metric.update(y[2:], x[2:])
    assert metric.compute().item() == pytest.approx(sum(per_image) / 3, rel=1e-5)


def test_fixed_noise_depends_only_on_seed_and_batch():
    model = Autoencoder(noise_seed=7)
    x = torch.zeros(5, 784)
    assert torch.equal(model.fixed_noise(x, 3), model.fixed_noise(x, 3))
    assert not torch.equal(model.fixed_noise(x, 3), model.fixed_noise(x, 4))
    assert not torch.equal(model.fixed_noise(x, 3), Autoencoder(noise_seed=8).fixed_noise(x, 3))


def test_training_metrics_are_the_epoch_means_torchmetrics_and_lightning_give(tmp_path):
    # lr 0 keeps the weights fixed, so the reference can be computed after the epoch
    model = Autoencoder(hidden_dims=[32, 16], code_dim=8, l1_weight=1e-3, lr=0.0)
    batches = [torch.rand(20, 784), torch.rand(20, 784), torch.rand(7, 784)]
    trainer = bare_trainer(tmp_path, epochs=1)
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    logged = trainer.callback_metrics

    mse, psnr = MeanSquaredError(), PeakSignalNoiseRatio(data_range=1.0, dim=1)
    losses, penalties = [], []
    with torch.no_grad():
        for x in batches:
            recon, loss, penalty = model._loss(x, None)
            mse.update(recon, x)
            psnr.update(recon, x)
            losses.append(loss * len(x))
            penalties.append(penalty * len(x))
    images = sum(len(x) for x in batches)
    assert logged["train/mse"].item() == pytest.approx(mse.compute().item(), rel=1e-5)
    assert logged["train/psnr"].item() == pytest.approx(psnr.compute().item(), rel=1e-5)
    assert logged["train/loss"].item() == pytest.approx(sum(losses).item() / images, rel=1e-5)
    assert logged["train/l1"].item() == pytest.approx(sum(penalties).item() / images, rel=1e-5)


def test_psnr_metric_matches_torchmetrics_per_image_psnr():
    reference = PeakSignalNoiseRatio(data_range=1.0, dim=1)
    metric = psnr_metric()
    for size in (20, 20, 7):
        x = torch.rand(size, 784)
        y = (x + 0.2 * torch.rand(size, 784)).clamp(0, 1)
        reference.update(y, x)
        metric.update(y, x)
    assert metric.compute().item() == pytest.approx(reference.compute().item(), rel=1e-6)
