"""Tests for the importance-weighted bound (Burda et al. 2016, Eq. 8) in ddpm_jax/evaluation/likelihood.py.

Analytic case: a linear-Gaussian model p(z) = N(0, I_L), p(x|z) = N(Wz + b, s² I_D), whose marginal
p(x) = N(b, WWᵀ + s² I) is exact, with a proposal q(z|x) = N(m, diag v) that is NOT the posterior (shifted
mean, inflated variance, so the weights have finite variance). Then L_1 is the ELBO (closed form), L_k rises
with k and approaches log p(x). Statistical checks state their tolerance in standard errors (N_SE = 5) of
the Monte-Carlo estimate.
"""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal, norm

from ddpm_jax.evaluation.likelihood import dataset_iwae_bpd, importance_weighted_bound, vae_log_weights
from ddpm_jax.models.vae import GaussianVAE, GaussianVAEConfig

pytestmark = pytest.mark.fast_compile

N_SE = 5.0
D, L, S = 4, 2, 0.5  # data and latent dimensions, decoder standard deviation


def linear_gaussian(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(D, L))
    b = rng.normal(size=D)
    x = rng.multivariate_normal(b, w @ w.T + S**2 * np.eye(D), size=3)        # [B, D], three data points
    # The exact posterior p(z|x) = N(P wᵀ(x − b)/s², P), P = (I + wᵀw/s²)⁻¹; q is shifted and wider.
    post_cov = np.linalg.inv(np.eye(L) + w.T @ w / S**2)
    post_mean = (x - b) @ w @ post_cov / S**2                                  # [B, L]
    m = post_mean + 0.3 * np.sqrt(np.diag(post_cov))
    v = 1.5 * np.diag(post_cov) * np.ones((x.shape[0], L))                     # [B, L]
    log_px = np.array([multivariate_normal(b, w @ w.T + S**2 * np.eye(D)).logpdf(xi) for xi in x])
    # Closed-form ELBO: E_q log N(x; wz + b, s²I) − KL(N(m, diag v) ‖ N(0, I)).
    resid = x - m @ w.T - b
    expected_rec = (-0.5 * D * math.log(2 * math.pi * S**2)
                    - (np.sum(resid**2, 1) + np.einsum("dl,bl,dl->b", w, v, w)) / (2 * S**2))
    kl = 0.5 * np.sum(v + m**2 - 1.0 - np.log(v), 1)
    return dict(w=w, b=b, x=x, m=m, v=v, log_px=log_px, elbo=expected_rec - kl)


def log_weights(model, num, seed=1):
    """[num, B] log p(x, z_i) − log q(z_i|x), z_i ~ q, float64."""
    rng = np.random.default_rng(seed)
    m, v, x, w, b = model["m"], model["v"], model["x"], model["w"], model["b"]
    z = m + np.sqrt(v) * rng.standard_normal((num, *m.shape))                 # [K, B, L]
    log_pz = norm.logpdf(z).sum(-1)
    log_q = norm.logpdf(z, m, np.sqrt(v)).sum(-1)
    log_pxz = norm.logpdf(x, z @ w.T + b, S).sum(-1)
    return log_pz + log_pxz - log_q


def test_k1_is_the_elbo_and_k_equals_K_is_one_logsumexp():
    lw = log_weights(linear_gaussian(), 1000)
    l1 = np.asarray(importance_weighted_bound(lw.astype(np.float32), 1))
    np.testing.assert_allclose(l1, lw.mean(0), rtol=1e-5)                     # L_1 = mean of log w (the ELBO)
    lk = np.asarray(importance_weighted_bound(lw.astype(np.float32), 1000))
    np.testing.assert_allclose(lk, np.log(np.mean(np.exp(lw), 0)), rtol=1e-5)
    l10 = np.asarray(importance_weighted_bound(lw.astype(np.float32), 10))     # mean over the 100 groups of 10
    groups = lw.reshape(100, 10, -1)
    np.testing.assert_allclose(l10, np.mean(np.log(np.mean(np.exp(groups), 1)), 0), rtol=1e-5)


def test_k1_matches_the_closed_form_elbo():
    model = linear_gaussian()
    lw = log_weights(model, 20000)
    est = np.asarray(importance_weighted_bound(lw, 1))
    se = lw.std(0, ddof=1) / np.sqrt(lw.shape[0])
    assert np.all(np.abs(est - model["elbo"]) < N_SE * se), (est, model["elbo"], se)
    assert np.all(model["elbo"] < model["log_px"] - 0.05)                    # q ≠ posterior: a real gap to close


def test_bound_rises_with_k_and_approaches_log_px():
    """L_1 < L_10 < L_100 < L_1000 ≤ log p(x) (Burda Theorem 1), and L_k at k = 40,000 is within 0.01 nats of log p(x).

    Each L_k is the mean of 40,000/k independent group estimates; its standard error (the spread of the group
    estimates / √groups, or for k = K one repeat of the whole estimate over 8 seeds) bounds the noise.
    """
    model = linear_gaussian()
    num = 40000
    lw = log_weights(model, num)
    means, ses = {}, {}
    for k in (1, 10, 100, 1000):
        groups = np.log(np.mean(np.exp(lw.reshape(num // k, k, -1)), 1))      # [groups, B]
        means[k] = np.asarray(importance_weighted_bound(lw, k))
        np.testing.assert_allclose(means[k], groups.mean(0), rtol=1e-5)   # float32
        ses[k] = groups.std(0, ddof=1) / np.sqrt(groups.shape[0])
    for small, big in ((1, 10), (10, 100), (100, 1000)):
        assert np.all(means[big] - means[small] > -N_SE * np.hypot(ses[big], ses[small])), (small, big, means)
    gap1, gap1000 = model["log_px"] - means[1], model["log_px"] - means[1000]
    assert np.all(gap1000 < 0.2 * gap1), (gap1, gap1000)                     # most of the ELBO's gap is closed
    assert np.all(means[1000] < model["log_px"] + N_SE * ses[1000])
    full = np.array([np.asarray(importance_weighted_bound(log_weights(model, num, seed=s), num)) for s in range(8)])
    assert np.all(np.abs(full.mean(0) - model["log_px"]) < 0.01), (full.mean(0), model["log_px"])


def tiny_vae(likelihood="gaussian", sigma=0.2):
    cfg = GaussianVAEConfig(image_shape=(2, 2, 1), hidden_dims=(8,), latent_dim=3, likelihood=likelihood, sigma=sigma)
    module = GaussianVAE(cfg)
    params = module.init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)), jax.random.key(1))["params"]
    return module, params


def test_vae_log_weights_with_a_decoder_that_ignores_z():
    """A decoder whose output does not depend on z (last kernel 0, bias = the pixel levels): then p(x) = P(x|z)
    exactly, log w_i − log P(x|z) = log p(z_i) − log q(z_i|x) has mean −KL(q ‖ p) (closed form), and L_k → log P(x|z)
    (E_q[p(z)/q(z|x)] = 1). P(x|z) is the discretised Gaussian (Ho Eq. 13): an interior level with mean at its
    centre has probability Φ(1/(255σ)) − Φ(−1/(255σ)); the black level (−1) with mean −1 has Φ(1/(255σ))."""
    sigma = 0.2
    module, params = tiny_vae(sigma=sigma)
    x = np.array([[-1.0, 0.0, 128 / 127.5 - 1.0, 0.5]], np.float32)             # levels 0, ~127.5, 128, ~191
    x = np.round((x + 1) * 127.5) / 127.5 - 1.0                                 # on the 8-bit grid
    params = flax.core.unfreeze(params)
    params["to_output"]["kernel"] = jnp.zeros_like(params["to_output"]["kernel"])
    params["to_output"]["bias"] = jnp.asarray(x.reshape(-1))
    lw = np.asarray(vae_log_weights(module, params, jnp.asarray(x.reshape(1, 2, 2, 1)), jax.random.key(2), 20000),
                    np.float64)[:, 0]                                           # [K]
    half = 1.0 / (255.0 * sigma)
    log_pxz = 3 * math.log(norm.cdf(half) - norm.cdf(-half)) + math.log(norm.cdf(half))
    mu, logvar = module.apply({"params": params}, jnp.asarray(x.reshape(1, 2, 2, 1)), method=GaussianVAE.encode)
    kl = float(0.5 * jnp.sum(jnp.exp(logvar) + mu**2 - 1.0 - logvar))
    se = lw.std(ddof=1) / math.sqrt(len(lw))
    assert abs(lw.mean() - (log_pxz - kl)) < N_SE * se, (lw.mean(), log_pxz - kl, se)
    assert abs(float(importance_weighted_bound(lw[:, None], len(lw))[0]) - log_pxz) < 0.02 * max(kl, 1.0)


def test_dataset_iwae_bpd_is_bits_per_dim_and_rises_with_k():
    # σ = 1: an untrained decoder's means stay within a few σ of the levels, away from Eq. 13's far tails, where
    # the float32 difference of two CDFs cancels and jitted and eager programs differ in the 3rd digit
    module, params = tiny_vae(sigma=1.0)
    images = np.round(np.random.default_rng(0).uniform(0, 255, (5, 2, 2, 1))) / 127.5 - 1.0
    res = dataset_iwae_bpd(module, params, images, jax.random.key(0), ks=(1, 4, 16), batch_size=2)
    assert res.num_examples == 5 and res.num_samples == 16 and set(res.bpd) == {1, 4, 16}
    lw = np.concatenate([np.asarray(vae_log_weights(module, params, jnp.asarray(images[i:i + 2].astype(np.float32)),
                                                    jax.random.fold_in(jax.random.key(0), j), 16))
                         for j, i in enumerate(range(0, 5, 2))], axis=1)[:, :5]                    # [16, 5]
    np.testing.assert_allclose(res.totals[1], -lw.mean(0) / (4 * math.log(2)), rtol=1e-5)
    assert res.bpd[16] <= res.bpd[4] + 1e-6 <= res.bpd[1] + 2e-6                # the mean over groups: Jensen per draw
    assert np.isfinite(res.std_error(1))


def test_bad_input():
    lw = np.zeros((10, 3), np.float32)
    with pytest.raises(ValueError, match="divide"):
        importance_weighted_bound(lw, 3)
    with pytest.raises(ValueError, match="between 1 and K"):
        importance_weighted_bound(lw, 0)
    with pytest.raises(ValueError, match=r"\[K, B\]"):
        importance_weighted_bound(lw[:, 0], 1)
    module, params = tiny_vae(likelihood="bernoulli")
    with pytest.raises(ValueError, match="likelihood=gaussian"):
        vae_log_weights(module, params, jnp.zeros((1, 2, 2, 1)), jax.random.key(0), 4)
    module, params = tiny_vae()
    with pytest.raises(ValueError, match="divide the largest"):
        dataset_iwae_bpd(module, params, np.zeros((2, 2, 2, 1)), jax.random.key(0), ks=(1, 3, 10))
