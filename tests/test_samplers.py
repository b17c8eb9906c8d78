"""Tests for ddpm_jax/samplers.py: correctness on Gaussian data, compilation behaviour, swapping, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion as D
from ddpm_jax import schedulers
from ddpm_jax.samplers import SAMPLERS, ddim_sample, ddpm_sample, make_scheduler, sample
from ddpm_jax.schedulers import spaced_timesteps
from ddpm_jax.schedules import BETA_FUNCTIONS, extract, get_schedule, respace

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


# ------------------------------------------------------------------------------------------------
# samplers.sample: the nine solvers by name; the runner's trajectory, callback and noise-key rule
# ------------------------------------------------------------------------------------------------

def interpolated_optimal_eps_fn(schedule, sigma=SIGMA):
    """ε* of optimal_eps_fn at fractional t too (the Euler samplers call the model at float timesteps):
    σ(t)² = (1 − ᾱ_t)/ᾱ_t interpolated linearly, ε* = σ√(1 + σ²) x/(s² + σ²)."""
    ab = np.asarray(schedule.alphas_cumprod, np.float64)
    table = jnp.asarray(np.sqrt((1 - ab) / ab), jnp.float32)
    grid = jnp.arange(table.shape[0], dtype=jnp.float32)

    def eps_fn(x_t, t):
        sig = jnp.interp(t.astype(jnp.float32), grid, table).reshape((-1,) + (1,) * (x_t.ndim - 1))
        return sig * jnp.sqrt(1 + sig**2) * x_t / (sigma**2 + sig**2)
    return eps_fn


@pytest.mark.parametrize("name", SAMPLERS + ("dpmsolver++_karras",))
def test_every_sampler_by_name_samples_the_data_variance(name):
    """Each of the nine through samplers.sample on the optimal ε-model for N(0, s²) data (cosine, T = 1000, 100
    steps, 20k samples): mean 0 within 5 SE and Var(x_0) within 10% of s² (first-order solvers are a few % off
    at 100 steps, the Monte-Carlo SE of the variance is 1%)."""
    s, n = get_schedule("cosine", 1000), 20_000
    run = jax.jit(lambda key: sample(interpolated_optimal_eps_fn(s), s, (n, 1), key, sampler=name, num_steps=100,
                                     clip_denoised=False))
    x0 = np.asarray(run(jax.random.key(0)), np.float64)
    assert np.all(np.isfinite(x0))
    assert abs(x0.mean()) < 5 * SIGMA / math.sqrt(n)
    assert abs(x0.var() / SIGMA**2 - 1) < 0.10, x0.var()


def test_ddpm_and_ddim_sample_are_sample_by_name():
    s = get_schedule("linear", 100)
    eps_fn, key, shape = optimal_eps_fn(s), jax.random.key(4), (3, 4, 4, 1)
    np.testing.assert_array_equal(ddpm_sample(eps_fn, s, shape, key), sample(eps_fn, s, shape, key, sampler="ddpm"))
    np.testing.assert_array_equal(ddim_sample(eps_fn, s, shape, key, num_steps=10, eta=0.5),
                                  sample(eps_fn, s, shape, key, sampler="ddim", num_steps=10, eta=0.5))
    with pytest.raises(ValueError, match=r"sampler must be one of ddpm, ddim, pndm, euler, euler_ancestral, "
                                         r"dpmsolver\+\+, sde-dpmsolver\+\+, heun, unipc, euler_karras, .*, got 'lms'"):
        sample(eps_fn, s, shape, key, sampler="lms")


def test_sample_ddpm_passes_a_swapped_posterior_variance_through():
    """samplers.sample(sampler="ddpm", p_mean_variance_fn=…) reaches DDPMScheduler's p_sample (all T steps and a
    respaced 10-step grid); the default restores the samples."""
    s = get_schedule("linear", 50)
    eps_fn, key = optimal_eps_fn(s), jax.random.key(1)

    def posterior_times_4(schedule, x0, x_t, t):
        mean, var, log_var = D.q_posterior_mean_variance(schedule, x0, x_t, t)
        return mean, 4 * var, log_var + math.log(4.0)

    wrong_pmv = lambda *a, **k: D.p_mean_variance(*a, **k, q_posterior_fn=posterior_times_4)  # noqa: E731
    for num_steps in (None, 10):
        default = sample(eps_fn, s, (8, 3), key, sampler="ddpm", num_steps=num_steps)
        wrong = sample(eps_fn, s, (8, 3), key, sampler="ddpm", num_steps=num_steps, p_mean_variance_fn=wrong_pmv)
        assert np.abs(np.asarray(wrong) - np.asarray(default)).max() > 1e-2
        np.testing.assert_array_equal(sample(eps_fn, s, (8, 3), key, sampler="ddpm", num_steps=num_steps), default)


def test_respaced_ddpm_is_algorithm_2_on_the_respaced_schedule():
    """DDPM with N < T steps = Algorithm 2 (ddpm_sample) on schedules.respace(ᾱ, τ), the model called at τ."""
    s = get_schedule("linear", 100)
    eps_fn, key, shape = optimal_eps_fn(s), jax.random.key(2), (4, 3)
    tau = spaced_timesteps(100, 10, "leading")                                   # [90, 80, …, 0]
    respaced = respace(s.alphas_cumprod, tau)
    np.testing.assert_allclose(respaced.alphas_cumprod, np.asarray(s.alphas_cumprod)[tau[::-1].astype(int)], rtol=1e-6)
    tau_of = jnp.asarray(tau[::-1], jnp.int32)                                   # respaced index k -> τ_k
    on_respaced = ddpm_sample(lambda x, k: eps_fn(x, tau_of[k]), respaced, shape, key)
    np.testing.assert_allclose(sample(eps_fn, s, shape, key, sampler="ddpm", num_steps=10), on_respaced, atol=1e-6)


def test_runner_trajectory_callback_and_noise_key_rule():
    """schedulers.run: Trajectory(x [S+1], model_input [S], t [S]), on_step(i) once per step on the host, and
    step i's noise = fold_in(split(key)[1], i) (checked by replaying DDPM's steps by hand)."""
    s = get_schedule("cosine", 20)
    eps_fn, key, shape = optimal_eps_fn(s), jax.random.key(9), (2, 3)
    x0, traj = sample(eps_fn, s, shape, key, sampler="ddpm", num_steps=5, return_trajectory=True)
    assert traj.x.shape == (6, 2, 3) and traj.model_input.shape == (5, 2, 3) and traj.t.shape == (5,)
    np.testing.assert_array_equal(traj.t, spaced_timesteps(20, 5, "leading"))
    np.testing.assert_array_equal(traj.x[-1], x0)
    np.testing.assert_array_equal(traj.model_input, traj.x[:-1])                  # DDPM: the model sees x itself
    key_x_T, key_steps = jax.random.split(key)
    np.testing.assert_array_equal(traj.x[0], jax.random.normal(key_x_T, shape))
    scheduler = make_scheduler(s, "ddpm")
    state = scheduler.init_state(5, traj.x[0])
    x = traj.x[0]
    for i in range(5):
        t = jnp.full((2,), state.timesteps[i], jnp.int32)
        x, state = scheduler.step(state, eps_fn(x, t), i, x, jax.random.fold_in(key_steps, i))
        np.testing.assert_allclose(x, traj.x[i + 1], atol=1e-6)

    seen, x_mid = [], jnp.ones(shape)
    x_end, traj = schedulers.run(make_scheduler(s, "euler"), interpolated_optimal_eps_fn(s), x_mid, key_steps, 4,
                                 start=1, x_is_noise=False, on_step=seen.append, return_trajectory=True)
    jax.block_until_ready(x_end)
    assert [int(i) for i in seen] == [1, 2, 3]                                   # steps start … N−1
    assert traj.x.shape == (4, 2, 3) and traj.t.shape == (3,)
    np.testing.assert_array_equal(traj.x[0], x_mid)                               # x is the sample at grid point 1
    sigmas = make_scheduler(s, "euler").init_state(4, x_mid).sigmas
    np.testing.assert_allclose(traj.model_input[0], x_mid / np.sqrt(sigmas[1] ** 2 + 1), rtol=1e-6)
