"""Tests for ddpm_jax.data: the sources (bundled MNIST, tfds, image folders) and get_batch."""

import numpy as np
import pytest
from PIL import Image

from ddpm_jax import data


# ---- get_batch: stateless, deterministic, epoch-covering, host-shardable --------------------


def test_get_batch_is_deterministic_and_depends_on_seed_and_step():
    x = np.arange(50)
    a = data.get_batch(x, step=3, batch_size=8, seed=0)
    assert a.shape == (8,)
    np.testing.assert_array_equal(a, data.get_batch(x, step=3, batch_size=8, seed=0))
    assert not np.array_equal(a, data.get_batch(x, step=3, batch_size=8, seed=1))
    assert not np.array_equal(a, data.get_batch(x, step=4, batch_size=8, seed=0))


def test_each_epoch_visits_every_example_once_and_batches_wrap_across_epochs():
    n, bs = 10, 4  # 5 steps = exactly 2 epochs; steps 2 and 4 straddle an epoch boundary
    x = np.arange(n)
    stream = np.concatenate([data.get_batch(x, s, bs, seed=7) for s in range(5)])
    epoch0, epoch1 = stream[:n], stream[n:]
    np.testing.assert_array_equal(np.sort(epoch0), x)
    np.testing.assert_array_equal(np.sort(epoch1), x)
    assert not np.array_equal(epoch0, epoch1)  # a fresh shuffle per epoch
    np.testing.assert_array_equal(epoch1, np.random.default_rng([7, 1]).permutation(n))


def test_host_shares_concatenate_to_the_global_batch():
    x = np.arange(2 * 37).reshape(37, 2)  # any trailing shape
    full = data.get_batch(x, step=5, batch_size=12, seed=3)
    shares = [data.get_batch(x, 5, 12, 3, process_index=p, process_count=4) for p in range(4)]
    assert all(s.shape == (3, 2) for s in shares)
    np.testing.assert_array_equal(np.concatenate(shares), full)
    with pytest.raises(ValueError, match="not divisible"):
        data.get_batch(x, 0, 10, 0, process_index=0, process_count=4)


# ---- sources ----------------------------------------------------------------------------------


def test_mnist_bundled_sizes_range_and_labels():
    d = data.load_dataset_with_labels({"name": "mnist_bundled", "image_size": 16, "channels": 1})
    assert d.images.shape == (5000, 16, 16, 1) and d.images.dtype == np.float32
    assert d.images.min() == -1.0 and d.images.max() == 1.0
    assert d.labels.shape == (5000,) and d.num_classes == 10
    assert set(np.unique(d.labels)) == set(range(10))
    # 28 -> 32 pads with background; the original digit sits unchanged in the centre
    padded = data.load_dataset({"name": "mnist_bundled", "image_size": 32, "channels": 1, "num_examples": 3})
    plain = data.load_dataset({"name": "mnist_bundled", "image_size": 28, "channels": 1, "num_examples": 3})
    np.testing.assert_array_equal(padded[:, 2:30, 2:30], plain)
    assert (padded[:, :2] == -1).all()


def test_tfds_source_on_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        d = data.load_dataset_with_labels({"name": "tfds:cifar10", "image_size": 16, "channels": 3})
        assert d.images.shape == (5, 16, 16, 3) and d.images.dtype == np.float32
        assert -1.0 <= d.images.min() and d.images.max() <= 1.0
        assert d.labels.shape == (5,) and d.num_classes == 10
        gray = data.load_dataset({"name": "tfds:mnist:test", "image_size": 32, "channels": 1})
        assert gray.shape == (5, 32, 32, 1)


def test_tfds_dataset_not_prepared_gives_a_how_to_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build mnist"):
        data.load_dataset({"name": "tfds:mnist", "image_size": 28, "channels": 1, "data_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="no dataset named"):
        data.load_dataset({"name": "tfds:no_such_dataset", "image_size": 28, "channels": 1})


def test_image_folder_resizes_crops_and_converts(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((20, 20), 255, np.uint8)).save(tmp_path / "sub" / "b.png")
    (tmp_path / "notes.txt").write_text("not an image")
    rgb = data.load_dataset_with_labels({"name": f"folder:{tmp_path}", "image_size": 8, "channels": 3})
    assert rgb.images.shape == (2, 8, 8, 3) and rgb.labels is None
    np.testing.assert_allclose(rgb.images[1], 1.0)  # white stays white after resize to RGB
    gray = data.load_dataset({"name": f"folder:{tmp_path}", "image_size": 8, "channels": 1})
    assert gray.shape == (2, 8, 8, 1)


def test_empty_or_missing_folder_and_unknown_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="contains no images"):
        data.load_dataset({"name": f"folder:{tmp_path}", "image_size": 8, "channels": 3})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_dataset({"name": f"folder:{tmp_path}/nope", "image_size": 8, "channels": 3})
    with pytest.raises(ValueError, match="unknown data.name"):
        data.load_dataset({"name": "imagenet", "image_size": 8, "channels": 3})
