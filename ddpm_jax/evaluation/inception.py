"""The Inception-v3 network of the standard FID, in Flax: pytorch-fid's ``InceptionV3(use_fid_inception=True)``.

FID (Heusel et al. 2017) and IS (Salimans et al. 2016) numbers are only comparable when they come
from the same network with the same weights and the same input handling. The standard is the
TensorFlow graph ``inception-2015-12-05`` that the original FID code used; pytorch-fid ported it to
PyTorch (``pt_inception-2015-12-05-6726825d.pth``), and this module reproduces that port exactly:

* torchvision's Inception-v3 layout (``Conv2d_1a_3x3`` … ``Mixed_7c``, each convolution a
  :class:`BasicConv2d`: conv without bias, BatchNorm with ε = 1e-3 in inference mode, ReLU);
* the four FID patches of that port: in the A, C and first E blocks (``Mixed_5b-d``, ``Mixed_6b-e``,
  ``Mixed_7b``) the 3×3 average pool ignores the zero padding (TensorFlow's pool,
  ``count_include_pad=False``); in the last E block (``Mixed_7c``) the pool branch is a 3×3 *max*
  pool (a quirk of the TF graph);
* a 1008-way classifier ``fc`` (1000 ImageNet classes + 8 unused) on the 2048-d ``pool3`` features.

Input convention (the one place it is handled: :func:`inception_input`). The network expects
299×299 RGB in [−1, 1]. pytorch-fid takes [0, 1] images, resizes them bilinearly to 299×299
(``F.interpolate(mode="bilinear", align_corners=False)``, no antialiasing) and maps them to [−1, 1]
(``normalize_input``: x ↦ 2x − 1). Our images are already in [−1, 1] (NHWC), so that step is the
identity here; resizing first or normalising first gives the same result because bilinear weights sum
to 1. Grayscale images (C = 1) are repeated to 3 channels, and results record that they were.

Weights: :func:`load_inception` reads a file the user supplies (nothing is downloaded):

* the original ``pt_inception-2015-12-05-6726825d.pth`` from
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth ,
  read without torch by :mod:`ddpm_jax.pretrained.torch_pickle` (its SHA-256 is checked against the 6726825d in
  the name, as torch.hub does), put at ``~/.cache/ddpm_jax/pt_inception-2015-12-05-6726825d.pth`` or
  wherever ``$DDPM_JAX_INCEPTION`` points;
* or a ``.safetensors`` with the same keys, made with our converter (no torch needed)::

      python -m ddpm_jax.pretrained.torch_pickle pt_inception-2015-12-05-6726825d.pth pt_inception.safetensors

  or with torch::

      import torch; from safetensors.torch import save_file
      sd = torch.load("pt_inception-2015-12-05-6726825d.pth", map_location="cpu")
      save_file({k: v.contiguous() for k, v in sd.items()}, "pt_inception.safetensors")

Parameter names are the PyTorch ones (``Mixed_5b/branch5x5_1/conv/kernel``); BatchNorm running
statistics live in Flax's ``batch_stats`` collection (``running_mean`` → ``mean``, ``running_var`` → ``var``).
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.pretrained import torch_pickle
from ddpm_jax.pretrained.convert import convert_state_dict
from ddpm_jax.progress import progress_bar

INCEPTION_SIZE = 299  # the network's input resolution
NUM_FEATURES = 2048  # pool3
NUM_CLASSES = 1008  # fc: 1000 ImageNet classes + 8 unused
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
WEIGHTS_ENV = "DDPM_JAX_INCEPTION"  # environment variable overriding the default weights path
PRECISION = jax.lax.Precision.HIGHEST  # full float32 convolutions also on GPU/TPU (no TF32/bf16 passes)

Kernel = int | tuple[int, int]


def _pair(value: Kernel) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm (ε = 1e-3, running statistics) → ReLU: every convolution of Inception."""

    features: int
    kernel_size: Kernel
    strides: int = 1
    padding: Kernel = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] → [B, H', W', features]
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel_size), strides=self.strides, padding=((ph, ph), (pw, pw)),
                    use_bias=False, precision=PRECISION, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3×3 average, stride 1, 'same' size, averaging only real pixels (TensorFlow's pool; FID patch)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3(x: jax.Array, stride: int = 2) -> jax.Array:
    """3×3 max; stride 2 without padding (the reductions), or stride 1 'same' (the Mixed_7c patch)."""
    padding = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class InceptionA(nn.Module):
    """Mixed_5b/c/d: 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avg-pool→1×1 ([B, 35, 35, 224 + pool_features])."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = BasicConv2d(64, 1, name="branch1x1")(x)
        branch5x5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        branch5x5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(branch5x5)
        branch3x3dbl = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(branch3x3dbl)
        branch_pool = BasicConv2d(self.pool_features, 1, name="branch_pool")(avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a, the 35→17 reduction: 3×3/2 | 1×1→3×3→3×3/2 | max-pool/2 ([B, 17, 17, 768])."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = BasicConv2d(384, 3, strides=2, name="branch3x3")(x)
        branch3x3dbl = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv2d(96, 3, strides=2, name="branch3x3dbl_3")(branch3x3dbl)
        return jnp.concatenate([branch3x3, branch3x3dbl, max_pool_3x3(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b-e: 1×1 | factorised 7×7 (1×7, 7×1) | two of them | avg-pool→1×1 ([B, 17, 17, 768])."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        branch1x1 = BasicConv2d(192, 1, name="branch1x1")(x)
        branch7x7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        branch7x7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7)
        branch7x7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7)
        branch7x7dbl = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        branch7x7dbl = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(branch7x7dbl)
        branch7x7dbl = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(branch7x7dbl)
        branch7x7dbl = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(branch7x7dbl)
        branch7x7dbl = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(branch7x7dbl)
        branch_pool = BasicConv2d(192, 1, name="branch_pool")(avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a, the 17→8 reduction: 1×1→3×3/2 | 1×1→1×7→7×1→3×3/2 | max-pool/2 ([B, 8, 8, 1280])."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        branch3x3 = BasicConv2d(320, 3, strides=2, name="branch3x3_2")(branch3x3)
        branch7x7x3 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        branch7x7x3 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
        branch7x7x3 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
        branch7x7x3 = BasicConv2d(192, 3, strides=2, name="branch7x7x3_4")(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, max_pool_3x3(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b/c: 1×1 | 1×1→(1×3 ‖ 3×1) | 1×1→3×3→(1×3 ‖ 3×1) | pool→1×1 ([B, 8, 8, 2048]).

    ``pool="avg"`` (Mixed_7b, padding not counted) or ``"max"`` (Mixed_7c): the two FID patches.
    """

    pool: str = "avg"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = BasicConv2d(320, 1, name="branch1x1")(x)
        branch3x3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        branch3x3 = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3),
        ], axis=-1)
        branch3x3dbl = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(branch3x3dbl),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(branch3x3dbl),
        ], axis=-1)
        pooled = avg_pool_3x3(x) if self.pool == "avg" else max_pool_3x3(x, stride=1)
        branch_pool = BasicConv2d(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionV3(nn.Module):
    """pytorch-fid's FID Inception: [B, 299, 299, 3] in [−1, 1] → a dict of activations.

    Returns ``block_0`` [B, 73, 73, 64] (after the first max pool), ``block_1`` [B, 35, 35, 192]
    (second max pool), ``block_2`` [B, 17, 17, 768] (Mixed_6e, the aux-classifier input): pytorch-fid's
    output blocks 0–2; ``pool3`` [B, 2048] (block 3, the FID features); ``logits`` [B, 1008] (the fc
    layer) and ``logits_unbiased`` [B, 1008] = pool3 · W without the fc bias, which is what the
    original Inception Score code used (and torch-fidelity's ``logits_unbiased``).
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        x = BasicConv2d(32, 3, strides=2, name="Conv2d_1a_3x3")(x)  # [B, 149, 149, 32]
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)  # [B, 147, 147, 32]
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)  # [B, 147, 147, 64]
        block_0 = x = max_pool_3x3(x)  # [B, 73, 73, 64]
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)  # [B, 73, 73, 80]
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)  # [B, 71, 71, 192]
        block_1 = x = max_pool_3x3(x)  # [B, 35, 35, 192]
        x = InceptionA(32, name="Mixed_5b")(x)  # [B, 35, 35, 256]
        x = InceptionA(64, name="Mixed_5c")(x)  # [B, 35, 35, 288]
        x = InceptionA(64, name="Mixed_5d")(x)  # [B, 35, 35, 288]
        x = InceptionB(name="Mixed_6a")(x)  # [B, 17, 17, 768]
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        block_2 = x = InceptionC(192, name="Mixed_6e")(x)  # [B, 17, 17, 768]
        x = InceptionD(name="Mixed_7a")(x)  # [B, 8, 8, 1280]
        x = InceptionE("avg", name="Mixed_7b")(x)  # [B, 8, 8, 2048]
        x = InceptionE("max", name="Mixed_7c")(x)  # [B, 8, 8, 2048]
        pool3 = jnp.mean(x, axis=(1, 2))  # [B, 2048]; dropout is inactive at inference
        fc = nn.Dense(NUM_CLASSES, precision=PRECISION, name="fc")
        logits = fc(pool3)  # [B, 1008]
        logits_unbiased = jnp.dot(pool3, fc.variables["params"]["kernel"], precision=PRECISION)
        return {"block_0": block_0, "block_1": block_1, "block_2": block_2, "pool3": pool3,
                "logits": logits, "logits_unbiased": logits_unbiased}


# --------------------------------------------------------------------------------------------
# Input handling: the one place the image convention is dealt with
# --------------------------------------------------------------------------------------------


def resize_bilinear(images: jax.Array, height: int, width: int) -> jax.Array:
    """[B, H, W, C] → [B, height, width, C], like ``F.interpolate(mode="bilinear", align_corners=False)``.

    Half-pixel centres and no antialiasing when shrinking (``jax.image.resize`` antialiases by default;
    PyTorch's bilinear does not), so the result equals pytorch-fid's resize (tested).
    """
    b, _, _, c = images.shape
    return jax.image.resize(images, (b, height, width, c), method="bilinear", antialias=False)


def quantize_8bit(images: jax.Array) -> jax.Array:
    """Round [−1, 1] images to the 256 levels of an 8-bit PNG (as diffusers' ``numpy_to_pil``), back in [−1, 1]."""
    levels = jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5)
    return levels / 127.5 - 1.0


def inception_input(images: jax.Array, quantize: bool = False) -> jax.Array:
    """Our images [B, H, W, C] in [−1, 1] (C = 1 or 3) → the network's input [B, 299, 299, 3] in [−1, 1].

    pytorch-fid maps [0, 1] inputs to [−1, 1] (x ↦ 2x − 1) after resizing; ours are in [−1, 1] already,
    so only the resize remains. Grayscale is repeated to RGB. ``quantize`` first rounds to 8 bits,
    which is what happens to samples saved as PNG before pytorch-fid reads them.
    """
    images = jnp.asarray(images, jnp.float32)
    if quantize:
        images = quantize_8bit(images)
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    if images.shape[1:3] != (INCEPTION_SIZE, INCEPTION_SIZE):
        images = resize_bilinear(images, INCEPTION_SIZE, INCEPTION_SIZE)
    return images


def check_images(images: Any, name: str = "images", range_tolerance: float = 0.1) -> np.ndarray:
    """Validate an image array for the Inception network: [N, H, W, 1 or 3] floats in [−1, 1].

    Raises ValueError (one line, with the fix) for uint8 or [0, 255] input, a wrong rank or channel
    count, non-finite values or values outside [−1 − tol, 1 + tol] (slight overshoot of unclipped
    samples is tolerated and clipped later); warns when every value is ≥ 0 (images in [0, 1]?).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{name} must be NHWC [N, H, W, 1 or 3], got shape {images.shape}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{name} have dtype {images.dtype}; ddpm_jax images are floats in [-1, 1]: "
                         "use images.astype(np.float32) / 127.5 - 1 for 8-bit images")
    low, high = float(np.min(images)), float(np.max(images))
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"{name} contain NaN or infinite values")
    if low < -1 - range_tolerance or high > 1 + range_tolerance:
        hint = "images in [0, 255]? use x / 127.5 - 1" if high > 2 else "clip them with np.clip(x, -1, 1)"
        raise ValueError(f"{name} have values in [{low:.3g}, {high:.3g}], expected [-1, 1]: {hint}")
    if low >= 0:
        warnings.warn(f"all {name} values are >= 0 (range [{low:.3g}, {high:.3g}]): images in [0, 1]? "
                      "ddpm_jax images are in [-1, 1]: use 2 * x - 1", RuntimeWarning, stacklevel=3)
    return images


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def default_weights_path() -> Path:
    """``$DDPM_JAX_INCEPTION`` if set, else ``~/.cache/ddpm_jax/pt_inception-2015-12-05-6726825d.pth``."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ddpm_jax" / WEIGHTS_FILE


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_weights(path: str | Path) -> dict[str, np.ndarray]:
    """A state dict from ``.safetensors`` (NumPy loader) or any ``torch.save`` file (torch-free reader)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(path)
    return torch_pickle.load_state_dict(path)


def _variable_key(torch_key: str) -> str:
    """``Mixed_5b.branch1x1.bn.running_mean`` → ``batch_stats.Mixed_5b.branch1x1.bn.mean``; others ``params.…``."""
    for old, new in ((".running_mean", ".mean"), (".running_var", ".var")):
        if torch_key.endswith(old):
            return "batch_stats." + torch_key[: -len(old)] + new
    return "params." + torch_key


def inception_variables_from_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, Any]:
    """pytorch-fid's state dict → ``{"params": …, "batch_stats": …}`` (mismatches listed in a ValueError)."""
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    target = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32))
    return convert_state_dict(state_dict, target, rename=_variable_key)


class Inception:
    """The FID Inception with its weights: batched, jitted features and logits of image arrays.

    ``features(images)`` → pool3 [N, 2048]; ``logits(images)`` → [N, 1008]; images NHWC in [−1, 1]
    (checked by :func:`check_images`), any size (resized to 299×299), 1 or 3 channels.
    """

    def __init__(self, variables: dict[str, Any], weights: str = "random"):
        self.module, self.variables, self.weights = InceptionV3(), variables, weights
        self._network = jax.jit(self._apply, static_argnames="names")  # once per batch size: inputs are 299×299
        self._prepare = jax.jit(inception_input, static_argnames="quantize")  # once per input shape

    def _apply(self, variables: dict[str, Any], x: jax.Array, names: tuple[str, ...]) -> dict[str, jax.Array]:
        outputs = self.module.apply(variables, x)
        return {name: outputs[name] for name in names}  # only these leave the device; XLA drops the rest

    def outputs(self, images: Any, names: Sequence[str] = ("pool3", "logits_unbiased"), batch_size: int = 50,
                quantize: bool = False, progress: bool = True) -> dict[str, np.ndarray]:
        """The named outputs of :class:`InceptionV3` for every image, as float32 NumPy arrays.

        Images are processed in batches of ``batch_size`` (the last one zero-padded, so the network is
        compiled once); ``quantize`` rounds them to 8 bits first (see :func:`quantize_8bit`).
        """
        images = check_images(images)
        n = images.shape[0]
        batch_size = min(batch_size, n)
        outputs: dict[str, list[np.ndarray]] = {name: [] for name in names}
        returned = tuple(sorted({*names, "pool3", "logits", "logits_unbiased"}))  # small: one compile serves all
        for start in progress_bar(range(0, n, batch_size), desc="Inception", unit="batch", disable=not progress,
                                  leave=False):
            batch = images[start : start + batch_size]
            count = batch.shape[0]
            if count < batch_size:
                batch = np.concatenate([batch, np.zeros((batch_size - count, *batch.shape[1:]), batch.dtype)])
            result = self._network(self.variables, self._prepare(batch, quantize=quantize), names=returned)
            for name in names:
                outputs[name].append(np.asarray(result[name][:count], np.float32))
        return {name: np.concatenate(values) for name, values in outputs.items()}

    def features(self, images: Any, **kwargs: Any) -> np.ndarray:
        """pool3 features [N, 2048] (the FID features); kwargs as :meth:`outputs`."""
        return self.outputs(images, names=("pool3",), **kwargs)["pool3"]

    def logits(self, images: Any, bias: bool = False, **kwargs: Any) -> np.ndarray:
        """Class logits [N, 1008]; without the fc bias by default, as the original Inception Score code."""
        name = "logits" if bias else "logits_unbiased"
        return self.outputs(images, names=(name,), **kwargs)[name]


def load_inception(path: str | Path | None = None) -> Inception:
    """The FID Inception with pytorch-fid's weights from ``path`` (default: :func:`default_weights_path`).

    ``path`` is the original ``.pth`` (read without torch) or a ``.safetensors`` with the same keys.
    Raises FileNotFoundError saying where to get the file and where to put it; ValueError when a file
    named ``…-<sha256 prefix>.pth`` does not have that hash, or when its keys/shapes do not match.
    """
    path = Path(path).expanduser() if path is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {path}: download {WEIGHTS_URL} (pytorch-fid's FID Inception) and "
            f"put it at {default_weights_path()}, or set {WEIGHTS_ENV}=/path/to/{WEIGHTS_FILE} (or a .safetensors "
            "made with `python -m ddpm_jax.pretrained.torch_pickle IN.pth OUT.safetensors`), or pass path=")
    sha256 = _sha256(path)
    expected = re.search(r"-([0-9a-f]{8,64})\.pth$", path.name)
    if expected and not sha256.startswith(expected[1]):
        raise ValueError(f"{path} has SHA-256 {sha256[:16]}…, not {expected[1]}… as its name says: the download "
                         f"is corrupt or not the original; download {WEIGHTS_URL} again")
    variables = inception_variables_from_state_dict(read_weights(path))
    return Inception(variables, weights=f"{path.name} (sha256 {sha256[:8]})")


__all__ = ["INCEPTION_SIZE", "NUM_CLASSES", "NUM_FEATURES", "WEIGHTS_ENV", "WEIGHTS_FILE", "WEIGHTS_URL",
           "BasicConv2d", "Inception", "InceptionA", "InceptionB", "InceptionC", "InceptionD", "InceptionE",
           "InceptionV3", "check_images", "default_weights_path", "inception_input",
           "inception_variables_from_state_dict", "load_inception", "quantize_8bit", "read_weights",
           "resize_bilinear"]
