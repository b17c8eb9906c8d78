"""Tests for ddpm_jax/evaluation/frechet.py against closed forms and an independent eigen-based computation."""

import warnings

import numpy as np
import pytest

from ddpm_jax.evaluation.frechet import feature_statistics, frechet_distance


def random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def sqrtm_psd(a):
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.maximum(w, 0))) @ v.T


def test_equal_statistics_give_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(8), random_spd(rng, 8)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_one_dimensional_closed_form():
    """For 1-D Gaussians d² = (μ1 − μ2)² + (σ1 − σ2)²."""
    mu1, s1, mu2, s2 = 0.3, 1.7, -1.1, 0.4
    got = frechet_distance(np.array([mu1]), np.array([[s1**2]]), np.array([mu2]), np.array([[s2**2]]))
    np.testing.assert_allclose(got, (mu1 - mu2) ** 2 + (s1 - s2) ** 2, rtol=1e-12)


@pytest.mark.parametrize("d", [3, 16, 64])
def test_matches_eigendecomposition(d):
    """Tr((Σ1Σ2)^{1/2}) = Tr((Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}) (similar matrices), computed with eigh only."""
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    r1 = sqrtm_psd(s1)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrtm_psd(r1 @ s2 @ r1))
    np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), ref, rtol=1e-6)


def test_feature_statistics_and_distance_from_samples():
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((500, 4)) * 2.0 + 1.0
    mu, sigma = feature_statistics(feats)
    np.testing.assert_allclose(mu, feats.mean(0))
    np.testing.assert_allclose(sigma, np.cov(feats.T))
    assert frechet_distance(mu, sigma, np.ones(4), 4 * np.eye(4)) < 0.2


def test_mismatched_dimensions_raise():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="different"):
        frechet_distance(np.zeros(3), random_spd(rng, 3), np.zeros(4), random_spd(rng, 4))
    with pytest.raises(ValueError, match="different"):
        frechet_distance(np.zeros(3), random_spd(rng, 3), np.zeros(3), random_spd(rng, 4))


def test_too_few_samples():
    with pytest.raises(ValueError, match="too few samples.*N=1, feature dim D=5"):
        feature_statistics(np.zeros((1, 5)))
    with pytest.warns(RuntimeWarning, match="too few samples.*N=3, feature dim D=5.*50,000"):
        feature_statistics(np.random.default_rng(0).standard_normal((3, 5)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feature_statistics(np.random.default_rng(0).standard_normal((10, 5)))


def test_singular_product_uses_offset():
    """Rank-deficient covariances: finite result (pytorch-fid's ε·I fallback or a finite sqrtm)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 6))
    s = np.cov(x, rowvar=False)  # rank 2 in 6 dims
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = frechet_distance(np.zeros(6), s, np.zeros(6), s)
    assert np.isfinite(d) and abs(d) < 1e-2
