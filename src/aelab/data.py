"""MNIST and Fashion-MNIST served as in-memory tensors.

The images are read once through torchvision's dataset classes, scaled to [0, 1],
flattened to 784 values and kept as a single tensor. Batches are slices of that tensor,
so the training path has no per-image transform and no collate step.
"""

from __future__ import annotations

import logging
import math
import struct
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
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
    """A dataset whose items are whole batches: indexing with a list of rows slices them."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, rows: list[int]) -> torch.Tensor:
        return self.images[rows]


class EpochBatchSampler(BatchSampler):
    """A BatchSampler that passes `set_epoch` on to its sampler.

    Lightning calls `set_epoch` on a loader's sampler before every epoch; here that sampler
    is this batch sampler, and a DistributedSampler inside needs the epoch to reshuffle.
    """

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


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

    def train_dataloader(self) -> DataLoader:
        world_size, rank = self._ranks()
        if world_size > 1:
            # every rank shuffles with the same seed and takes its own share; the shares are
            # padded to equal length so that all ranks run the same number of steps
            sampler = DistributedSampler(
                self.train_images, world_size, rank, shuffle=True, seed=torch.initial_seed()
            )
        else:
            sampler = RandomSampler(self.train_images)
        return self._batches(self.train_images, sampler, self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        rows = self._eval_rows(self.val_images)
        return self._batches(self.val_images, rows, self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        rows = self._eval_rows(self.test_images)
        return self._batches(self.test_images, rows, self.hparams.eval_batch_size)

    def _ranks(self) -> tuple[int, int]:
        """World size and global rank of the trainer using this module (1, 0 without one)."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def _eval_rows(self, images: torch.Tensor):
        """Rows this rank evaluates: all of them, or under DDP every world_size-th batch.

        Whole batches, round robin, so that rank r's batch i is batch i * world_size + r of
        the whole set: the model seeds its fixed noise with that index, and every image
        is seen exactly once (no padding), so metrics synced across ranks are exact.
        """
        world_size, rank = self._ranks()
        if world_size == 1:
            return SequentialSampler(images)
        # Limitation: val/loss and test/loss average the ranks' means, exact for equal shares
        size, count = self.hparams.eval_batch_size, images.shape[0]
        if math.ceil(count / size) < world_size:
            # a rank without a batch would have no metrics to sync with the others
            raise ConfigError(
                f"data.eval_batch_size={size} gives fewer batches of the {count} evaluation "
                f"images than the {world_size} ranks; use at most {count // world_size}"
            )
        starts = range(rank * size, count, world_size * size)
        return [row for start in starts for row in range(start, min(start + size, count))]

    @staticmethod
    def _batches(images: torch.Tensor, sampler, batch_size: int) -> DataLoader:
        # batch_size=None: the sampler already yields whole batches of row indices; the
        # trainer must not replace it (use_distributed_sampler=false), as it shards itself
        batches = EpochBatchSampler(sampler, batch_size=batch_size, drop_last=False)
        return DataLoader(TensorBatches(images), sampler=batches, batch_size=None)
