"""FID and Inception Score of image arrays, with the protocol that produced each number.

FID (Heusel et al. 2017): the Fréchet distance (:func:`~ddpm_jax.evaluation.frechet.frechet_distance`)
between Gaussians fitted to the pool3 features of generated and reference images,

    FID = ‖μ_g − μ_r‖² + Tr(Σ_g + Σ_r − 2 (Σ_g Σ_r)^{1/2}).

IS (Salimans et al. 2016), with p(y|x) the Inception softmax and p(y) its mean over the images,

    IS = exp( E_x KL(p(y|x) ‖ p(y)) ),

computed on ``splits`` equal parts of the images and reported as mean ± std over the parts.

Both numbers depend on details that papers rarely print (network weights, resize, 8-bit rounding,
how grayscale was handled, number of samples, the reference set), so every result carries a
:class:`FIDProtocol` that says all of them. The DDPM paper reports FID on 50,000 samples against the
CIFAR-10 training set (Ho et al. 2020, Table 1) and IS on 50,000 samples with 10 splits.

    inception = load_inception()                           # pytorch-fid's weights, see inception.py
    result = compute_fid(samples, "cifar10_train.npz", inception=inception)
    print(result["fid"], result["protocol"])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import logsumexp

from ddpm_jax.evaluation.frechet import feature_statistics, frechet_distance
from ddpm_jax.evaluation.inception import INCEPTION_SIZE, NUM_FEATURES, Inception, check_images, load_inception

RESIZE = f"bilinear to {INCEPTION_SIZE}x{INCEPTION_SIZE} (align_corners=False, no antialias; as pytorch-fid)"
NETWORK = "pytorch-fid InceptionV3 (FID Inception, TF 2015-12-05 graph)"
IS_LOGITS = "softmax of pool3 · W (fc without bias, 1008 classes)"


@dataclass(frozen=True)
class FIDProtocol:
    """Everything that decides an FID or IS number; ``str()`` is one line for logs, ``to_dict()`` for JSON."""

    metric: str  # "FID" or "IS"
    num_samples: int
    sample_shape: tuple[int, int, int]  # (H, W, C) of the evaluated images
    weights: str  # weights file name and SHA-256 prefix
    quantize: bool  # images rounded to 8 bits first, as when saved to PNG
    grayscale_to_rgb: bool  # one-channel images repeated to 3 channels
    features: str  # "pool3 (2048)" for FID; the logits used for IS
    reference: str | None = None  # FID: reference set name/split or statistics file
    num_reference: int | None = None  # FID: reference images used (None: from a statistics file)
    splits: int | None = None  # IS splits (also on FID results that carry the samples' IS)
    resize: str = RESIZE
    network: str = NETWORK

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        h, w, c = self.sample_shape
        parts = [f"{self.metric}: {self.num_samples} samples {h}x{w}x{c}"]
        if self.reference is not None:
            count = f"{self.num_reference} images" if self.num_reference is not None else "precomputed statistics"
            parts.append(f"reference {self.reference} ({count})")
        if self.splits is not None:
            parts.append(f"{self.splits} splits")
        parts += [f"{self.network}, weights {self.weights}", self.features, f"resize {self.resize}",
                  "8-bit quantized" if self.quantize else "not quantized"]
        if self.grayscale_to_rgb:
            parts.append("grayscale repeated to RGB")
        return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------


def inception_score(logits: Any, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over ``splits`` parts of IS = exp(E_x KL(p(y|x) ‖ p(y))), p(y|x) = softmax(logits).

    logits [N, K]. Parts are ``logits[i·N//splits : (i+1)·N//splits]`` and the std is NumPy's
    (ddof = 0), as in Salimans et al.'s code; computed in float64 log space, so classes with zero
    probability add exactly 0.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, num_classes], got shape {logits.shape}")
    if not isinstance(splits, (int, np.integer)) or splits < 1:
        raise ValueError(f"splits must be a positive integer, got {splits!r}")
    n = logits.shape[0]
    if n < splits:
        raise ValueError(f"{n} samples cannot be cut into {splits} splits; use fewer splits or more samples")
    if not np.isfinite(logits).all():
        raise ValueError("logits contain NaN or infinite values")
    log_p = logits - logsumexp(logits, axis=1, keepdims=True)  # log p(y|x)  [N, K]
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]
        log_py = logsumexp(part, axis=0) - np.log(part.shape[0])  # log p(y) = log mean_x p(y|x)  [K]
        kl = np.sum(np.exp(part) * (part - log_py), axis=1)  # KL(p(y|x) ‖ p(y))  [n_i]
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------------
# Statistics files (pytorch-fid's .npz: mu, sigma)
# --------------------------------------------------------------------------------------------


def save_statistics(path: str | Path, mu: Any, sigma: Any) -> None:
    """Write (μ [D], Σ [D, D]) as pytorch-fid does: ``np.savez_compressed(path, mu=mu, sigma=sigma)``."""
    mu, sigma = _check_statistics(np.asarray(mu), np.asarray(sigma), str(path))
    np.savez_compressed(path, mu=mu, sigma=sigma)


def load_statistics(path: str | Path, dim: int | None = NUM_FEATURES) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) from a pytorch-fid-style ``.npz`` (keys ``mu``, ``sigma``); ``dim`` checks D (None: any)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no statistics file {path}; make one with compute_statistics + save_statistics")
    with np.load(path, allow_pickle=False) as data:
        missing = [key for key in ("mu", "sigma") if key not in data.files]
        if missing:
            raise ValueError(f"{path} lacks key(s) {missing} (has {data.files}); FID statistics files hold 'mu' and "
                             "'sigma' as written by pytorch-fid or save_statistics")
        mu, sigma = data["mu"], data["sigma"]
    mu, sigma = _check_statistics(mu, sigma, str(path))
    if dim is not None and mu.shape[0] != dim:
        raise ValueError(f"{path} holds {mu.shape[0]}-d statistics, expected {dim}-d (Inception pool3 features)")
    return mu, sigma


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{where}: mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    return mu, sigma


# --------------------------------------------------------------------------------------------
# Drivers
# --------------------------------------------------------------------------------------------


def _check_count(n: int, min_samples: int, name: str) -> None:
    if n < min_samples:
        raise ValueError(
            f"too few {name} for a stable covariance: N={n} < min_samples={min_samples} (pool3 has "
            f"D={NUM_FEATURES} features; the protocol uses 50,000); pass min_samples={n} for a biased quick check")


def compute_statistics(images: Any, inception: Inception | None = None, *, batch_size: int = 50,
                       quantize: bool = True, min_samples: int = NUM_FEATURES,
                       progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(μ [2048], Σ [2048, 2048]) of the pool3 features of images [N, H, W, C] in [−1, 1]."""
    images = check_images(images)
    _check_count(images.shape[0], min_samples, "images")
    inception = inception if inception is not None else load_inception()
    features = inception.features(images, batch_size=batch_size, quantize=quantize, progress=progress)
    return feature_statistics(features)


def compute_fid(sample_images: Any, reference: Any, inception: Inception | None = None, *,
                reference_name: str | None = None, batch_size: int = 50, quantize: bool = True,
                min_samples: int = NUM_FEATURES, is_splits: int | None = 10, progress: bool = True,
                frechet_fn: Callable[..., float] = frechet_distance) -> dict[str, Any]:
    """FID of ``sample_images`` [N, H, W, C] in [−1, 1] against ``reference``.

    Args:
      reference: reference images (same H, W, C as the samples) or a statistics ``.npz`` path
        (pytorch-fid's, or ours from :func:`save_statistics`).
      inception: from :func:`load_inception` (default: loaded from the default weights path).
      reference_name: what to call the reference in the protocol, e.g. ``"CIFAR-10 train"``.
      quantize: round both image sets to 8 bits first, as happens when samples are saved as PNG.
      min_samples: fewer samples (or reference images) raise ValueError; the default is the feature
        dimension, below which Σ is singular.
      is_splits: also return the samples' Inception Score over this many splits (free: the logits come
        from the same forward pass); None to skip.
      frechet_fn: the distance ``(μ_g, Σ_g, μ_r, Σ_r) → float`` (swappable, as every equation here).
    Returns:
      ``{"fid": float, "protocol": FIDProtocol, "mu": μ_g, "sigma": Σ_g}``, plus ``"is"`` and ``"is_std"``
      when ``is_splits``. (``protocol.to_dict()`` is the JSON-friendly form.)
    """
    samples = check_images(sample_images, "sample images")
    _check_count(samples.shape[0], min_samples, "sample images")
    if is_splits is not None and samples.shape[0] < is_splits:
        raise ValueError(f"{samples.shape[0]} samples cannot be cut into is_splits={is_splits} for the Inception "
                         "Score; pass fewer splits or is_splits=None")
    inception = inception if inception is not None else load_inception()
    num_reference = None
    if isinstance(reference, (str, Path)):
        mu_ref, sigma_ref = load_statistics(reference)
        reference_name = reference_name or str(reference)
    else:
        reference = check_images(reference, "reference images")
        if reference.shape[1:] != samples.shape[1:]:
            raise ValueError(
                f"sample images are {'x'.join(map(str, samples.shape[1:]))} (HxWxC) but reference images are "
                f"{'x'.join(map(str, reference.shape[1:]))}: compare like with like (same size and channels)")
        num_reference = reference.shape[0]
        _check_count(num_reference, min_samples, "reference images")
        mu_ref, sigma_ref = compute_statistics(reference, inception, batch_size=batch_size, quantize=quantize,
                                               min_samples=min_samples, progress=progress)
        reference_name = reference_name or "reference images"
    outputs = inception.outputs(samples, names=("pool3", "logits_unbiased"), batch_size=batch_size,
                                quantize=quantize, progress=progress)
    mu, sigma = feature_statistics(outputs["pool3"])
    features = f"pool3 ({NUM_FEATURES})" + (f"; IS: {IS_LOGITS}" if is_splits is not None else "")
    protocol = FIDProtocol(
        metric="FID", num_samples=samples.shape[0], sample_shape=tuple(samples.shape[1:]),
        weights=inception.weights, quantize=quantize, grayscale_to_rgb=samples.shape[-1] == 1,
        features=features, reference=reference_name, num_reference=num_reference, splits=is_splits)
    result = {"fid": frechet_fn(mu, sigma, mu_ref, sigma_ref), "protocol": protocol, "mu": mu, "sigma": sigma}
    if is_splits is not None:
        result["is"], result["is_std"] = inception_score(outputs["logits_unbiased"], splits=is_splits)
    return result


def compute_inception_score(images: Any, inception: Inception | None = None, *, splits: int = 10,
                            batch_size: int = 50, quantize: bool = True, progress: bool = True) -> dict[str, Any]:
    """IS of images [N, H, W, C] in [−1, 1]: ``{"is": mean, "is_std": std, "protocol": FIDProtocol}``.

    Uses the logits without the fc bias, as Salimans et al.'s code (``pool3 · W``) and torch-fidelity.
    """
    images = check_images(images)
    inception = inception if inception is not None else load_inception()
    logits = inception.logits(images, batch_size=batch_size, quantize=quantize, progress=progress)
    mean, std = inception_score(logits, splits=splits)
    protocol = FIDProtocol(
        metric="IS", num_samples=images.shape[0], sample_shape=tuple(images.shape[1:]), weights=inception.weights,
        quantize=quantize, grayscale_to_rgb=images.shape[-1] == 1,
        features=IS_LOGITS, splits=splits)
    return {"is": mean, "is_std": std, "protocol": protocol}


__all__ = ["FIDProtocol", "compute_fid", "compute_inception_score", "compute_statistics", "inception_score",
           "load_statistics", "save_statistics"]
