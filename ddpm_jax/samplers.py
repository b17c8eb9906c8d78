"""Samplers: the whole reverse chain as ONE ``lax.scan`` (one compiled program, one trace of the step).

- :func:`ddpm_sample`: ancestral sampling, Algorithm 2 of Ho et al. 2020 (T steps of :func:`p_sample`).
- :func:`ddim_sample`: Song et al. 2021, Eq. 12 (:func:`ddim_step`) on a subsequence of the timesteps.

``eps_fn(x_t, t)`` takes x_t [B, H, W, C] and t int32 [B] and returns the model output (ε̂ by default,
see ``prediction``). It may close over parameters. To compile once and reuse, jit the call, passing
what changes as arguments::

    sample = jax.jit(lambda params, key, eta: ddim_sample(
        lambda x, t: unet.apply(params, x, t), schedule, (16, 32, 32, 3), key, num_steps=50, eta=eta))

``eta`` is a traced value (changing it does not retrace); ``num_steps`` and ``shape`` are static
(changing them traces the step once more, not once per step). Per-step randomness comes from
``jax.random.fold_in(key, t)``, so it does not depend on how the chain is compiled.

Return value: x_0 [B, H, W, C]; with ``return_trajectory=True`` the pair (x_0, trajectory) where
trajectory [S+1, B, H, W, C] holds x_T first, then the sample after each of the S steps (S = T for
DDPM, S = num_steps for DDIM), so ``trajectory[-1] == x_0``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.diffusion import ddim_step, p_mean_variance, p_sample
from ddpm_jax.schedules import Schedule

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


def _run_chain(
    step: Callable, x_T: jax.Array, timesteps: jax.Array | tuple, return_trajectory: bool
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Run ``x = step(x, timestep)`` over ``timesteps`` with one lax.scan; optionally stack the trajectory."""
    def body(x_t, ts):
        x_prev = step(x_t, ts)
        return x_prev, (x_prev if return_trajectory else None)

    x0, xs = jax.lax.scan(body, x_T, timesteps)  # xs: [S, B, H, W, C] or None
    if return_trajectory:
        return x0, jnp.concatenate([x_T[None], xs], axis=0)  # [S+1, B, H, W, C]
    return x0


def _initial_noise(key: jax.Array, shape: Sequence[int], x_T: jax.Array | None) -> jax.Array:
    if x_T is None:
        return jax.random.normal(key, tuple(shape), jnp.float32)  # x_T ~ N(0, I)
    if tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
    return jnp.asarray(x_T, jnp.float32)


def ddpm_sample(
    eps_fn: EpsFn,
    schedule: Schedule,
    shape: Sequence[int],
    key: jax.Array,
    *,
    clip_denoised: bool = True,
    variance: str = "fixed_small",
    prediction: str = "eps",
    return_trajectory: bool = False,
    x_T: jax.Array | None = None,
    p_sample_fn: Callable = p_sample,
    p_mean_variance_fn: Callable = p_mean_variance,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Algorithm 2 (Ho et al. 2020): x_T ~ N(0, I); for t = T..1: x_{t−1} = μ_θ(x_t, t) + σ_t z.

    ``x_T`` overrides the initial noise (drawn from ``key`` otherwise).
    """
    key_x_T, key_z = jax.random.split(key)
    x_T = _initial_noise(key_x_T, shape, x_T)                     # [B, H, W, C]
    batch = x_T.shape[0]

    def step(x_t: jax.Array, t: jax.Array) -> jax.Array:
        t_batch = jnp.full((batch,), t, dtype=jnp.int32)           # [B]
        eps_hat = eps_fn(x_t, t_batch)
        z = jax.random.normal(jax.random.fold_in(key_z, t), x_t.shape, x_t.dtype)
        return p_sample_fn(schedule, eps_hat, x_t, t_batch, z, prediction=prediction, variance=variance,
                           clip_denoised=clip_denoised, p_mean_variance_fn=p_mean_variance_fn)

    timesteps = jnp.arange(schedule.num_timesteps - 1, -1, -1, dtype=jnp.int32)  # T−1, …, 0
    return _run_chain(step, x_T, timesteps, return_trajectory)


def ddim_timesteps(num_train_timesteps: int, num_steps: int) -> np.ndarray:
    """The DDIM subsequence τ, "leading" spacing: [0, k, 2k, …, (S−1)k] reversed, k = T // S.

    Equals diffusers' ``DDIMScheduler.set_timesteps(S).timesteps`` with its defaults
    (timestep_spacing="leading", steps_offset=0).
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}] (num_train_timesteps), got {num_steps}")
    step_ratio = num_train_timesteps // num_steps
    return (np.arange(num_steps) * step_ratio)[::-1].astype(np.int32)  # [S]


def _check_eta(eta: float | jax.Array) -> None:
    try:
        value = float(eta)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError):
        return  # traced under jit: cannot be checked in Python
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0 = DDIM, 1 = DDPM-like), got {value}")


def ddim_sample(
    eps_fn: EpsFn,
    schedule: Schedule,
    shape: Sequence[int],
    key: jax.Array,
    *,
    num_steps: int = 50,
    eta: float | jax.Array = 0.0,
    clip_denoised: bool = True,
    prediction: str = "eps",
    return_trajectory: bool = False,
    x_T: jax.Array | None = None,
    ddim_step_fn: Callable = ddim_step,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """DDIM sampling (Song et al. 2021, Eq. 12) over ``ddim_timesteps(T, num_steps)``.

    Step τ_i → τ_{i−1} = τ_i − T // num_steps; after the last step (τ = 0) ᾱ is 1, like diffusers'
    ``set_alpha_to_one=True``. eta = 0: deterministic DDIM; eta = 1 with num_steps = T: DDPM with σ_t² = β̃_t.
    """
    _check_eta(eta)
    t_seq = ddim_timesteps(schedule.num_timesteps, num_steps)                    # [S] τ_S, …, τ_1 (numpy, static)
    t_prev_seq = t_seq - schedule.num_timesteps // num_steps                     # [S], last entry < 0
    key_x_T, key_z = jax.random.split(key)
    x_T = _initial_noise(key_x_T, shape, x_T)                                    # [B, H, W, C]
    batch = x_T.shape[0]
    eta = jnp.asarray(eta, jnp.float32)

    def step(x_t: jax.Array, ts: tuple[jax.Array, jax.Array]) -> jax.Array:
        t, t_prev = ts
        t_batch = jnp.full((batch,), t, dtype=jnp.int32)                        # [B]
        eps_hat = eps_fn(x_t, t_batch)
        z = jax.random.normal(jax.random.fold_in(key_z, t), x_t.shape, x_t.dtype)
        return ddim_step_fn(schedule, eps_hat, x_t, t_batch, jnp.full((batch,), t_prev, dtype=jnp.int32), z,
                            eta=eta, prediction=prediction, clip_denoised=clip_denoised)

    return _run_chain(step, x_T, (jnp.asarray(t_seq), jnp.asarray(t_prev_seq)), return_trajectory)


SAMPLERS = ("ddim", "ddpm")


def sample(
    eps_fn: EpsFn,
    schedule: Schedule,
    shape: Sequence[int],
    key: jax.Array,
    *,
    sampler: str = "ddim",
    num_steps: int = 50,
    eta: float | jax.Array = 0.0,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = True,
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``sampler`` "ddim" (:func:`ddim_sample` with ``num_steps``, ``eta``) or "ddpm" (:func:`ddpm_sample`,
    all T steps, ``variance``): the one place where a sampler is chosen by name."""
    if sampler == "ddim":
        return ddim_sample(eps_fn, schedule, shape, key, num_steps=num_steps, eta=eta, prediction=prediction,
                           clip_denoised=clip_denoised, return_trajectory=return_trajectory)
    if sampler == "ddpm":
        return ddpm_sample(eps_fn, schedule, shape, key, prediction=prediction, variance=variance,
                           clip_denoised=clip_denoised, return_trajectory=return_trajectory)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
