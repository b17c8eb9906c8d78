"""Tests for ddpm_jax/schedules.py: schedule values, index convention, extract, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.schedules import SCHEDULE_NAMES, Schedule, check_timesteps, extract, get_schedule


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_schedule_fields_are_float32_and_consistent(name):
    s = get_schedule(name, 200)
    assert isinstance(s, Schedule) and s.num_timesteps == 200
    for field, value in vars(s).items():
        assert value.shape == (200,) and value.dtype == jnp.float32, field
        assert np.all(np.isfinite(np.asarray(value))), field
    betas = np.asarray(s.betas, np.float64)
    assert np.all((betas > 0) & (betas < 1))
    assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0)  # ᾱ_t decreases
    np.testing.assert_allclose(s.alphas, 1 - betas, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s.sqrt_alphas_cumprod**2 + s.sqrt_one_minus_alphas_cumprod**2, 1.0, rtol=1e-6)
    np.testing.assert_allclose(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1], rtol=1e-6)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_index_i_is_paper_t_equals_i_plus_1(name):
    """Index 0 is the paper's t = 1: ᾱ_1 = 1 − β_1, ᾱ_0 = 1, and β̃_1 = 0 (no noise at the last step)."""
    s = get_schedule(name, 100)
    assert float(s.alphas_cumprod[0]) == pytest.approx(1 - float(s.betas[0]), rel=1e-7)
    assert float(s.alphas_cumprod_prev[0]) == 1.0
    assert float(s.posterior_variance[0]) == 0.0
    # the log variance is clipped to log β̃_2 at index 0 instead of log 0 = −∞
    assert float(s.posterior_log_variance_clipped[0]) == pytest.approx(np.log(float(s.posterior_variance[1])), rel=1e-6)


def test_linear_paper_values_and_rescaling_with_T():
    s = get_schedule("linear", 1000)
    assert float(s.betas[0]) == pytest.approx(1e-4) and float(s.betas[-1]) == pytest.approx(0.02)
    s100 = get_schedule("linear", 100)  # scaled by 1000/T: 1e-3 .. 0.2
    assert float(s100.betas[0]) == pytest.approx(1e-3) and float(s100.betas[-1]) == pytest.approx(0.2)
    assert float(s.alphas_cumprod[-1]) == pytest.approx(4.04e-5, rel=1e-2)  # ᾱ_T ≈ 0: x_T ≈ N(0, I)


def test_cosine_and_scaled_linear_values():
    s = get_schedule("cosine", 1000)
    assert float(s.betas.max()) == pytest.approx(0.999)  # the max_beta clip at t = T
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(s.alphas_cumprod[:500], f(np.arange(1, 501) / 1000) / f(0), rtol=1e-5)
    sd = get_schedule("scaled_linear", 1000)
    assert float(sd.betas[0]) == pytest.approx(0.00085) and float(sd.betas[-1]) == pytest.approx(0.012)


def test_schedule_is_an_immutable_pytree():
    s = get_schedule("linear", 50)
    with pytest.raises(Exception):
        s.betas = s.betas  # frozen dataclass
    doubled = jax.tree_util.tree_map(lambda a: 2 * a, s)
    assert isinstance(doubled, Schedule)
    assert jax.jit(lambda sch: sch.num_timesteps * sch.betas[0])(s) == pytest.approx(50 * float(s.betas[0]))


def test_extract_broadcasts_to_x():
    a = jnp.arange(10.0)
    out = extract(a, jnp.array([1, 7]), (2, 8, 8, 3))
    assert out.shape == (2, 1, 1, 1) and out[:, 0, 0, 0].tolist() == [1.0, 7.0]
    assert extract(a, 3, (5, 2)).shape == (1, 1)  # a scalar t broadcasts over the batch


def test_traced_out_of_range_timesteps_give_nan():
    a = jnp.arange(10.0)
    out = jax.jit(lambda t: extract(a, t, (3, 2)))(jnp.array([-1, 10, 9]))
    assert np.isnan(out[0, 0]) and np.isnan(out[1, 0]) and out[2, 0] == 9.0


def test_unknown_schedule_name():
    with pytest.raises(ValueError, match=r"unknown schedule 'quadratic'; valid choices: linear, cosine, scaled_linear"):
        get_schedule("quadratic")


def test_bad_linear_T():
    with pytest.raises(ValueError, match="beta_T = 2 >= 1"):
        get_schedule("linear", 10)


@pytest.mark.parametrize("t", [[0, 100], [-1, 3], 100])
def test_timesteps_out_of_range(t):
    s = get_schedule("linear", 100)
    with pytest.raises(ValueError, match=r"timesteps must be in \[0, 99\]"):
        extract(s.betas, jnp.asarray(t), (2, 4))
    with pytest.raises(ValueError, match=r"timesteps must be in \[0, 99\]"):
        check_timesteps(np.asarray(t), 100)


def test_float_timesteps_rejected():
    with pytest.raises(ValueError, match="timesteps must be integer indices 0..99"):
        check_timesteps(jnp.array([1.5]), 100)
