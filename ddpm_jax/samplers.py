"""Samplers: the reverse chain for any ``eps_fn``, written as the papers say, run by the ONE runner.

- :func:`ddpm_sample`: ancestral sampling, Algorithm 2 of Ho et al. 2020 (T steps of :func:`p_sample`).
- :func:`ddim_sample`: Song et al. 2021, Eq. 12 (:func:`ddim_step`) on a subsequence of the timesteps.
- :func:`sample`: any of :data:`SAMPLERS` by name ("ddpm", "ddim", "pndm", "euler", "euler_ancestral",
  "dpmsolver++", "sde-dpmsolver++", "heun", "unipc"; :data:`SAMPLER_NAMES` adds the Karras-σ variants such as
  "dpmsolver++_karras"), for any model trained with a library :class:`~ddpm_jax.schedules.Schedule`; what the
  CLI, the training sample grids and the pipelines call.

All of them build the scheduler of ``schedulers.py`` from the given Schedule (``schedulers.get_scheduler(name,
schedule=schedule, …)``: exactly its ᾱ's) and run it with ``schedulers.run``: the whole chain as ONE
``lax.scan`` (one compiled program, one trace of the step). "ddpm" with num_steps = T is Algorithm 2; with
fewer steps it is Algorithm 2 on the respaced schedule (Nichol & Dhariwal 2021, ``schedules.respace``).

``eps_fn(x_t, t)`` (``diffusion.EpsFn``) takes x_t [B, H, W, C] and t [B] and returns the model output (ε̂ by
default, see ``prediction``); t is int32, except for the Euler samplers, which call the model at fractional
(float32) timesteps as diffusers does. It may close over parameters. To compile once and reuse, jit the call,
passing what changes as arguments::

    sample = jax.jit(lambda params, key, eta: ddim_sample(
        lambda x, t: unet.apply(params, x, t), schedule, (16, 32, 32, 3), key, num_steps=50, eta=eta))

``eta`` is a traced value (changing it does not retrace); ``num_steps`` and ``shape`` are static
(changing them traces the step once more, not once per step).

Randomness: the library's one noise-key rule (``schedulers.py``): ``key_x_T, key_steps = jax.random.split(key)``;
x_T ~ N(0, I) from ``key_x_T`` and step i (the loop index, 0 … S−1) from ``jax.random.fold_in(key_steps, i)``,
so the samples do not depend on how the chain is compiled.

Return value: x_0 [B, H, W, C]; with ``return_trajectory=True`` :func:`ddpm_sample` and :func:`ddim_sample`
return the pair (x_0, trajectory) where trajectory [S+1, B, H, W, C] holds x_T first, then the sample after
each of the S steps (S = T for DDPM, S = num_steps for DDIM), so ``trajectory[-1] == x_0``; :func:`sample`
returns (x_0, ``schedulers.Trajectory``) whose ``.x`` is that array (plus the model inputs and timesteps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ddpm_jax import schedulers
from ddpm_jax.diffusion import EpsFn, ddim_step, p_mean_variance, p_sample
from ddpm_jax.schedules import Schedule

SAMPLERS = ("ddpm", "ddim", "pndm", "euler", "euler_ancestral", "dpmsolver++", "sde-dpmsolver++", "heun", "unipc")
# every name a sampler may be given: the solvers and their Karras-σ variants ("dpmsolver++_karras": DPM++ 2M Karras)
SAMPLER_NAMES = SAMPLERS + tuple(name for name in schedulers.NAMES if name.endswith(schedulers.KARRAS_SUFFIX))
DEFAULT_NUM_STEPS = 50  # every sampler but "ddpm", whose default is all T steps (Algorithm 2)


def _initial_noise(key: jax.Array, shape: Sequence[int], x_T: jax.Array | None) -> jax.Array:
    if x_T is None:
        return jax.random.normal(key, tuple(shape), jnp.float32)  # x_T ~ N(0, I)
    if tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
    return jnp.asarray(x_T, jnp.float32)


def check_eta(eta: float | jax.Array) -> None:
    """Raises a ValueError unless DDIM's η is in [0, 1]; a traced η (under jit) cannot be checked and passes."""
    try:
        value = float(eta)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError):
        return  # traced under jit: cannot be checked in Python
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0 = DDIM, 1 = DDPM-like), got {value}")


def make_scheduler(
    schedule: Schedule,
    sampler: str = "ddim",
    *,
    eta: float | jax.Array = 0.0,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = True,
    **equation_kwargs: Any,
) -> schedulers.Scheduler:
    """The scheduler for ``sampler`` (one of :data:`SAMPLERS`) on exactly ``schedule``'s ᾱ's, with diffusers'
    defaults for that solver otherwise (DDPM/DDIM/PNDM: "leading" grid, offset 0; Euler, DPM-Solver++: "linspace").

    ``eta`` is DDIM's; ``variance`` DDPM's; ``clip_denoised`` (clip x̂_0 to [−1, 1]) applies to DDPM, DDIM and
    Heun, the solvers that clip in diffusers. ``equation_kwargs`` (``p_sample_fn``, ``p_mean_variance_fn`` for
    "ddpm"; ``ddim_step_fn`` for "ddim") go to the scheduler.
    """
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLER_NAMES)}, got {sampler!r}")
    if sampler == "ddim":
        check_eta(eta)
        equation_kwargs = {**equation_kwargs, "eta": jnp.asarray(eta, jnp.float32)}
    return schedulers.get_scheduler(sampler, schedule=schedule, prediction=prediction, clip_sample=clip_denoised,
                                    variance=variance, **equation_kwargs)


def default_num_steps(schedule: Schedule, sampler: str) -> int:
    """T for "ddpm" (Algorithm 2), :data:`DEFAULT_NUM_STEPS` for the others."""
    return schedule.num_timesteps if sampler == "ddpm" else DEFAULT_NUM_STEPS


def sample(
    eps_fn: EpsFn,
    schedule: Schedule,
    shape: Sequence[int],
    key: jax.Array,
    *,
    sampler: str = "ddim",
    num_steps: int | None = None,
    eta: float | jax.Array = 0.0,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = True,
    return_trajectory: bool = False,
    x_T: jax.Array | None = None,
    **equation_kwargs: Any,
) -> jax.Array | tuple[jax.Array, schedulers.Trajectory]:
    """x_0 [shape] from ``sampler`` (one of :data:`SAMPLERS`, see :func:`make_scheduler`) with ``num_steps``
    grid points (None: :func:`default_num_steps`): the one place where a sampler is chosen by name.

    x_T ~ N(0, I) [shape] from ``key`` (or ``x_T``), then ``schedulers.run`` under the noise-key rule (module
    docstring). With ``return_trajectory`` returns (x_0, ``schedulers.Trajectory``): x [S+1, ...] (x_T first;
    scaled by init_noise_sigma for the Euler samplers), model_input [S, ...], t [S].
    """
    scheduler = make_scheduler(schedule, sampler, eta=eta, prediction=prediction, variance=variance,
                               clip_denoised=clip_denoised, **equation_kwargs)
    num_steps = default_num_steps(schedule, sampler) if num_steps is None else int(num_steps)
    key_x_T, key_steps = jax.random.split(key)
    x_T = _initial_noise(key_x_T, shape, x_T)                                     # [B, H, W, C]
    return schedulers.run(scheduler, eps_fn, x_T, key_steps, num_steps, return_trajectory=return_trajectory)


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
    """Algorithm 2 (Ho et al. 2020)::

        x_T ~ N(0, I)
        for t = T, …, 1:
            z ~ N(0, I) if t > 1, else z = 0
            x_{t−1} = 1/√α_t (x_t − β_t/√(1 − ᾱ_t) ε_θ(x_t, t)) + σ_t z      (p_sample_fn: μ_θ of Eq. 11, σ_t)
        return x_0

    σ_t² = β̃_t (``variance="fixed_small"``) or β_t ("fixed_large"). Runs ``schedulers.DDPMScheduler`` on all T
    steps of ``schedule`` (``sample(sampler="ddpm")``); ``x_T`` overrides the initial noise (drawn from ``key``
    otherwise). ``p_sample_fn``/``p_mean_variance_fn`` swap the step's equations.
    """
    out = sample(eps_fn, schedule, shape, key, sampler="ddpm", num_steps=schedule.num_timesteps,
                 prediction=prediction, variance=variance, clip_denoised=clip_denoised,
                 return_trajectory=return_trajectory, x_T=x_T, p_sample_fn=p_sample_fn,
                 p_mean_variance_fn=p_mean_variance_fn)
    return (out[0], out[1].x) if return_trajectory else out


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
    """DDIM sampling (Song et al. 2021, Eq. 12) over the sub-sequence τ ("leading": τ_i = (i − 1)·T//S)::

        x_{τ_S} ~ N(0, I)
        for i = S, …, 1:
            x̂_0 = (x_{τ_i} − √(1 − ᾱ_{τ_i}) ε̂)/√ᾱ_{τ_i}
            x_{τ_{i−1}} = √ᾱ_{τ_{i−1}} x̂_0 + √(1 − ᾱ_{τ_{i−1}} − σ_i²) ε̂ + σ_i z    (ddim_step_fn; σ_i of Eq. 16)

    Step τ_i → τ_{i−1} = τ_i − T // num_steps; after the last step (τ = 0) ᾱ is 1, like diffusers'
    ``set_alpha_to_one=True``. eta = 0: deterministic DDIM; eta = 1 with num_steps = T: DDPM with σ_t² = β̃_t.
    Runs ``schedulers.DDIMScheduler`` (``sample(sampler="ddim")``).
    """
    out = sample(eps_fn, schedule, shape, key, sampler="ddim", num_steps=num_steps, eta=eta, prediction=prediction,
                 clip_denoised=clip_denoised, return_trajectory=return_trajectory, x_T=x_T, ddim_step_fn=ddim_step_fn)
    return (out[0], out[1].x) if return_trajectory else out
