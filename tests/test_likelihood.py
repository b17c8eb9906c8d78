"""Tests for ddpm_jax/evaluation/likelihood.py: the variational bound of Eq. 5 in bits/dim.

Statistical checks state their tolerance in Monte-Carlo standard errors (SE), N_SE = 5. The model is
the analytically optimal ε-predictor for Gaussian data x_0 ~ N(0, s²): since
x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε has variance ᾱ_t s² + 1 − ᾱ_t and Cov(ε, x_t) = √(1 − ᾱ_t),
E[ε | x_t] = √(1 − ᾱ_t) x_t / (ᾱ_t s² + 1 − ᾱ_t).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from ddpm_jax import diffusion as D
from ddpm_jax.evaluation.likelihood import dataset_bpd, plot_vlb_terms, vlb_bpd
from ddpm_jax.schedules import get_schedule

N_SE = 5.0
S = 0.3  # data standard deviation


def optimal_eps_fn(schedule, s=S):
    def eps_fn(x_t, t):
        a = D.extract(schedule.alphas_cumprod, t, x_t.shape)
        return jnp.sqrt(1.0 - a) * x_t / (a * s**2 + 1.0 - a)
    return eps_fn


def gaussian_logpdf(x, mean, log_var):
    return -0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 * jnp.exp(-log_var))


def test_each_kl_term_matches_monte_carlo():
    """E_{x_t}[L_{t−1}] from vlb_bpd vs an independent MC estimate of E[log q(x_{t−1}|x_t,x_0) − log p_θ(x_{t−1}|x_t)].

    Cosine schedule, T = 20, N = 20,000 scalar examples x_0 ~ N(0, s²), clip_denoised=False. The MC
    estimate draws its own x_t and x_{t−1} ~ q(x_{t−1} | x_t, x_0) (Eqs. 6–7). Tolerance 5 SE of the
    difference (the two estimates are independent given x_0).
    """
    T, n = 20, 20_000
    s = get_schedule("cosine", T)
    eps_fn = optimal_eps_fn(s)
    x0 = S * jax.random.normal(jax.random.key(1), (n, 1))
    res = jax.jit(lambda x, k: vlb_bpd(eps_fn, s, x, k, clip_denoised=False))(x0, jax.random.key(2))
    terms = np.asarray(res.terms, np.float64)                                   # [T, N]

    @jax.jit
    def mc_log_ratio(t, key):
        k1, k2 = jax.random.split(key)
        tb = jnp.full((n,), t, jnp.int32)
        x_t = D.q_sample(s, x0, tb, jax.random.normal(k1, x0.shape))
        q_mean, q_var, _ = D.q_posterior_mean_variance(s, x0, x_t, tb)
        x_prev = q_mean + jnp.sqrt(q_var) * jax.random.normal(k2, x0.shape)
        p = D.p_mean_variance(s, eps_fn(x_t, tb), x_t, tb, clip_denoised=False)
        log_ratio = gaussian_logpdf(x_prev, q_mean, jnp.log(q_var)) - gaussian_logpdf(x_prev, p.mean, p.log_variance)
        return log_ratio[:, 0] / math.log(2.0)                                 # bits/dim, [N]

    for t in range(1, T):
        mc = np.asarray(mc_log_ratio(t, jax.random.fold_in(jax.random.key(3), t)), np.float64)
        se = math.sqrt(terms[t].var(ddof=1) / n + mc.var(ddof=1) / n)
        assert abs(terms[t].mean() - mc.mean()) < N_SE * se + 1e-6, (t, terms[t].mean(), mc.mean(), se)


def discretized_gaussian_data(s=S):
    """The 256 grid points of [−1, 1] and their probabilities under N(0, s²) binned with Eq. 13's edges."""
    grid = -1.0 + 2.0 * np.arange(256) / 255.0
    upper = np.where(np.arange(256) == 255, np.inf, grid + 1.0 / 255.0)
    lower = np.where(np.arange(256) == 0, -np.inf, grid - 1.0 / 255.0)
    probs = norm.cdf(upper / s) - norm.cdf(lower / s)
    return grid, probs


def test_bound_decreases_toward_true_nll_as_T_grows():
    """Data: a discretized Gaussian on the 256-bin grid (s = 0.3), exact NLL H = −Σ p_k log2 p_k bits/dim.

    The expectation over x_0 is exact (all 256 grid points, weighted by p_k, repeated R = 64 times);
    only x_t is random. Linear schedule (β scaled by 1000/T), T = 50, 100, 200, optimal Gaussian ε̂,
    clip_denoised=False. Checks: the bound is ≥ H − 5 SE (it is an upper bound on the model's NLL,
    which is ≥ H); it decreases with T by more than 5 SE at each doubling; and at T = 200 the gap is
    < 1.5 bits/dim (measured: 2.42, 1.65, 1.21 at T = 50, 100, 200). The gap that remains is mostly
    the decoder L_0: its fixed σ_1² = β̃_2 (σ_1 ≈ 0.016 at T = 200) is wider than a bin (2/255 ≈ 0.008),
    and it shrinks only as β_1 ∝ 1/T does, the reason the paper's bound is loose at the pixel level.
    SE from 8 independent replicates.
    """
    grid, probs = discretized_gaussian_data()
    H = float(-(probs * np.log2(probs)).sum())
    reps = 64
    x0 = jnp.asarray(np.tile(grid, reps)[:, None], jnp.float32)
    weights = np.tile(probs, reps) / reps
    bounds, ses = [], []
    for T in (50, 100, 200):
        s = get_schedule("linear", T)
        f = jax.jit(lambda x, k, s=s: vlb_bpd(optimal_eps_fn(s), s, x, k, clip_denoised=False).total)
        est = np.array([(np.asarray(f(x0, jax.random.key(r)), np.float64) * weights).sum() for r in range(8)])
        bounds.append(est.mean())
        ses.append(est.std(ddof=1) / math.sqrt(len(est)))
        assert bounds[-1] >= H - N_SE * ses[-1], (T, bounds[-1], H)
    for i in range(2):
        assert bounds[i] - bounds[i + 1] > N_SE * math.hypot(ses[i], ses[i + 1]), (bounds, ses)
    assert bounds[-1] - H < 1.5, (bounds, H)


def test_scan_equals_python_loop_of_terms():
    """vlb_bpd's lax.scan gives the same numbers as a Python loop of vlb_term_bpd with the documented keys."""
    T = 10
    s = get_schedule("cosine", T)
    x0 = jax.random.uniform(jax.random.key(0), (3, 4, 4, 1), minval=-1.0, maxval=1.0)
    key = jax.random.key(5)

    def eps_fn(x, t):
        return jnp.tanh(x) * (1.0 + t[:, None, None, None] / T)

    for clip in (True, False):
        res = vlb_bpd(eps_fn, s, x0, key, clip_denoised=clip)
        loop = []
        for t in range(T):
            tb = jnp.full((3,), t, jnp.int32)
            eps = jax.random.normal(jax.random.fold_in(key, t), x0.shape, x0.dtype)
            x_t = D.q_sample(s, x0, tb, eps)
            loop.append(D.vlb_term_bpd(s, eps_fn(x_t, tb), x0, x_t, tb, clip_denoised=clip))
        loop = np.stack(loop)                                                   # [T, B]
        assert res.terms.shape == (T, 3)
        np.testing.assert_allclose(res.terms, loop, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res.prior, D.prior_bpd(s, x0), rtol=1e-6)
        np.testing.assert_allclose(res.total, res.prior + loop.sum(0), rtol=1e-5)


def test_prior_term_is_near_zero_for_linear_T1000():
    """L_T = KL(N(√ᾱ_T x_0, 1 − ᾱ_T) ‖ N(0, 1)) = ½(ᾱ_T x_0² − ᾱ_T − log(1 − ᾱ_T)) ≈ 3e-5 bits at most (ᾱ_T ≈ 4e-5)."""
    s = get_schedule("linear", 1000)
    x0 = jnp.array([-1.0, -0.5, 0.0, 1.0]).reshape(4, 1, 1, 1)
    res = jax.jit(lambda x, k: vlb_bpd(lambda x, t: jnp.zeros_like(x), s, x, k))(x0, jax.random.key(0))
    a = float(np.prod(1.0 - np.linspace(1e-4, 0.02, 1000)))
    closed = 0.5 * (a * np.asarray(x0).ravel() ** 2 - a - np.log1p(-a)) / math.log(2.0)
    assert np.all(np.asarray(res.prior) < 5e-5)
    np.testing.assert_allclose(res.prior, closed, atol=2e-6)


def test_dataset_bpd_batches_pad_and_average(tmp_path):
    """dataset_bpd = mean of vlb_bpd over batches with fold_in(key, i); the padded tail batch is masked."""
    T = 6
    s = get_schedule("cosine", T)
    images = np.asarray(jax.random.uniform(jax.random.key(0), (5, 2, 2, 1), minval=-1, maxval=1))
    eps_fn = optimal_eps_fn(s)
    key = jax.random.key(3)
    out = dataset_bpd(eps_fn, s, images, key, batch_size=2)
    totals, terms = [], []
    for i, start in enumerate(range(0, 5, 2)):
        r = vlb_bpd(eps_fn, s, jnp.asarray(images[start:start + 2]), jax.random.fold_in(key, i))
        totals.append(np.asarray(r.total))
        terms.append(np.asarray(r.terms))
    assert out.num_examples == 5 and out.terms.shape == (T,)
    np.testing.assert_allclose(out.bpd, np.concatenate(totals).mean(), rtol=1e-5)
    np.testing.assert_allclose(out.terms, np.concatenate(terms, axis=1).mean(1), rtol=1e-5)
    np.testing.assert_allclose(out.bpd, out.prior + out.terms.sum(), rtol=1e-5)
    path = plot_vlb_terms(out.terms, str(tmp_path / "terms.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


_SHARDED_WORKER = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from ddpm_jax import parallel
from ddpm_jax.evaluation.likelihood import dataset_bpd
from ddpm_jax.schedules import get_schedule

s = get_schedule("linear", 50)
images = np.asarray(jax.random.uniform(jax.random.key(0), (13, 4, 4, 1), minval=-1, maxval=1))
params = {"w": jnp.float32(0.7)}
eps_fn = lambda p, x, t: p["w"] * x
key = jax.random.key(5)
eight = dataset_bpd(eps_fn, s, images, key, batch_size=8, params=params)  # default mesh: all 8 devices
one = dataset_bpd(eps_fn, s, images, key, batch_size=8, params=params, mesh=parallel.make_mesh(jax.devices()[:1]))
closure = dataset_bpd(lambda x, t: 0.7 * x, s, images, key, batch_size=8)
try:
    dataset_bpd(eps_fn, s, images, key, batch_size=6, params=params)
    error = None
except ValueError as err:
    error = str(err)
json.dump({"devices": jax.device_count(), "bpd8": eight.bpd, "bpd1": one.bpd, "bpd_closure": closure.bpd,
           "terms_diff": float(np.max(np.abs(eight.terms - one.terms))),
           "totals_diff": float(np.max(np.abs(eight.totals - one.totals))), "n": eight.num_examples,
           "error": error}, open(sys.argv[1], "w"))
"""


def test_dataset_bpd_sharded_over_8_devices_equals_one_device(tmp_path):
    """The batch is split over 8 simulated CPU devices (own process: the device count is fixed at start-up)."""
    import json
    import subprocess
    import sys

    from _training_fixtures import subprocess_env

    out = tmp_path / "result.json"
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SHARDED_WORKER, str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["devices"] == 8 and r["n"] == 13
    assert r["bpd8"] > 0.1  # a real bound, not zeros
    assert abs(r["bpd8"] - r["bpd1"]) <= 1e-5 * r["bpd1"]
    assert r["terms_diff"] <= 1e-5 and r["totals_diff"] <= 1e-4
    assert abs(r["bpd_closure"] - r["bpd8"]) <= 1e-5 * r["bpd8"]  # params as argument == closed over
    assert "batch_size=6 is not divisible by the number of devices (8)" in r["error"]


def test_dataset_bpd_reports_per_example_totals_and_standard_error():
    s = get_schedule("cosine", 6)
    images = np.asarray(jax.random.uniform(jax.random.key(1), (5, 2, 2, 1), minval=-1, maxval=1))
    out = dataset_bpd(optimal_eps_fn(s), s, images, jax.random.key(0), batch_size=4)
    assert out.totals.shape == (5,)
    np.testing.assert_allclose(out.totals.mean(), out.bpd, rtol=1e-12)
    np.testing.assert_allclose(out.std_error, out.totals.std(ddof=1) / np.sqrt(5), rtol=1e-12)
    with pytest.raises(ValueError, match="need at least one image"):
        dataset_bpd(optimal_eps_fn(s), s, images[:0], jax.random.key(0), batch_size=4)
