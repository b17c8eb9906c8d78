"""Tests for ddpm_jax/diffusion.py: each equation against probability theory or a closed form.

Statistical tests state their tolerance as a multiple of the Monte-Carlo standard error (SE) and use
many samples of tiny vectors so that they stay fast.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion as D
from ddpm_jax.schedules import SCHEDULE_NAMES, BETA_FUNCTIONS, get_schedule

N_SE = 5.0  # tolerance in Monte-Carlo standard errors (a false alarm has probability < 1e-6 per check)


# ------------------------------------------------------------------------------------------------
# Forward process
# ------------------------------------------------------------------------------------------------

def test_q_step_chain_has_moments_of_q_sample():
    """t applications of Eq. 2 give the marginal of Eq. 4: mean √ᾱ_t x0, variance 1 − ᾱ_t.

    N = 200k scalar chains from the same x0; tolerance 5 SE with SE(mean) = √(var/N) and
    SE(var) = var √(2/(N−1)) (Gaussian samples).
    """
    s = get_schedule("linear", 100)
    n, x0_value = 200_000, 0.8
    x0 = jnp.full((n, 1), x0_value, jnp.float32)
    step = jax.jit(lambda x, t, key: D.q_step(s, x, t, jax.random.normal(key, x.shape)))
    x, key = x0, jax.random.key(0)
    for i in range(100):  # index i = paper's t = i+1
        x = step(x, jnp.full((n,), i), jax.random.fold_in(key, i))
        if i in (0, 9, 49, 99):
            mean_q, var_q, _ = D.q_mean_variance(s, x0[:1], jnp.array([i]))
            mean_q, var_q = float(mean_q[0, 0]), float(var_q[0, 0])
            mean_mc, var_mc = float(jnp.mean(x)), float(jnp.var(x, ddof=1))
            assert abs(mean_mc - mean_q) < N_SE * math.sqrt(var_q / n), i
            assert abs(var_mc - var_q) < N_SE * var_q * math.sqrt(2 / (n - 1)), i
            # q_sample draws from the same distribution: same check on its output
            x_q = D.q_sample(s, x0, jnp.full((n,), i), jax.random.normal(jax.random.key(i + 1000), x0.shape))
            assert abs(float(jnp.mean(x_q)) - mean_q) < N_SE * math.sqrt(var_q / n)
            assert abs(float(jnp.var(x_q, ddof=1)) - var_q) < N_SE * var_q * math.sqrt(2 / (n - 1))


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_posterior_is_bayes_rule(name):
    """Eqs. 6–7 equal the product q(x_t | x_{t−1}) q(x_{t−1} | x_0), normalized, computed in float64 for scalars.

    As a function of y = x_{t−1}: N(x_t; √α_t y, β_t) N(y; √ᾱ_{t−1} x0, 1 − ᾱ_{t−1}) ∝ N(y; m, v) with
    1/v = α_t/β_t + 1/(1 − ᾱ_{t−1}) and m = v (√α_t x_t/β_t + √ᾱ_{t−1} x0/(1 − ᾱ_{t−1})).
    """
    T = 1000
    betas = BETA_FUNCTIONS[name](T)
    alphas, alphas_cumprod = 1 - betas, np.cumprod(1 - betas)
    rng = np.random.default_rng(0)
    t = np.arange(1, T)  # index 0 (paper t = 1) has ᾱ_{t−1} = 1: q(x_0 | x_1, x_0) is a point mass, checked below
    x0, x_t = rng.uniform(-1, 1, T - 1), rng.standard_normal(T - 1)
    prev = alphas_cumprod[t - 1]
    v = 1 / (alphas[t] / betas[t] + 1 / (1 - prev))
    m = v * (np.sqrt(alphas[t]) * x_t / betas[t] + np.sqrt(prev) * x0 / (1 - prev))

    s = get_schedule(name, T)
    mean, var, log_var = D.q_posterior_mean_variance(s, jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(mean), m, atol=1e-6)
    np.testing.assert_allclose(np.asarray(var), v, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(log_var), np.log(v), atol=1e-5)
    mean0, var0, _ = D.q_posterior_mean_variance(s, jnp.array([0.3]), jnp.array([2.0]), jnp.array([0]))
    assert float(mean0[0]) == pytest.approx(0.3, abs=1e-6) and float(var0[0]) == 0.0


# ------------------------------------------------------------------------------------------------
# Parameterizations and the reverse process
# ------------------------------------------------------------------------------------------------

def _x0_eps_t(shape=(64, 4, 4, 3), T=1000, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x0 = jax.random.uniform(k1, shape, minval=-1, maxval=1)
    eps = jax.random.normal(k2, shape)
    t = jax.random.randint(k3, (shape[0],), 0, T)
    return x0, eps, t


def test_parameterizations_are_consistent():
    s = get_schedule("linear")
    x0, eps, t = _x0_eps_t()
    x_t = D.q_sample(s, x0, t, eps)
    v = D.v_from_x0_eps(s, x0, t, eps)
    # x0 from eps is ill-conditioned at large t (1/√ᾱ_T ≈ 160), hence the looser tolerance
    np.testing.assert_allclose(D.predict_x0_from_eps(s, x_t, t, eps), x0, atol=2e-4)
    np.testing.assert_allclose(D.predict_x0_from_v(s, x_t, t, v), x0, atol=1e-5)
    np.testing.assert_allclose(D.predict_eps_from_v(s, x_t, t, v), eps, atol=1e-5)
    small_t = jnp.minimum(t, 900)  # eps from x0 divides by √(1/ᾱ_t − 1) → 0 as t → 0
    small_t = jnp.maximum(small_t, 50)
    x_t2 = D.q_sample(s, x0, small_t, eps)
    np.testing.assert_allclose(D.predict_eps_from_x0(s, x_t2, small_t, x0), eps, atol=1e-4)


def test_p_mean_is_eq_11_and_same_for_every_prediction():
    """μ_θ = (x_t − β_t/√(1 − ᾱ_t) ε̂)/√α_t (Eq. 11); an ε̂, the matching x̂0 or v̂ give the same p."""
    s = get_schedule("linear")
    x0, eps, t = _x0_eps_t()
    t = jnp.maximum(t, 1)
    x_t = D.q_sample(s, x0, t, eps)
    out = D.p_mean_variance(s, eps, x_t, t, clip_denoised=False)
    b, a, ab = (np.asarray(arr, np.float64)[np.asarray(t)][:, None, None, None] for arr in (s.betas, s.alphas, s.alphas_cumprod))
    eq11 = (np.asarray(x_t) - b / np.sqrt(1 - ab) * np.asarray(eps)) / np.sqrt(a)
    np.testing.assert_allclose(out.mean, eq11, atol=2e-5)
    np.testing.assert_allclose(out.x0_hat, x0, atol=2e-4)
    for prediction, output in [("x0", x0), ("v", D.v_from_x0_eps(s, x0, t, eps))]:
        other = D.p_mean_variance(s, output, x_t, t, prediction=prediction, clip_denoised=False)
        np.testing.assert_allclose(other.mean, out.mean, atol=2e-5)
        np.testing.assert_allclose(other.variance, out.variance)


def test_variance_choices():
    s = get_schedule("linear", 100)
    x = jnp.zeros((100, 2))
    t = jnp.arange(100)
    small = D.p_mean_variance(s, x, x, t, variance="fixed_small")
    large = D.p_mean_variance(s, x, x, t, variance="fixed_large")
    np.testing.assert_allclose(small.variance[:, 0], s.posterior_variance)
    np.testing.assert_allclose(large.variance[1:, 0], s.betas[1:])
    assert float(large.variance[0, 0]) == float(s.posterior_variance[1])  # first entry β̃ at index 1, as in the original code
    np.testing.assert_allclose(large.log_variance, np.log(large.variance), rtol=1e-6)


def test_clip_denoised_clips_x0_hat():
    s = get_schedule("linear")
    x_t = jnp.full((2, 3), 5.0)
    t = jnp.array([10, 500])
    assert float(D.p_mean_variance(s, jnp.zeros((2, 3)), x_t, t, clip_denoised=True).x0_hat.max()) == 1.0
    assert float(D.p_mean_variance(s, jnp.zeros((2, 3)), x_t, t, clip_denoised=False).x0_hat.max()) > 5.0


def test_p_sample_adds_no_noise_at_index_0():
    s = get_schedule("cosine", 100)
    x_t, eps = jnp.ones((2, 3)), jnp.zeros((2, 3))
    t = jnp.array([0, 1])
    a = D.p_sample(s, eps, x_t, t, jnp.zeros((2, 3)))
    b = D.p_sample(s, eps, x_t, t, jnp.full((2, 3), 3.0))
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.allclose(a[1], b[1])
    np.testing.assert_allclose(b[1] - a[1], 3.0 * np.sqrt(float(s.posterior_variance[1])), rtol=1e-5)


def test_swapped_posterior_changes_p_and_default_restores_it():
    s = get_schedule("linear", 100)
    x0, eps, t = _x0_eps_t((8, 3), T=100)
    x_t = D.q_sample(s, x0, t, eps)

    def posterior_times_4(schedule, x0, x_t, t):
        mean, var, log_var = D.q_posterior_mean_variance(schedule, x0, x_t, t)
        return mean, 4 * var, log_var + math.log(4.0)

    default = D.p_mean_variance(s, eps, x_t, t)
    swapped = D.p_mean_variance(s, eps, x_t, t, q_posterior_fn=posterior_times_4)
    np.testing.assert_allclose(swapped.variance, 4 * default.variance, rtol=1e-6)
    np.testing.assert_array_equal(D.p_mean_variance(s, eps, x_t, t).mean, default.mean)


# ------------------------------------------------------------------------------------------------
# Loss (Algorithm 1) with the analytic optimal predictor for Gaussian data
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_simple_with_optimal_predictor_equals_closed_form(prediction):
    """Data x0 ~ N(0, s²), x_t = a x0 + b ε (a = √ᾱ_t, b = √(1 − ᾱ_t)). For a target y = c_x x0 + c_e ε the
    optimal predictor is E[y | x_t] = Cov(y, x_t)/Var(x_t) x_t and its expected squared error is
    Var(y | x_t) = Var(y) − Cov(y, x_t)²/Var(x_t); so E[L_simple] = mean over t of that (t uniform).
    For ε this is the brief's ε*(x_t, t) = √(1 − ᾱ_t) x_t/(ᾱ_t s² + 1 − ᾱ_t).

    Tolerance 5 SE; each example's error is Var(y|x_t) χ²_1, so SE² = (3 E[v_t²] − E[v_t]²)/N.
    """
    sched = get_schedule("cosine", 200)
    sigma, n = 0.5, 400_000
    ab = np.asarray(sched.alphas_cumprod, np.float64)
    a, b = np.sqrt(ab), np.sqrt(1 - ab)
    c_x, c_e = {"eps": (0.0, 1.0), "x0": (1.0, 0.0), "v": (-b, a)}[prediction]  # v = a ε − b x0
    var_y = c_x**2 * sigma**2 + c_e**2
    cov = c_x * a * sigma**2 + c_e * b
    var_xt = a**2 * sigma**2 + b**2
    cond_var = var_y - cov**2 / var_xt                        # [T]
    expected, se = cond_var.mean(), math.sqrt((3 * (cond_var**2).mean() - cond_var.mean() ** 2) / n)

    gain = jnp.asarray(cov / var_xt, jnp.float32)             # [T]: E[y | x_t] = gain_t x_t
    model_fn = lambda x_t, t: gain[t][:, None] * x_t
    x0 = sigma * jax.random.normal(jax.random.key(1), (n, 1))
    loss = float(jax.jit(lambda k: D.loss_simple(sched, model_fn, x0, k, prediction=prediction))(jax.random.key(2)))
    assert abs(loss - expected) < N_SE * se, (loss, expected, se)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_loss_with_optimal_predictor_equals_closed_form(prediction):
    """Min-SNR-γ (Hang et al. 2023) on the Gaussian case above: the expected weighted loss is the mean over
    t of w_t Var(y | x_t), and for every target it equals mean_t min{SNR_t, γ} Var(x_0 | x_t), the paper's
    weighted x_0 objective (Var(ε | x_t) = SNR_t Var(x_0 | x_t), Var(v | x_t) = (SNR_t + 1) Var(x_0 | x_t)).
    Tolerance 5 SE as above."""
    sched, gamma = get_schedule("cosine", 200), 5.0
    sigma, n = 0.5, 400_000
    ab = np.asarray(sched.alphas_cumprod, np.float64)
    a, b = np.sqrt(ab), np.sqrt(1 - ab)
    snr = ab / (1 - ab)
    var_x0 = sigma**2 - (a * sigma**2) ** 2 / (a**2 * sigma**2 + b**2)        # Var(x_0 | x_t) [T]
    expected = float(np.mean(np.minimum(snr, gamma) * var_x0))               # the same for every target
    c_x, c_e = {"eps": (0.0, 1.0), "x0": (1.0, 0.0), "v": (-b, a)}[prediction]
    var_xt = a**2 * sigma**2 + b**2
    cov = c_x * a * sigma**2 + c_e * b
    weight = np.asarray(D.min_snr_weight(sched, jnp.arange(200), gamma, prediction), np.float64)
    v_t = weight * (c_x**2 * sigma**2 + c_e**2 - cov**2 / var_xt)           # w_t Var(y | x_t)
    np.testing.assert_allclose(v_t.mean(), expected, rtol=1e-4)             # the identity, in float64
    se = math.sqrt((3 * (v_t**2).mean() - v_t.mean() ** 2) / n)

    gain = jnp.asarray(cov / var_xt, jnp.float32)
    model_fn = lambda x_t, t: gain[t][:, None] * x_t
    x0 = sigma * jax.random.normal(jax.random.key(1), (n, 1))
    loss = float(jax.jit(lambda k: D.loss_simple(sched, model_fn, x0, k, prediction=prediction,
                                                 min_snr_gamma=gamma))(jax.random.key(2)))
    assert abs(loss - expected) < N_SE * se, (loss, expected, se)


def test_min_snr_weights_are_one_objective_for_every_target():
    """Exact, per draw: a predictor of x̂_0, written as ε̂ or v̂ (its conversions), gets the same min-SNR-γ
    loss as min{SNR, γ} ‖x_0 − x̂_0‖² under every target (≤ 1e-5 relative); the weights are the formulas;
    γ → ∞ gives back the unweighted L_simple for ε (w = 1), and γ ≤ 0 is refused."""
    sched, gamma = get_schedule("linear", 1000), 5.0
    t = jnp.array([0, 10, 100, 300, 600, 999])
    snr = np.asarray(sched.alphas_cumprod, np.float64)[np.asarray(t)]
    snr = snr / (1 - snr)
    clipped = np.minimum(snr, gamma)
    for prediction, formula in (("x0", clipped), ("eps", clipped / snr), ("v", clipped / (snr + 1))):
        np.testing.assert_allclose(D.min_snr_weight(sched, t, gamma, prediction), formula, rtol=1e-5)

    x0 = jax.random.uniform(jax.random.key(0), (32, 4, 4, 1), minval=-1, maxval=1)
    x0_hat_of = lambda x_t, t: jnp.tanh(0.7 * x_t) * (1 - t[:, None, None, None] / 2000)   # any x̂_0(x_t, t)
    outputs = {"x0": x0_hat_of,
               "eps": lambda x_t, t: D.predict_eps_from_x0(sched, x_t, t, x0_hat_of(x_t, t)),
               "v": lambda x_t, t: D.v_from_x0_eps(sched, x0_hat_of(x_t, t), t,
                                                   D.predict_eps_from_x0(sched, x_t, t, x0_hat_of(x_t, t)))}
    key = jax.random.key(3)
    losses = {p: float(D.loss_simple(sched, f, x0, key, prediction=p, min_snr_gamma=gamma)) for p, f in outputs.items()}
    t_drawn, eps = D.draw_t_eps(sched, x0, key)
    x_t = D.q_sample(sched, x0, t_drawn, eps)
    direct = jnp.mean(jnp.minimum(D.snr(sched, t_drawn), gamma) * D.mean_flat((x0 - x0_hat_of(x_t, t_drawn)) ** 2))
    for p, loss in losses.items():
        assert loss == pytest.approx(float(direct), rel=1e-5), (p, losses, float(direct))
    plain = D.loss_simple(sched, outputs["eps"], x0, key)
    assert float(D.loss_simple(sched, outputs["eps"], x0, key, min_snr_gamma=1e30)) == pytest.approx(float(plain), rel=1e-6)
    assert float(plain) != pytest.approx(losses["eps"], rel=1e-2)        # the weighting changes the loss
    for bad in (0.0, -5.0, "five"):
        with pytest.raises(ValueError, match="min-SNR"):
            D.min_snr_weight(sched, t, bad)


def test_loss_simple_uses_the_swapped_q_sample():
    s = get_schedule("linear", 100)
    x0 = jnp.zeros((16, 2))
    model_fn = lambda x_t, t: x_t  # ε̂ = x_t
    zero_noise_q = lambda schedule, x0, t, eps: x0  # a "forward process" that adds nothing
    assert float(D.loss_simple(s, model_fn, x0, jax.random.key(0), q_sample_fn=zero_noise_q)) == pytest.approx(1.0, rel=0.5)
    assert float(D.loss_simple(s, model_fn, x0, jax.random.key(0))) != float(
        D.loss_simple(s, model_fn, x0, jax.random.key(0), q_sample_fn=zero_noise_q))


# ------------------------------------------------------------------------------------------------
# Variational bound (Eq. 5)
# ------------------------------------------------------------------------------------------------

def test_normal_kl_matches_monte_carlo():
    """KL(p1 ‖ p2) = E_{x~p1}[log p1(x) − log p2(x)]; 1M samples, tolerance 5 SE."""
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(1.7)
    x = m1 + math.exp(0.5 * lv1) * np.random.default_rng(0).standard_normal(1_000_000)
    log_p = lambda x, m, lv: -0.5 * (math.log(2 * math.pi) + lv + (x - m) ** 2 / math.exp(lv))
    ratio = log_p(x, m1, lv1) - log_p(x, m2, lv2)
    kl = float(D.normal_kl(jnp.float32(m1), jnp.float32(lv1), jnp.float32(m2), jnp.float32(lv2)))
    assert abs(kl - ratio.mean()) < N_SE * ratio.std() / math.sqrt(len(x))
    assert float(D.normal_kl(jnp.float32(m1), jnp.float32(lv1), jnp.float32(m1), jnp.float32(lv1))) == 0.0


def test_prior_bpd_closed_form():
    """L_T = KL(N(√ᾱ_T x0, 1 − ᾱ_T) ‖ N(0, 1)) = ½(ᾱ_T x0² + (1 − ᾱ_T) − 1 − log(1 − ᾱ_T)) per dim, / ln 2."""
    s = get_schedule("linear", 1000)
    x0 = jnp.linspace(-1, 1, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
    ab = float(np.cumprod(1 - BETA_FUNCTIONS["linear"](1000))[-1])
    per_dim = 0.5 * (ab * np.asarray(x0, np.float64) ** 2 + (1 - ab) - 1 - math.log(1 - ab)) / math.log(2)
    np.testing.assert_allclose(D.prior_bpd(s, x0), per_dim.reshape(2, -1).mean(1), rtol=1e-4)
    assert float(D.prior_bpd(s, x0).max()) < 1e-4  # ≈ 0 bits/dim for the paper's schedule


def test_discretized_gaussian_likelihood_sums_to_one_over_bins():
    bins = jnp.linspace(-1, 1, 256)[:, None]  # [256, 1]: every value 8-bit data can take
    for mean, log_scale in [(0.0, -1.0), (0.7, -4.0), (-1.0, -6.0), (0.1, 1.0)]:
        ll = D.discretized_gaussian_log_likelihood(bins, means=jnp.float32(mean), log_scales=jnp.float32(log_scale))
        assert float(jnp.exp(ll).sum()) == pytest.approx(1.0, abs=1e-4)


def test_vlb_terms_with_exact_model():
    """A model that outputs the true x0 gives p_θ = q(x_{t−1} | x_t, x0): L_{t−1} = 0; a mean offset δ gives
    KL = δ²/(2 β̃_t) nats. L_0 = −log2 P(|u| < 1/255) with u ~ N(0, β̃_2) (the clipped index-0 variance)."""
    s = get_schedule("linear", 1000)
    x0 = jnp.round(jnp.linspace(-0.9, 0.9, 6 * 8).reshape(6, 8) * 127.5) / 127.5  # values on the 8-bit grid
    t = jnp.array([0, 1, 10, 100, 500, 999])
    x_t = D.q_sample(s, x0, t, jax.random.normal(jax.random.key(0), x0.shape))
    terms = D.vlb_term_bpd(s, x0, x0, x_t, t, prediction="x0")
    np.testing.assert_allclose(terms[1:], 0.0, atol=1e-5)
    sd = math.sqrt(float(s.posterior_variance[1]))
    l0 = -math.log2(math.erf((1 / 255) / sd / math.sqrt(2)))
    assert float(terms[0]) == pytest.approx(l0, rel=1e-3)

    delta = 0.01
    def p_shifted(schedule, model_output, x_t, t, **kw):
        out = D.p_mean_variance(schedule, model_output, x_t, t, **kw)
        return out._replace(mean=out.mean + delta)

    terms = D.vlb_term_bpd(s, x0, x0, x_t, t, prediction="x0", p_mean_variance_fn=p_shifted)
    var = np.asarray(s.posterior_variance, np.float64)[np.asarray(t)]
    np.testing.assert_allclose(terms[1:], delta**2 / (2 * var[1:]) / math.log(2), rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def test_bad_choices_raise_one_clear_error():
    s = get_schedule("linear", 30)
    x, t = jnp.zeros((2, 3)), jnp.array([1, 2])
    with pytest.raises(ValueError, match=r"unknown prediction 'epsilon'; valid choices: eps, x0, v"):
        D.p_mean_variance(s, x, x, t, prediction="epsilon")
    with pytest.raises(ValueError, match=r"unknown variance 'learned'; valid choices: fixed_small, fixed_large"):
        D.p_mean_variance(s, x, x, t, variance="learned")
    with pytest.raises(ValueError, match=r"timesteps must be in \[0, 29\]"):
        D.q_sample(s, x, jnp.array([0, 30]), x)
