"""Noise schedules β_t and every quantity derived from them (Ho et al. 2020, Sec. 2 and 4).

Timestep convention (said once, used everywhere in ddpm_jax)
-----------------------------------------------------------
Timesteps are integer array *indices* ``i = 0 .. T-1``. Index ``i`` is the paper's ``t = i + 1``:
``betas[0]`` is β_1, ``alphas_cumprod[0]`` is ᾱ_1 = 1 − β_1, and ``alphas_cumprod[T-1]`` is ᾱ_T.
This is the convention of the original DDPM code and of diffusers. Consequently the paper's
"if t = 1 (no noise)" in Algorithm 2 is ``t == 0`` here, and ``alphas_cumprod_prev[0]`` is ᾱ_0 = 1.

All arrays are computed in float64 NumPy (so that the cumulative product over 1000 steps loses no
precision) and stored as float32 JAX arrays of shape [T] in an immutable pytree, :class:`Schedule`.

Schedules
---------
- ``"linear"``: β_t linear from 1e-4 to 0.02 (Ho et al. 2020, Sec. 4). These endpoints are given for
  T = 1000; for another T both are multiplied by 1000 / T, as in improved DDPM (Nichol & Dhariwal
  2021, ``get_named_beta_schedule``), so that ᾱ_T stays about the same. T = 1000 gives exactly the paper's
  values (and diffusers' ``"linear"``). T must be > 20 so that β_T < 1.
- ``"cosine"``: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T + s)/(1 + s)) · π/2), s = 0.008, and
  β_t = min(1 − ᾱ(t)/ᾱ(t−1), max_beta = 0.999) (Nichol & Dhariwal 2021, Eq. 17; diffusers' ``"squaredcos_cap_v2"``).
- ``"scaled_linear"``: √β_t linear from √0.00085 to √0.012 (Stable Diffusion / LDM; not rescaled with T).

Out-of-range timesteps
----------------------
JAX indexing never raises: an out-of-range index is silently clamped (and a negative one wraps). So
:func:`extract` calls :func:`check_timesteps`, which raises a one-line ``ValueError`` when the timesteps
are *concrete* (eager calls, tests, notebooks). Inside ``jax.jit``/``lax.scan`` the timesteps are traced
values that Python cannot inspect, so no error can be raised there; instead :func:`extract` returns NaN
for an out-of-range timestep, which propagates to the output and cannot go unnoticed. (The samplers
build their timesteps themselves, so they are always in range.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

SCHEDULE_NAMES = ("linear", "cosine", "scaled_linear")


@struct.dataclass
class Schedule:
    """All per-timestep constants of the forward process, each a float32 array of shape [T]."""

    betas: jax.Array                           # β_t
    alphas: jax.Array                          # α_t = 1 − β_t
    alphas_cumprod: jax.Array                  # ᾱ_t = Π_{s≤t} α_s
    alphas_cumprod_prev: jax.Array             # ᾱ_{t−1}, with ᾱ_0 = 1
    sqrt_alphas_cumprod: jax.Array             # √ᾱ_t
    sqrt_one_minus_alphas_cumprod: jax.Array   # √(1 − ᾱ_t)
    log_one_minus_alphas_cumprod: jax.Array    # log(1 − ᾱ_t)
    sqrt_recip_alphas_cumprod: jax.Array       # 1/√ᾱ_t
    sqrt_recipm1_alphas_cumprod: jax.Array     # √(1/ᾱ_t − 1)
    posterior_variance: jax.Array              # β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) β_t   (Eq. 7)
    posterior_log_variance_clipped: jax.Array  # log β̃_t, with β̃_1 (= 0) replaced by β̃_2
    posterior_mean_coef1: jax.Array            # √ᾱ_{t−1} β_t/(1 − ᾱ_t)              (Eq. 7, x0)
    posterior_mean_coef2: jax.Array            # √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t)        (Eq. 7, x_t)

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps (static, also under jit)."""
        return self.betas.shape[0]


# ------------------------------------------------------------------------------------------------
# β_t schedules, float64 NumPy
# ------------------------------------------------------------------------------------------------

def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al. 2020, Sec. 4: β_1 = 1e-4 … β_T = 0.02 for T = 1000, both scaled by 1000/T."""
    scale = 1000.0 / num_timesteps
    betas = np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)
    if betas[-1] >= 1.0:
        raise ValueError(
            f"linear schedule with num_timesteps={num_timesteps} gives beta_T = {betas[-1]:.3g} >= 1 "
            f"(betas are scaled by 1000/T); use num_timesteps > {math.ceil(1000 * beta_end)} or a smaller beta_end"
        )
    return betas


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021, Eq. 17: ᾱ(t) = cos²(((t/T + s)/(1 + s)) π/2), β_t = min(1 − ᾱ_t/ᾱ_{t−1}, max_beta)."""
    def f(u: np.ndarray) -> np.ndarray:
        return np.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps  # t/T for t = 0..T
    return np.minimum(1.0 - f(u[1:]) / f(u[:-1]), max_beta)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    """Stable Diffusion (LDM): √β_t linear from √beta_start to √beta_end."""
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


# name -> function(num_timesteps, **kw) returning β_1..β_T as float64 NumPy
BETA_FUNCTIONS = {"linear": linear_betas, "cosine": cosine_betas, "scaled_linear": scaled_linear_betas}


# ------------------------------------------------------------------------------------------------
# Schedule
# ------------------------------------------------------------------------------------------------

def schedule_from_betas(betas: Sequence[float] | np.ndarray) -> Schedule:
    """Derive every quantity of :class:`Schedule` from β_1..β_T, in float64, then cast to float32."""
    betas = np.asarray(betas, dtype=np.float64)  # [T]
    if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
        raise ValueError("betas must be a 1-D array with every value in (0, 1)")
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # β̃_1 = 0, so its log is clipped to log β̃_2 (as in the original code; it is only used at t = 0,
    # where no noise is added). A one-step schedule (a respaced 1-step grid) has no β̃_2: β_1 stands in.
    first = posterior_variance[1] if len(betas) > 1 else betas[0]
    posterior_log_variance_clipped = np.log(np.append(first, posterior_variance[1:]))
    arrays = dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    )
    return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in arrays.items()})


def respace(alphas_cumprod: Sequence[float] | np.ndarray, timesteps: Sequence[int] | np.ndarray) -> Schedule:
    """The schedule of the chain that visits only ``timesteps`` (Nichol & Dhariwal 2021, Sec. 4: "improving
    sampling speed"): with the kept timesteps τ_1 < … < τ_S (indices into ᾱ [T]),

        ᾱ'_i = ᾱ_{τ_i},   β'_i = 1 − ᾱ_{τ_i}/ᾱ_{τ_{i−1}}   (ᾱ_{τ_0} = 1),

    so index i of the result is the original timestep τ_i, and every quantity of :class:`Schedule` (β̃', the
    Eq. 7 coefficients, …) follows from β' as usual. Computed in float64 from the given ᾱ's (pass a
    Schedule's ``alphas_cumprod`` to use exactly the ᾱ's a model was trained with). ``timesteps`` may come in
    any order (diffusers' grids are descending); they must be distinct indices in [0, T−1].
    """
    alphas_cumprod = np.asarray(alphas_cumprod, np.float64)                      # [T]
    tau = np.unique(np.asarray(timesteps, np.int64))                             # [S] ascending
    T = alphas_cumprod.shape[0]
    if tau.size != np.asarray(timesteps).size or tau.size == 0 or tau[0] < 0 or tau[-1] >= T:
        raise ValueError(f"respace needs distinct timesteps in [0, {T - 1}], got {np.asarray(timesteps).tolist()}")
    kept = alphas_cumprod[tau]                                                   # ᾱ_{τ_i}  [S]
    return schedule_from_betas(1.0 - kept / np.append(1.0, kept[:-1]))           # β'_i     [S]


def get_schedule(name: str, num_timesteps: int = 1000, **kw: Any) -> Schedule:
    """The named schedule with T = ``num_timesteps`` steps.

    ``kw`` goes to the β function: ``beta_start``/``beta_end`` for "linear" and "scaled_linear",
    ``s``/``max_beta`` for "cosine".
    """
    if name not in BETA_FUNCTIONS:
        raise ValueError(f"unknown schedule {name!r}; valid choices: {', '.join(SCHEDULE_NAMES)}")
    if int(num_timesteps) < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    return schedule_from_betas(BETA_FUNCTIONS[name](int(num_timesteps), **kw))


# ------------------------------------------------------------------------------------------------
# Indexing helpers
# ------------------------------------------------------------------------------------------------

def check_timesteps(t: Any, num_timesteps: int) -> None:
    """Raise ValueError if concrete timesteps ``t`` are not integers in [0, T−1]; no-op for traced ``t``."""
    try:
        t_np = np.asarray(t)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # traced inside jit/scan: cannot be inspected (see the module docstring)
    if not np.issubdtype(t_np.dtype, np.integer):
        raise ValueError(f"timesteps must be integer indices 0..{num_timesteps - 1}, got dtype {t_np.dtype}")
    if t_np.size and (t_np.min() < 0 or t_np.max() >= num_timesteps):
        raise ValueError(
            f"timesteps must be in [0, {num_timesteps - 1}] (index i is the paper's t = i+1), "
            f"got values in [{t_np.min()}, {t_np.max()}]"
        )


def extract(a: jax.Array, t: jax.Array | int, x_shape: Sequence[int]) -> jax.Array:
    """a[t] reshaped to broadcast against x: [B] -> [B, 1, 1, 1] for x of shape [B, H, W, C].

    ``t`` is an int array [B] (one timestep per example) or a scalar (the same for all).
    """
    num_timesteps = a.shape[0]
    check_timesteps(t, num_timesteps)
    t = jnp.asarray(t)
    in_range = (t >= 0) & (t < num_timesteps)
    out = jnp.where(in_range, a[jnp.clip(t, 0, num_timesteps - 1)], jnp.nan)  # [B] or []; NaN if traced t is out of range
    return out.reshape((-1,) + (1,) * (len(x_shape) - 1))  # [B, 1, 1, 1] (or [1, 1, 1, 1])
