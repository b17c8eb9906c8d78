"""Tests for ddpm_jax/samplers.py: correctness on Gaussian data, compilation behaviour, swapping, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion as D
from ddpm_jax.samplers import ddim_sample, ddpm_sample
from ddpm_jax.schedulers import spaced_timesteps
from ddpm_jax.schedules import BETA_FUNCTIONS, extract, get_schedule

SIGMA = 0.5  # data x0 ~ N(0, SIGMA² I)


def optimal_eps_fn(schedule, sigma=SIGMA):
    """ε*(x_t, t) = E[ε | x_t] = √(1 − ᾱ_t) x_t/(ᾱ_t s² + 1 − ᾱ_t) for x0 ~ N(0, s² I)."""
    def eps_fn(x_t, t):
        ab = extract(schedule.alphas_cumprod, t, x_t.shape)
        return jnp.sqrt(1 - ab) * x_t / (ab * sigma**2 + 1 - ab)
    return eps_fn


def exact_chain_variance(T, num_steps, eta, sigma=SIGMA, name="cosine"):
    """Var(x_0) of the discretized sampler with ε*, by the float64 recursion Var ← A² Var + σ² (every step
    is linear in x_t plus independent noise). eta=None means DDPM (Algorithm 2, σ_t² = β̃_t)."""
    betas = BETA_FUNCTIONS[name](T)
    ab = np.cumprod(1 - betas)
    k = T // num_steps
    var = 1.0  # x_T ~ N(0, 1)
    for t in np.arange(num_steps)[::-1] * k:
        ab_prev = ab[t - k] if t - k >= 0 else 1.0
        eps_gain = np.sqrt(1 - ab[t]) / (ab[t] * sigma**2 + 1 - ab[t])  # ε* = eps_gain x_t
        x0_gain = (1 - np.sqrt(1 - ab[t]) * eps_gain) / np.sqrt(ab[t])  # x̂0 = x0_gain x_t
        if eta is None:  # Eq. 7 mean with x̂0, variance β̃_t (zero at the last step)
            beta = 1 - ab[t] / ab_prev
            gain = (np.sqrt(ab_prev) * beta * x0_gain + np.sqrt(1 - beta) * (1 - ab_prev)) / (1 - ab[t])
            noise_var = beta * (1 - ab_prev) / (1 - ab[t]) if t > 0 else 0.0
        else:  # DDIM Eq. 12
            noise_var = eta**2 * (1 - ab_prev) / (1 - ab[t]) * (1 - ab[t] / ab_prev)
            gain = np.sqrt(ab_prev) * x0_gain + np.sqrt(1 - ab_prev - noise_var) * eps_gain
        var = gain**2 * var + noise_var
    return var


@pytest.mark.parametrize("sampler,eta", [("ddpm", None), ("ddim", 0.0), ("ddim", 1.0)])
def test_optimal_predictor_samples_the_data_distribution(sampler, eta):
    """With ε* the sampled x_0 has variance s² = 0.25, up to the sampler's discretization error.

    Two checks: (1) the Monte-Carlo variance of N = 100k samples equals the exact variance of the
    discretized chain (float64 recursion above) within 5 SE, SE = Var √(2/(N−1)), and the mean is 0
    within 5 SE; (2) that exact variance is within 1% of s² with T = 1000 cosine steps (DDIM with all
    1000 steps; at 50 steps DDIM's ODE discretization error is ~6%, at 200 steps ~1.5%).
    """
    T, n = 1000, 100_000
    s = get_schedule("cosine", T)
    eps_fn = optimal_eps_fn(s)
    if sampler == "ddpm":
        run = jax.jit(lambda key: ddpm_sample(eps_fn, s, (n, 1), key, clip_denoised=False))
    else:
        run = jax.jit(lambda key: ddim_sample(eps_fn, s, (n, 1), key, num_steps=T, eta=eta, clip_denoised=False))
    x0 = np.asarray(run(jax.random.key(0)), np.float64)
    exact = exact_chain_variance(T, T, eta)
    assert abs(exact - SIGMA**2) < 0.01 * SIGMA**2
    assert abs(x0.var(ddof=1) - exact) < 5 * exact * math.sqrt(2 / (n - 1))
    assert abs(x0.mean()) < 5 * math.sqrt(exact / n)


def test_ddim_eta0_few_steps_matches_exact_chain():
    """DDIM with the default 50 steps: sample variance equals the exact discretized chain (5 SE)."""
    T, n, steps = 1000, 50_000, 50
    s = get_schedule("cosine", T)
    x0 = np.asarray(ddim_sample(optimal_eps_fn(s), s, (n, 1), jax.random.key(3), num_steps=steps,
                                clip_denoised=False), np.float64)
    exact = exact_chain_variance(T, steps, 0.0)
    assert abs(x0.var(ddof=1) - exact) < 5 * exact * math.sqrt(2 / (n - 1))


def test_ddim_eta1_all_steps_is_ddpm():
    """Eq. 16 with η = 1 and every timestep gives σ_t² = β̃_t: the same chain as Algorithm 2 (same keys).

    Without clipping: with clip_denoised, DDPM recomputes the mean from the clipped x̂0 while DDIM (like
    diffusers) keeps the model's ε̂ in the "direction" term, so the two differ where x̂0 is clipped."""
    s = get_schedule("linear", 100)
    eps_fn = optimal_eps_fn(s)
    key = jax.random.key(7)
    a = ddpm_sample(eps_fn, s, (16, 2, 2, 1), key, clip_denoised=False)
    b = ddim_sample(eps_fn, s, (16, 2, 2, 1), key, num_steps=100, eta=1.0, clip_denoised=False)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_trajectory_and_determinism():
    s = get_schedule("linear", 50)
    eps_fn = optimal_eps_fn(s)
    key = jax.random.key(0)
    x0, traj = ddpm_sample(eps_fn, s, (3, 4, 4, 2), key, return_trajectory=True)
    assert traj.shape == (51, 3, 4, 4, 2)  # [T+1, B, H, W, C]: x_T first, x_0 last
    np.testing.assert_array_equal(traj[-1], x0)
    np.testing.assert_array_equal(ddpm_sample(eps_fn, s, (3, 4, 4, 2), key), x0)
    x0, traj = ddim_sample(eps_fn, s, (3, 4, 4, 2), key, num_steps=10, return_trajectory=True)
    assert traj.shape == (11, 3, 4, 4, 2)  # [S+1, B, H, W, C]
    np.testing.assert_array_equal(traj[-1], x0)
    x_T = jnp.ones((3, 4, 4, 2))
    _, traj = ddim_sample(eps_fn, s, (3, 4, 4, 2), key, num_steps=10, x_T=x_T, return_trajectory=True)
    np.testing.assert_array_equal(traj[0], x_T)


def test_step_is_traced_once_not_per_step_and_eta_does_not_retrace():
    s = get_schedule("linear", 100)
    calls = {"n": 0}
    eps_star = optimal_eps_fn(s)

    def eps_fn(x_t, t):
        calls["n"] += 1  # runs only while JAX traces
        return eps_star(x_t, t)

    ddim = jax.jit(lambda key, eta, num_steps: ddim_sample(eps_fn, s, (2, 4, 4, 1), key, num_steps=num_steps, eta=eta),
                   static_argnums=2)
    key = jax.random.key(0)
    a = ddim(key, 0.0, 20)
    assert calls["n"] == 1                  # 20 steps, one trace
    b = ddim(key, 0.7, 20)
    assert calls["n"] == 1                  # a new eta: no retrace
    assert not np.allclose(a, b)            # … and it is used
    ddim(key, 0.3, 10)
    assert calls["n"] == 2                  # a new num_steps: one more trace
    ddim(key, 0.3, 10)
    assert calls["n"] == 2

    calls["n"] = 0
    jax.jit(lambda key: ddpm_sample(eps_fn, s, (2, 4, 4, 1), key))(key)
    assert calls["n"] == 1                  # T = 100 steps, one trace


def test_usable_inside_jit_with_params_as_arguments():
    s = get_schedule("linear", 50)
    model_apply = lambda params, x_t, t: params["w"] * x_t  # a stand-in for unet.apply
    sample = jax.jit(lambda params, key: ddim_sample(lambda x, t: model_apply(params, x, t), s, (2, 3), key, num_steps=5))
    a = sample({"w": jnp.float32(0.1)}, jax.random.key(0))
    b = sample({"w": jnp.float32(0.2)}, jax.random.key(0))
    assert a.shape == (2, 3) and not np.allclose(a, b)


def test_swapping_the_posterior_variance_changes_samples_and_default_restores_them():
    """A student's wrong Eq. 7 (variance × 4), passed in one line, changes the samples."""
    s = get_schedule("linear", 50)
    eps_fn = optimal_eps_fn(s)
    key = jax.random.key(1)

    def posterior_times_4(schedule, x0, x_t, t):
        mean, var, log_var = D.q_posterior_mean_variance(schedule, x0, x_t, t)
        return mean, 4 * var, log_var + math.log(4.0)

    default = ddpm_sample(eps_fn, s, (8, 3), key)
    wrong = ddpm_sample(eps_fn, s, (8, 3), key,
                        p_mean_variance_fn=lambda *a, **k: D.p_mean_variance(*a, **k, q_posterior_fn=posterior_times_4))
    assert np.abs(np.asarray(wrong) - np.asarray(default)).max() > 1e-2
    np.testing.assert_array_equal(ddpm_sample(eps_fn, s, (8, 3), key), default)


def test_ddim_timesteps_leading_spacing():
    np.testing.assert_array_equal(spaced_timesteps(1000, 4, "leading"), [750, 500, 250, 0])
    np.testing.assert_array_equal(spaced_timesteps(10, 3, "leading"), [6, 3, 0])
    assert spaced_timesteps(1000, 1000, "leading").tolist() == list(range(999, -1, -1))


def test_bad_input_raises_one_clear_error():
    s = get_schedule("linear", 100)
    eps_fn = optimal_eps_fn(s)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\] \(0 = DDIM, 1 = DDPM-like\), got 1.5"):
        ddim_sample(eps_fn, s, (2, 3), key, eta=1.5)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        ddim_sample(eps_fn, s, (2, 3), key, eta=-0.1)
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 100\] \(num_train_timesteps\), got 101"):
        ddim_sample(eps_fn, s, (2, 3), key, num_steps=101)
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 100\]"):
        ddim_sample(eps_fn, s, (2, 3), key, num_steps=0)
    with pytest.raises(ValueError, match=r"x_T has shape \(2, 2\), expected \(2, 3\)"):
        ddpm_sample(eps_fn, s, (2, 3), key, x_T=jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="unknown variance 'fixed'"):
        ddpm_sample(eps_fn, s, (2, 3), key, variance="fixed")
