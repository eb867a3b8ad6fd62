import pytest
import torch
from conftest import SIZES
from torch.utils.data import BatchSampler, RandomSampler

from aelab.data import ImageDataModule, ShuffledBatches, check_idx_file, load_images
from aelab.errors import DataError


@pytest.mark.parametrize("name", ["mnist", "fmnist"])
def test_datamodule_serves_flat_images_in_unit_range(data_dir, name):
    dm = ImageDataModule(name=name, data_dir=str(data_dir), batch_size=32, val_size=50)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")

    assert dm.train_images.shape == (SIZES["train"] - 50, 784)
    assert dm.val_images.shape == (50, 784)
    assert dm.test_images.shape == (SIZES["test"], 784)
    for images in (dm.train_images, dm.val_images, dm.test_images):
        assert images.dtype == torch.float32
        assert 0.0 <= images.min() and images.max() <= 1.0
        assert images.max() > 0.5

    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (32, 784)
    assert sum(len(b) for b in dm.val_dataloader()) == 50


def test_split_is_fixed_by_its_seed_and_disjoint(data_dir):
    def split(seed):
        dm = ImageDataModule(data_dir=str(data_dir), val_size=50, split_seed=seed)
        dm.setup("fit")
        return dm.train_images, dm.val_images

    train_a, val_a = split(1)
    train_b, val_b = split(1)
    _, val_c = split(2)
    assert torch.equal(val_a, val_b) and torch.equal(train_a, train_b)
    assert not torch.equal(val_a, val_c)
    # no validation image is also a training image
    assert torch.cdist(val_a, train_a).min() > 0


def test_missing_files_offline_name_the_folder_and_files(tmp_path):
    with pytest.raises(DataError) as info:
        load_images("fmnist", tmp_path, train=True)
    message = str(info.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "\n" not in message


def test_truncated_file_is_named(data_dir, tmp_path):
    source = data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    broken = tmp_path / "t10k-images-idx3-ubyte"
    broken.write_bytes(source.read_bytes()[:-100])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: size is"):
        check_idx_file(broken)


def test_wrong_magic_number_is_named(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x09\x99" + bytes(100))
    with pytest.raises(DataError, match="wrong magic number"):
        check_idx_file(bad)


def test_shuffled_batches_are_those_of_a_random_batch_sampler():
    # on the CPU the batches match what RandomSampler in a BatchSampler gives for one seed
    torch.manual_seed(3)
    batches = list(ShuffledBatches(50, 16, torch.device("cpu")))
    torch.manual_seed(3)
    reference = list(BatchSampler(RandomSampler(range(50)), batch_size=16, drop_last=False))

    assert [b.tolist() for b in batches] == reference
    assert len(ShuffledBatches(50, 16, torch.device("cpu"))) == len(reference) == 4


def test_sequential_batches_are_views_covering_every_row_once(data_dir):
    dm = ImageDataModule(data_dir=str(data_dir), val_size=50, eval_batch_size=20)
    dm.setup("fit")
    batches = list(dm.val_dataloader())

    assert [len(b) for b in batches] == [20, 20, 10]
    assert torch.equal(torch.cat(batches), dm.val_images)
    assert batches[0].untyped_storage().data_ptr() == dm.val_images.untyped_storage().data_ptr()
