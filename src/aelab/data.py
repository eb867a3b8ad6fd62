"""MNIST and Fashion-MNIST served as in-memory tensors.

The images are read once through torchvision's dataset classes, scaled to [0, 1],
flattened to 784 values and kept as a single tensor (on the GPU when training runs on
one). Batches are slices of that tensor, cut by a tensor of row indices, so the training
path has no per-image transform, no collate step and no copy from the host per step.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    Sampler,
)
from torchvision.datasets import MNIST, FashionMNIST

from aelab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DATASETS = {"mnist": MNIST, "fmnist": FashionMNIST}
IMAGE_SIDE = 28
NUM_PIXELS = IMAGE_SIDE * IMAGE_SIDE

# magic numbers of the IDX format: unsigned bytes with 3 dimensions (images) or 1 (labels)
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


class TensorBatches(Dataset):
    """A dataset whose items are whole batches: indexing with a tensor of rows or a slice."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, rows: torch.Tensor | slice) -> torch.Tensor:
        return self.images[rows]


class EpochBatchSampler(BatchSampler):
    """A BatchSampler that passes `set_epoch` on to its sampler.

    Lightning calls `set_epoch` on a loader's sampler before every epoch; here that sampler
    is this batch sampler, and a DistributedSampler inside needs the epoch to reshuffle.
    """

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


class ShuffledBatches(Sampler[torch.Tensor]):
    """Each epoch, a random permutation of the rows cut into batches of row indices.

    The permutation is drawn on the device the images live on, from a seed taken from
    torch's global generator, as `RandomSampler` draws it: on the CPU the batches are the
    ones a `RandomSampler` inside a `BatchSampler` gives, without a Python list per batch.
    """

    def __init__(self, num_rows: int, batch_size: int, device: torch.device) -> None:
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.device = device

    def __len__(self) -> int:
        return math.ceil(self.num_rows / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        generator = torch.Generator(device=self.device).manual_seed(seed)
        order = torch.randperm(self.num_rows, generator=generator, device=self.device)
        return iter(order.split(self.batch_size))


class SequentialBatches(Sampler[slice]):
    """Consecutive slices of `batch_size` rows: batches that are views, not copies.

    With `world_size` > 1, rank `rank` takes every `world_size`-th batch, starting at its
    own: its batch i is batch i * world_size + rank of the whole set.
    """

    def __init__(self, num_rows: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return len(self._starts())

    def __iter__(self) -> Iterator[slice]:
        for start in self._starts():
            yield slice(start, min(start + self.batch_size, self.num_rows))

    def _starts(self) -> range:
        step = self.world_size * self.batch_size
        return range(self.rank * self.batch_size, self.num_rows, step)


def raw_files(dataset: str) -> list[str]:
    """Names of the uncompressed IDX files torchvision expects for `dataset`."""
    return [Path(url).stem for url, _ in DATASETS[dataset].resources]


def check_idx_file(path: Path) -> None:
    """Raise a DataError naming `path` if its IDX header or size is not that of MNIST."""
    size = path.stat().st_size
    with path.open("rb") as f:
        data = f.read(16)
    if len(data) < 8:
        raise DataError(
            f"{path}: file is truncated ({len(data)} bytes); delete it and download again"
        )
    magic, count = struct.unpack(">II", data[:8])
    if magic == IMAGES_MAGIC:
        if len(data) < 16:
            raise DataError(f"{path}: image header is truncated; delete it and download again")
        rows, cols = struct.unpack(">II", data[8:16])
        if (rows, cols) != (IMAGE_SIDE, IMAGE_SIDE):
            raise DataError(
                f"{path}: images are {rows}x{cols}, expected {IMAGE_SIDE}x{IMAGE_SIDE}; "
                "point paths.data_dir at MNIST-format files"
            )
        expected = 16 + count * rows * cols
    elif magic == LABELS_MAGIC:
        expected = 8 + count
    else:
        raise DataError(
            f"{path}: wrong magic number {magic:#010x} (expected {IMAGES_MAGIC:#010x} for images "
            f"or {LABELS_MAGIC:#010x} for labels); the file is corrupt or not an IDX file"
        )
    if size != expected:
        raise DataError(
            f"{path}: size is {size} bytes but its header announces {expected}; "
            "the file is truncated or corrupt, delete it and download again"
        )


def ensure_files(dataset: str, data_dir: str | Path, download: bool) -> None:
    """Download `dataset` if its IDX files are missing, then check their headers and sizes."""
    if dataset not in DATASETS:
        raise DataError(f"data.name={dataset!r} is unknown; choose one of {sorted(DATASETS)}")
    cls = DATASETS[dataset]
    raw_dir = Path(data_dir) / cls.__name__ / "raw"
    missing = [name for name in raw_files(dataset) if not (raw_dir / name).is_file()]

    if missing and download:
        try:
            cls(str(data_dir), train=True, download=True)
        except Exception as err:  # torchvision raises a bare RuntimeError when offline
            log.warning("download of %s failed: %s", dataset, str(err).splitlines()[0])
        missing = [name for name in raw_files(dataset) if not (raw_dir / name).is_file()]
    if missing:
        raise DataError(
            f"{dataset} files not found in {raw_dir} (missing: {', '.join(missing)}) and they "
            "could not be downloaded; set paths.data_dir or AELAB_DATA_DIR to a folder holding "
            f"{cls.__name__}/raw/ with those IDX files"
        )
    for name in raw_files(dataset):
        check_idx_file(raw_dir / name)


def load_images(dataset: str, data_dir: str | Path, train: bool) -> torch.Tensor:
    """Read one split of `dataset` as a float tensor of shape (N, 784) in [0, 1]."""
    ensure_files(dataset, data_dir, download=False)
    images = DATASETS[dataset](str(data_dir), train=train, download=False).data
    return images.reshape(images.shape[0], NUM_PIXELS).float().div_(255.0)


class ImageDataModule(L.LightningDataModule):
    """Serves one of MNIST / Fashion-MNIST as flattened images, without labels.

    The 60k training images are split into train and validation with a fixed seed, so
    every run (and every rank under DDP) sees the same split.
    """

    def __init__(
        self,
        name: str = "mnist",
        data_dir: str = "data",
        batch_size: int = 128,
        val_size: int = 5000,
        split_seed: int = 12345,
        download: bool = True,
        eval_batch_size: int = 1000,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_images: torch.Tensor | None = None
        self.val_images: torch.Tensor | None = None
        self.test_images: torch.Tensor | None = None

    def prepare_data(self) -> None:
        # runs on one process only: downloads if needed, and fails early on bad files
        ensure_files(self.hparams.name, self.hparams.data_dir, self.hparams.download)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in (None, "fit", "validate") and self.train_images is None:
            images = load_images(hp.name, hp.data_dir, train=True)
            if not 0 < hp.val_size < images.shape[0]:
                raise DataError(
                    f"data.val_size={hp.val_size} must be between 1 and {images.shape[0] - 1} "
                    f"for the {images.shape[0]} training images"
                )
            order = torch.randperm(
                images.shape[0], generator=torch.Generator().manual_seed(hp.split_seed)
            )
            self.val_images = images[order[: hp.val_size]].contiguous()
            self.train_images = images[order[hp.val_size :]].contiguous()
        if stage in (None, "test", "predict") and self.test_images is None:
            self.test_images = load_images(hp.name, hp.data_dir, train=False)
        self._move_to_trainer_device()

    def _move_to_trainer_device(self) -> None:
        # on a GPU the images are copied to it once, so that batches are cut on the device
        # and no step copies from the host; on the CPU they stay where they are
        if self.trainer is None or self.trainer.strategy.root_device.type == "cpu":
            return
        device = self.trainer.strategy.root_device
        for name in ("train_images", "val_images", "test_images"):
            images = getattr(self, name)
            if images is not None and images.device != device:
                setattr(self, name, images.to(device))

    def train_dataloader(self) -> DataLoader:
        images = self.train_images
        world_size, rank = self._ranks()
        if world_size == 1:
            return self._batches(
                images, ShuffledBatches(len(images), self.hparams.batch_size, images.device)
            )
        # every rank shuffles with the same seed and takes its own share; the shares are
        # padded to equal length so that all ranks run the same number of steps
        seed = torch.initial_seed()
        shard = DistributedSampler(images, world_size, rank, shuffle=True, seed=seed)
        return self._batches(
            images, EpochBatchSampler(shard, self.hparams.batch_size, drop_last=False)
        )

    def val_dataloader(self) -> DataLoader:
        return self._batches(self.val_images, self._eval_batches(self.val_images))

    def test_dataloader(self) -> DataLoader:
        return self._batches(self.test_images, self._eval_batches(self.test_images))

    def _ranks(self) -> tuple[int, int]:
        """World size and global rank of the trainer using this module (1, 0 without one)."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def _eval_batches(self, images: torch.Tensor) -> SequentialBatches:
        """The batches this rank evaluates: all of them, or under DDP every world_size-th.

        Whole batches, round robin, so that rank r's batch i is batch i * world_size + r of
        the whole set: the model seeds its fixed noise with that index, and every image
        is seen exactly once (no padding), so metrics synced across ranks are exact.
        """
        world_size, rank = self._ranks()
        size, count = self.hparams.eval_batch_size, images.shape[0]
        # Limitation: val/loss and test/loss average the ranks' means, exact for equal shares
        if math.ceil(count / size) < world_size:
            # a rank without a batch would have no metrics to sync with the others
            raise ConfigError(
                f"data.eval_batch_size={size} gives fewer batches of the {count} evaluation "
                f"images than the {world_size} ranks; use at most {count // world_size}"
            )
        return SequentialBatches(count, size, rank, world_size)

    @staticmethod
    def _batches(images: torch.Tensor, sampler: Sampler) -> DataLoader:
        # batch_size=None: the sampler already yields whole batches of rows; the trainer
        # must not replace it (use_distributed_sampler=false), as it shards itself
        return DataLoader(TensorBatches(images), sampler=sampler, batch_size=None)
