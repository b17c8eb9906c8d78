"""The equations of DDPM (Ho et al. 2020), one small pure function each.

Every function takes the :class:`~ddpm_jax.schedules.Schedule` first and works on arrays x of shape
[B, ...] (images are [B, H, W, C]) with integer timesteps ``t`` of shape [B] (or a scalar). Index ``t``
is the paper's t+1 (see ``schedules.py``). Nothing here knows about Flax: a model enters only as its
output ``model_output`` (ε̂, x̂0 or v̂, chosen by ``prediction``) or, in :func:`loss_simple`, as a
function ``model_fn(x_t, t)``.

Swapping an equation. A function that uses another equation takes it as a keyword argument whose
default is the library's, e.g. ``p_mean_variance(..., q_posterior_fn=q_posterior_mean_variance)``.
To try your own Eq. 7 in a notebook, without editing the package::

    pmv = functools.partial(p_mean_variance, q_posterior_fn=my_q_posterior)
    x0 = samplers.ddpm_sample(eps_fn, schedule, shape, key, p_mean_variance_fn=pmv)

Notation: ``alphas_cumprod`` is ᾱ_t, ``eps`` is ε ~ N(0, I), ``eps_hat`` is the model's ε_θ(x_t, t),
``x0_hat`` the model's estimate of x_0, ``v`` the velocity of Salimans & Ho 2022.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ddpm_jax.schedules import Schedule, extract

PREDICTIONS = ("eps", "x0", "v")
# The model as every sampler, scheduler and evaluation sees it: (x_t [B, ...], t [B]) -> model output
# [B, ...] (ε̂, x̂_0 or v̂, per ``prediction``); it may close over parameters and a condition.
EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
VARIANCES = ("fixed_small", "fixed_large")


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid choices: {', '.join(choices)}")


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over every axis but the batch axis: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ================================================================================================
# Forward process q (Sec. 2)
# ================================================================================================

def q_step(schedule: Schedule, x_prev: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """One forward step, Eq. 2: q(x_t | x_{t−1}) = N(x_t; √(1 − β_t) x_{t−1}, β_t I).

    Returns x_t = √α_t x_{t−1} + √β_t ε.
    """
    alpha_t = extract(schedule.alphas, t, x_prev.shape)  # [B, 1, 1, 1]
    beta_t = extract(schedule.betas, t, x_prev.shape)
    return jnp.sqrt(alpha_t) * x_prev + jnp.sqrt(beta_t) * eps


def q_mean_variance(schedule: Schedule, x0: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Eq. 4: q(x_t | x_0) = N(x_t; √ᾱ_t x_0, (1 − ᾱ_t) I). Returns (mean, variance, log_variance)."""
    mean = extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
    variance = 1.0 - extract(schedule.alphas_cumprod, t, x0.shape)
    log_variance = extract(schedule.log_one_minus_alphas_cumprod, t, x0.shape)
    return mean, variance, log_variance


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """Sample Eq. 4 in closed form: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε,  ε ~ N(0, I)."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
            + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * eps)


def q_posterior_mean_variance(
    schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Eqs. 6–7: q(x_{t−1} | x_t, x_0) = N(x_{t−1}; μ̃_t(x_t, x_0), β̃_t I), with

    μ̃_t = √ᾱ_{t−1} β_t/(1 − ᾱ_t) x_0 + √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) x_t,   β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) β_t.

    Returns (mean, variance, log_variance_clipped); see ``Schedule.posterior_log_variance_clipped``.
    """
    mean = (extract(schedule.posterior_mean_coef1, t, x_t.shape) * x0
            + extract(schedule.posterior_mean_coef2, t, x_t.shape) * x_t)
    variance = extract(schedule.posterior_variance, t, x_t.shape)
    log_variance_clipped = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
    return mean, variance, log_variance_clipped


# ================================================================================================
# Parameterizations: ε, x_0 and v are interchangeable given x_t (Eq. 4 solved for one of them)
# ================================================================================================

def predict_x0_from_eps(schedule: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """Eq. 4 solved for x_0 (as in Eq. 15): x̂_0 = (x_t − √(1 − ᾱ_t) ε̂)/√ᾱ_t = x_t/√ᾱ_t − √(1/ᾱ_t − 1) ε̂."""
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)


def predict_eps_from_x0(schedule: Schedule, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
    """Eq. 4 solved for ε: ε̂ = (x_t/√ᾱ_t − x̂_0)/√(1/ᾱ_t − 1)."""
    return ((extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0)
            / extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape))


def v_from_x0_eps(schedule: Schedule, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """Velocity (Salimans & Ho 2022, Sec. 4): v = √ᾱ_t ε − √(1 − ᾱ_t) x_0. The v-prediction target."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * eps
            - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0)


def predict_x0_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """x̂_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v̂ (Salimans & Ho 2022)."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x_t.shape) * x_t
            - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)


def predict_eps_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """ε̂ = √ᾱ_t v̂ + √(1 − ᾱ_t) x_t (Salimans & Ho 2022)."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x_t.shape) * v
            + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t)


def predict_x0_and_eps(
    schedule: Schedule, model_output: jax.Array, x_t: jax.Array, t: jax.Array, *, prediction: str = "eps"
) -> tuple[jax.Array, jax.Array]:
    """(x̂_0, ε̂) from the model output, which is ε̂ ("eps"), x̂_0 ("x0") or v̂ ("v")."""
    _check_choice("prediction", prediction, PREDICTIONS)
    if prediction == "eps":
        eps_hat = model_output
        x0_hat = predict_x0_from_eps(schedule, x_t, t, eps_hat)
    elif prediction == "x0":
        x0_hat = model_output
        eps_hat = predict_eps_from_x0(schedule, x_t, t, x0_hat)
    else:
        x0_hat = predict_x0_from_v(schedule, x_t, t, model_output)
        eps_hat = predict_eps_from_v(schedule, x_t, t, model_output)
    return x0_hat, eps_hat


# ================================================================================================
# Reverse process p_θ (Sec. 3.2) and sampling steps
# ================================================================================================

class PMeanVariance(NamedTuple):
    """p_θ(x_{t−1} | x_t) = N(mean, variance), plus the x̂_0 the mean was computed from."""

    mean: jax.Array          # μ_θ(x_t, t)              [B, H, W, C]
    variance: jax.Array      # σ_t²                     [B, 1, 1, 1]
    log_variance: jax.Array  # log σ_t²                 [B, 1, 1, 1]
    x0_hat: jax.Array        # x̂_0 (clipped if asked)   [B, H, W, C]


def p_mean_variance(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = True,
    q_posterior_fn: Callable = q_posterior_mean_variance,
) -> PMeanVariance:
    """Eq. 11 (Sec. 3.2): p_θ(x_{t−1} | x_t) = N(μ_θ(x_t, t), σ_t² I), with μ_θ = μ̃_t(x_t, x̂_0).

    With ε-prediction, μ_θ = μ̃_t(x_t, (x_t − √(1 − ᾱ_t) ε̂)/√ᾱ_t) = (x_t − β_t/√(1 − ᾱ_t) ε̂)/√α_t,
    which is Eq. 11. Computing it through x̂_0 lets ``clip_denoised`` clip x̂_0 to [−1, 1] first
    (as the original code does when sampling).

    variance: "fixed_small" σ_t² = β̃_t (the posterior variance of Eq. 7, as returned by
    ``q_posterior_fn``); "fixed_large" σ_t² = β_t, with the first entry set to β̃_2 so its log is
    finite (as in the original code; at index 0 no noise is added anyway). Sec. 3.2: both give
    similar samples.
    """
    _check_choice("variance", variance, VARIANCES)
    x0_hat, _ = predict_x0_and_eps(schedule, model_output, x_t, t, prediction=prediction)
    if clip_denoised:
        x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    mean, posterior_var, posterior_log_var = q_posterior_fn(schedule, x0_hat, x_t, t)
    if variance == "fixed_small":
        var, log_var = posterior_var, posterior_log_var
    else:
        large = jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]])  # [T] (T = 1: β_1)
        large = large if schedule.num_timesteps > 1 else schedule.betas
        var = extract(large, t, x_t.shape)
        log_var = jnp.log(var)
    return PMeanVariance(mean, var, log_var, x0_hat)


def p_sample(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = True,
    p_mean_variance_fn: Callable = p_mean_variance,
) -> jax.Array:
    """One step of Algorithm 2: x_{t−1} = μ_θ(x_t, t) + σ_t z,  z ~ N(0, I) (``noise``), and z = 0 at
    the last step (paper t = 1, index t = 0 here)."""
    out = p_mean_variance_fn(schedule, model_output, x_t, t, prediction=prediction, variance=variance,
                             clip_denoised=clip_denoised)
    nonzero = (jnp.asarray(t) != 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))  # [B, 1, 1, 1]
    return out.mean + nonzero * jnp.exp(0.5 * out.log_variance) * noise


def alpha_cumprod_at(schedule: Schedule, t: jax.Array, x_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(ᾱ_t, 1 − ᾱ_t), each [B, 1, 1, 1]; t < 0 means "before any noise": (1, 0).

    1 − ᾱ_t is taken from the float64-computed schedule rather than subtracted in float32, which
    would lose digits when ᾱ_t ≈ 1 (1 − ᾱ_1 = 1e-4).
    """
    t = jnp.asarray(t)
    no_noise = t.reshape((-1,) + (1,) * (len(x_shape) - 1)) < 0
    t = jnp.maximum(t, 0)
    alpha_cumprod = jnp.where(no_noise, 1.0, extract(schedule.alphas_cumprod, t, x_shape))
    one_minus = jnp.where(no_noise, 0.0, extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_shape) ** 2)
    return alpha_cumprod, one_minus


def ddim_sigma(
    schedule: Schedule, t: jax.Array, t_prev: jax.Array, eta: jax.Array | float, x_shape: tuple[int, ...]
) -> jax.Array:
    """Song et al. 2021, Eq. 16: σ_t(η) = η √((1 − ᾱ_{t_prev})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t_prev}). [B, 1, 1, 1]

    η = 0 is DDIM (deterministic); η = 1 with t_prev = t − 1 is DDPM's σ_t² = β̃_t.
    """
    alpha_cumprod_t, one_minus_t = alpha_cumprod_at(schedule, t, x_shape)
    alpha_cumprod_prev, one_minus_prev = alpha_cumprod_at(schedule, t_prev, x_shape)
    return eta * jnp.sqrt(one_minus_prev / one_minus_t * (1.0 - alpha_cumprod_t / alpha_cumprod_prev))


def ddim_step(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    noise: jax.Array,
    *,
    eta: jax.Array | float = 0.0,
    prediction: str = "eps",
    clip_denoised: bool = True,
) -> jax.Array:
    """Song et al. 2021 (DDIM), Eq. 12, from timestep t to an earlier timestep t_prev:

    x_{t_prev} = √ᾱ_{t_prev} x̂_0 + √(1 − ᾱ_{t_prev} − σ_t²) ε̂ + σ_t z,   σ_t = ddim_sigma(…, η)  (Eq. 16).

    ``t_prev < 0`` means "after the last step": ᾱ_{t_prev} = 1 (diffusers' ``set_alpha_to_one``).
    As in diffusers' DDIMScheduler, ``clip_denoised`` clips x̂_0 but ε̂ stays the model's.
    """
    x0_hat, eps_hat = predict_x0_and_eps(schedule, model_output, x_t, t, prediction=prediction)
    if clip_denoised:
        x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    alpha_cumprod_prev, one_minus_prev = alpha_cumprod_at(schedule, t_prev, x_t.shape)  # [B, 1, 1, 1]
    sigma = ddim_sigma(schedule, t, t_prev, eta, x_t.shape)
    direction = jnp.sqrt(jnp.maximum(one_minus_prev - sigma**2, 0.0)) * eps_hat  # "direction pointing to x_t"
    return jnp.sqrt(alpha_cumprod_prev) * x0_hat + direction + sigma * noise


# ================================================================================================
# Training objective (Algorithm 1)
# ================================================================================================

def draw_t_eps(schedule: Schedule, x0: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Algorithm 1's draws for a batch x_0 [B, H, W, C]: t ~ Uniform{0..T−1} [B] and ε ~ N(0, I) [B, H, W, C]."""
    key_t, key_eps = jax.random.split(key)
    t = jax.random.randint(key_t, (x0.shape[0],), 0, schedule.num_timesteps)  # [B]
    eps = jax.random.normal(key_eps, x0.shape, x0.dtype)                       # [B, H, W, C]
    return t, eps


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
    """The signal-to-noise ratio of x_t (Kingma et al. 2021, Eq. 2): SNR(t) = ᾱ_t / (1 − ᾱ_t). t [B] → [B]."""
    alpha_bar = schedule.alphas_cumprod[t]
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weight(schedule: Schedule, t: jax.Array, gamma: float, prediction: str = "eps") -> jax.Array:
    """Min-SNR-γ loss weights (Hang et al. 2023), per example: t [B] → w_t [B].

    The paper weights the x_0 error by min{SNR(t), γ}, so that the nearly clean timesteps (huge SNR) stop
    dominating the gradient. The same objective for the other targets follows from
    ‖ε − ε̂‖² = SNR(t) ‖x_0 − x̂_0‖² and ‖v − v̂‖² = (SNR(t) + 1) ‖x_0 − x̂_0‖²:

        w_t = min{SNR(t), γ}                 prediction "x0"
        w_t = min{SNR(t), γ} / SNR(t)        prediction "eps"   (= 1 where SNR(t) ≤ γ: L_simple there)
        w_t = min{SNR(t), γ} / (SNR(t) + 1)  prediction "v"

    so all three train toward min{SNR(t), γ} ‖x_0 − x̂_0‖². The paper's default is γ = 5.
    """
    _check_choice("prediction", prediction, PREDICTIONS)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise ValueError(f"min-SNR γ (config: diffusion.min_snr_gamma) must be a number > 0, got {gamma!r} "
                         f"(Hang et al. use 5; None turns the weighting off)")
    ratio = snr(schedule, t)                                                       # [B]
    clipped = jnp.minimum(ratio, gamma)
    return {"x0": clipped, "eps": clipped / ratio, "v": clipped / (ratio + 1.0)}[prediction]


def loss_simple(
    schedule: Schedule,
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x0: jax.Array,
    key: jax.Array,
    *,
    prediction: str = "eps",
    min_snr_gamma: float | None = None,
    q_sample_fn: Callable = q_sample,
) -> jax.Array:
    """Algorithm 1 / Eq. 14: L_simple = E_{t, x_0, ε} ‖ε − ε_θ(√ᾱ_t x_0 + √(1 − ᾱ_t) ε, t)‖².

    Draws t ~ Uniform{0..T−1} (one per example) and ε ~ N(0, I) from ``key``, calls ``model_fn(x_t, t)``
    once on the whole batch, and returns the mean squared error over all elements (a scalar). With
    ``prediction`` "x0" or "v" the target is x_0 or v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 instead of ε.
    ``key`` is one typed key, or one per example [B]: then example b's (t, ε) come from key[b] alone,
    exactly what ``key[b]`` would draw for a batch of one (the training step's per-example rule).
    ``min_snr_gamma``: weight example b's squared error by :func:`min_snr_weight` (Min-SNR-γ, Hang et
    al. 2023) before the mean; None (default) is the paper's unweighted L_simple.
    """
    _check_choice("prediction", prediction, PREDICTIONS)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1:  # one key per example
        if key.shape[0] != x0.shape[0]:
            raise ValueError(f"loss_simple got {key.shape[0]} keys for a batch of {x0.shape[0]}: pass one key "
                             f"or one per example")
        t, eps = jax.vmap(lambda k, x: draw_t_eps(schedule, x[None], k))(key, x0)  # [B, 1], [B, 1, H, W, C]
        t, eps = t[:, 0], eps[:, 0]                                                 # [B], [B, H, W, C]
    else:
        t, eps = draw_t_eps(schedule, x0, key)
    x_t = q_sample_fn(schedule, x0, t, eps)
    if prediction == "eps":
        target = eps
    elif prediction == "x0":
        target = x0
    else:
        target = v_from_x0_eps(schedule, x0, t, eps)
    if min_snr_gamma is None:
        return jnp.mean((target - model_fn(x_t, t)) ** 2)
    weight = min_snr_weight(schedule, t, min_snr_gamma, prediction)                # [B]
    return jnp.mean(weight * mean_flat((target - model_fn(x_t, t)) ** 2))


# ================================================================================================
# Variational bound (Eq. 5), in bits/dim
# ================================================================================================

def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array) -> jax.Array:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats (the Gaussian KLs of Eq. 5)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """Φ(x) by the tanh approximation used in the original DDPM code."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: jax.Array, *, means: jax.Array, log_scales: jax.Array) -> jax.Array:
    """Eq. 13: log p(x_0 | x_1) for data x ∈ [−1, 1] on 256 levels, elementwise, in nats.

    p(x_0 | x_1) = ∫_{δ−(x)}^{δ+(x)} N(u; μ, σ²) du with bin edges x ± 1/255, and the outermost bins
    extended to ∓∞. ``log_scales`` is log σ.
    """
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_minus = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))                # bin (−∞, −1 + 1/255]
    log_one_minus_cdf_minus = jnp.log(jnp.maximum(1.0 - cdf_minus, 1e-12))  # bin [1 − 1/255, ∞)
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_minus, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_minus, log_cdf_delta))


def prior_bpd(schedule: Schedule, x0: jax.Array) -> jax.Array:
    """L_T of Eq. 5 in bits/dim: KL(q(x_T | x_0) ‖ N(0, I)), averaged over dims. [B, ...] -> [B].

    No parameters: ≈ 0 for a good schedule (Sec. 3.1).
    """
    t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = q_mean_variance(schedule, x0, t)
    return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)


def vlb_term_bpd(
    schedule: Schedule,
    model_output: jax.Array,
    x0: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = True,
    p_mean_variance_fn: Callable = p_mean_variance,
    q_posterior_fn: Callable = q_posterior_mean_variance,
) -> jax.Array:
    """One term of Eq. 5 in bits/dim, per example ([B]), for x_t ~ q(x_t | x_0) and ``model_output`` at (x_t, t):

    - index t > 0 (paper t ≥ 2): L_{t−1} = KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)), a Gaussian KL;
    - index t = 0 (paper t = 1): L_0 = −log p_θ(x_0 | x_1), the discretized decoder of Eq. 13.

    Bits/dim of the whole bound = prior_bpd + Σ_{t=0}^{T−1} vlb_term_bpd (an evaluation module sums
    or estimates the sum over t). ``clip_denoised=True`` as in the original code's ``calc_bpd_loop``.
    """
    true_mean, _, true_log_var = q_posterior_fn(schedule, x0, x_t, t)
    p = p_mean_variance_fn(schedule, model_output, x_t, t, prediction=prediction, variance=variance,
                           clip_denoised=clip_denoised)
    kl = mean_flat(normal_kl(true_mean, true_log_var, p.mean, p.log_variance)) / math.log(2.0)  # [B]
    decoder_nll = -mean_flat(
        discretized_gaussian_log_likelihood(x0, means=p.mean, log_scales=0.5 * p.log_variance)
    ) / math.log(2.0)  # [B]
    return jnp.where(jnp.asarray(t) == 0, decoder_nll, kl)
