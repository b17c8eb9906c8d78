"""The Fréchet distance between two Gaussians: the formula behind FID (Heusel et al. 2017).

    d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2})

With (μ, Σ) the mean and covariance of Inception pool features of real and generated images this is
FID. :func:`frechet_distance` reproduces pytorch-fid's ``calculate_frechet_distance`` step by step
(float64 NumPy, ``scipy.linalg.sqrtm``, the ε·I offset when the product is singular, the check that the
imaginary part of the square root is numerical noise), so numbers are comparable with published ones.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """d² = ‖μ1 − μ2‖² + Tr(Σ1) + Tr(Σ2) − 2 Tr((Σ1 Σ2)^{1/2}), as pytorch-fid computes it.

    mu [D], sigma [D, D]. If sqrtm(Σ1 Σ2) is not finite (a singular product), ε·I is added to both
    covariances first (with a warning). A complex square root whose imaginary diagonal exceeds 1e-3
    raises ValueError; otherwise its real part is used.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different lengths: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"covariances have different dimensions: {sigma1.shape} vs {sigma2.shape}")
    if sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"covariance shape {sigma1.shape} does not match mean length {mu1.shape[0]}")

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))  # pytorch-fid: sqrtm(..., disp=False) (deprecated in SciPy 1.16+)
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
                      RuntimeWarning, stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(f"Imaginary component {m} in sqrtm(sigma1 @ sigma2): the covariances are not "
                             "valid (symmetric positive semi-definite) or too few samples were used")
        covmean = covmean.real
    tr_covmean = np.trace(covmean)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(μ [D], Σ [D, D]) of features [N, D], Σ = np.cov(rowvar=False) (unbiased, as pytorch-fid).

    Raises ValueError for N < 2; warns when N < D (Σ is then singular and FID biased).
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {features.shape}")
    n, d = features.shape
    message = (f"too few samples for a stable covariance: N={n}, feature dim D={d}; use at least D samples "
               "(the protocol uses 50,000)")
    if n < 2:
        raise ValueError(message)
    if n < d:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


__all__ = ["frechet_distance", "feature_statistics"]
