"""Stable Diffusion's "schedulers": step rules of numerical solvers for the reverse process, as diffusers has them.

A *scheduler*, in diffusers' vocabulary, is not a noise schedule (that is ``schedules.py``) but a solver: a rule
that takes the sample x at one point of a short grid of timesteps, the model's output there, and returns the
sample at the next grid point. Each class below reproduces one diffusers scheduler, numbers included, as pure
JAX, so that a whole sampling run is one ``lax.scan`` (one compiled program, :func:`run`). This is the ONE
sampling vocabulary of the library: ``samplers.py`` (Algorithm 2, DDIM, ``samplers.sample``) and Stable
Diffusion both run these schedulers with :func:`run`.

- :class:`DDPMScheduler` — Ho, Jain & Abbeel 2020, Algorithm 2 (the library's :func:`~ddpm_jax.diffusion.p_sample`).
  With fewer steps than T, Algorithm 2 on the *respaced* schedule of Nichol & Dhariwal 2021 (Sec. 4,
  :func:`~ddpm_jax.schedules.respace`): β'_i = 1 − ᾱ_{τ_i}/ᾱ_{τ_{i−1}}. diffusers' ``DDPMScheduler``.
- :class:`DDIMScheduler` — Song, Meng & Ermon 2021, *Denoising Diffusion Implicit Models*, Eq. 12 (the
  library's :func:`~ddpm_jax.diffusion.ddim_step`). diffusers' ``DDIMScheduler``.
- :class:`PNDMScheduler` — Liu, Ren, Lin & Zhao 2022, *Pseudo Numerical Methods for Diffusion Models on
  Manifolds* (PNDM): the pseudo linear multistep method (PLMS, Eq. 12 and Algorithm 2, with the transfer φ of
  Eq. 9), as Stable Diffusion runs it (``skip_prk_steps=True``: no Runge–Kutta warm-up). diffusers'
  ``PNDMScheduler``.
- :class:`EulerScheduler` — Karras, Aittala, Aila & Laine 2022, *Elucidating the Design Space of
  Diffusion-Based Generative Models* (EDM), Algorithm 2 without its second-order correction (S_churn = 0 by
  default: Euler on the probability-flow ODE). diffusers' ``EulerDiscreteScheduler``.
- :class:`EulerAncestralScheduler` — Euler on the ODE down to σ_down, then fresh noise σ_up: the "ancestral"
  step of k-diffusion (Crowson), used with EDM's σ-parameterisation. diffusers'
  ``EulerAncestralDiscreteScheduler``.
- :class:`DPMSolverMultistepScheduler` — Lu, Zhou, Bao, Chen, Li & Zhu 2022, *DPM-Solver++: Fast Solver for
  Guided Sampling of Diffusion Probabilistic Models*, Algorithm 2 (multistep second order, "2M", data
  prediction), and its SDE form ("DPM++ 2M SDE", ``algorithm_type="sde-dpmsolver++"``). diffusers'
  ``DPMSolverMultistepScheduler``.
- :class:`HeunScheduler` — EDM Algorithm 2 with its second-order (Heun) correction, S_churn = 0: two model calls
  per step. diffusers' ``HeunDiscreteScheduler``.
- :class:`UniPCMultistepScheduler` — Zhao, Bai, Rao, Zhou & Lu 2023, *UniPC: A Unified Predictor-Corrector
  Framework for Fast Sampling of Diffusion Models* (UniP-2 predictor, UniC corrector, B(h) "bh2"/"bh1").
  diffusers' ``UniPCMultistepScheduler``.
- Karras σ's (EDM Eq. 5, ``use_karras_sigmas``; :func:`karras_sigmas`) for Euler, DPM-Solver++ (both forms),
  Heun and UniPC, as diffusers ("DPM++ 2M Karras").

Conventions
-----------
- **The protocol.** Every scheduler is a frozen dataclass with ``name``, ``order`` (grid points per step: 2 for
  Heun, 1 for the others, diffusers' ``scheduler.order``), ``config``, ``set_timesteps(N)``,
  ``init_state(N, sample, start=0)``, ``scale_model_input(state, x, i)``, a pure ``step(state, model_output, i, x, key)
  -> (x, state)`` and ``add_noise(state, x_0, noise, i)`` (x at grid point i from a clean x_0: img2img/SDEdit).
  Equation-swap arguments are dataclass fields with the library's defaults: ``DDPMScheduler(p_sample_fn=
  diffusion.p_sample, p_mean_variance_fn=diffusion.p_mean_variance)``, ``DDIMScheduler(ddim_step_fn=
  diffusion.ddim_step, eta=0.0)``.
- **One step per grid point.** ``i = 0 … N−1`` is the loop index; ``state.timesteps[i]`` is what the model is
  called with at step i (diffusers' ``scheduler.timesteps``; int32 for DDIM/PNDM/DPM-Solver, float32 for the
  Euler schedulers and Heun, whose "linspace" and Karras timesteps are fractional). N is ``num_steps``, except
  PNDM, which calls the model ``num_steps + 1`` times (PLMS's second step re-evaluates, as in diffusers), and
  Heun, ``2·num_steps − 1`` times (diffusers' interleaved grid: each step but the last is two grid points).
- **σ-space.** The Euler schedulers integrate x̃ = x/√ᾱ, the variance-exploding form x̃ = x̃_0 + σ ε with
  σ_t = √((1 − ᾱ_t)/ᾱ_t) (EDM Sec. 2). So the starting noise is ``init_noise_sigma`` · N(0, I) instead of
  N(0, I), and the model, trained on x_t = x̃/√(1 + σ²), gets ``scale_model_input(x̃) = x̃/√(σ² + 1)``.
  Every scheduler has both (identity / 1 for the others), and :func:`run` calls them as diffusers'
  pipelines do.
- **A run may begin mid-grid** (img2img / SDEdit, inpainting, the SDXL refiner): ``init_state(N, sample, start)``
  is the state of a run whose first step is grid point ``start``, as diffusers' ``set_begin_index(start)`` on a
  fresh scheduler. A one-step method ignores it; a multistep one begins its history and its lower-order start
  there (PNDM's PLMS warm-up counts from ``start``; DPM-Solver++'s first step at ``start`` is first order; UniPC's
  history and order warm-up count the steps taken, state ``num_steps_taken``), so the step index ``i`` always stays
  the grid index. Heun starts at even grid points (diffusers' begin index t_start · order, order 2).
- **Pure steps.** ``state = scheduler.init_state(num_steps, sample)`` holds the grid (timesteps, σ's, per-step
  coefficients, computed in float64 NumPy and stored as float32) and, for the multistep methods, the history
  (PNDM's last three ε̂, DPM-Solver's last x̂_0, UniPC's last two x̂_0 and x, Heun's half-step).
  ``scheduler.step(state, model_output, i, sample, key)`` returns ``(prev_sample, new_state)`` with no Python
  side effects, so it can be scanned over ``i``. ``key`` is only used by the stochastic steps (Euler-ancestral,
  DPM-Solver++ SDE, Euler with churn, DDIM with η > 0).
- **Configs.** Each scheduler has a frozen config dataclass with diffusers' defaults *for that class*, built from
  a diffusers ``scheduler_config.json`` by ``from_config(dict | path)``. As in diffusers, keys the class does
  not have are ignored, so Stable Diffusion's PNDM config builds any of the five. A diffusers option this module
  does not implement is accepted only at its default value; anything else is a one-line error.
- **Registry.** :func:`get_scheduler` takes a short name (:data:`NAMES`: "ddim", "pndm", "euler",
  "euler_ancestral", "dpmsolver++", "sde-dpmsolver++", "heun", "unipc", "ddpm", and "<name>_karras" for the
  schedulers with Karras σ's) or a diffusers ``_class_name`` (DPMSolverMultistepScheduler's config then picks the
  ODE or the SDE by its ``algorithm_type``).
- **A model trained with the library's own schedule** (``ddpm-jax train``, ``schedules.get_schedule``): pass
  the :class:`~ddpm_jax.schedules.Schedule` itself, ``get_scheduler(name, schedule=schedule, prediction="eps",
  clip_sample=True, variance="fixed_small", **scheduler_fields)`` (or ``SomeConfig.from_schedule(schedule,
  **config_fields)``). The config then carries that Schedule in ``trained_schedule`` (the analogue of
  diffusers' ``trained_betas``) and every scheduler uses exactly its ᾱ's (the float32 values the model was
  trained with, widened to float64 for σ's and coefficients) instead of recomputing β's from the config.
  ``prediction`` ("eps", "x0", "v"), ``clip_sample`` and ``variance`` ("fixed_small", "fixed_large") are set
  on the configs that have them (prediction: all; clip_sample: DDPM, DDIM; variance: DDPM) and ignored by the
  others, as diffusers ignores config keys a class does not have.
- **The runner.** :func:`run` is the ONE ``lax.scan`` over a scheduler's grid (start index, host progress
  callback, trajectory). With ``return_trajectory`` it also returns a :class:`Trajectory`: ``x`` [S+1, B, ...]
  (the sample at the start grid point, then after each of the S steps, so ``x[-1]`` is the result),
  ``model_input`` [S, B, ...] (``scale_model_input(x_i)``, what the model saw at step i) and ``t`` [S] (the
  model's timestep at step i).
- **The noise-key rule (one for the whole library).** A sampling run's ``key`` is split once,
  ``key_x_T, key_steps = jax.random.split(key)``: x_T ~ N(0, I) is drawn from ``key_x_T``, and step i (the
  loop index on the grid, 0 … N−1; also when a run starts mid-grid) draws its noise from
  ``jax.random.fold_in(key_steps, i)``. :func:`run` takes ``key_steps``; ``samplers.sample`` and Stable
  Diffusion's txt2img/img2img do the split. So the noise depends only on the key, not on compilation or
  devices. ``key`` may also be per-example keys [B] (typed keys, one per example): then example b's noise comes
  from its own key alone (:func:`step_key`), so its result does not depend on the batch it is sampled in —
  Stable Diffusion's per-image seeds (``pipelines/stable_diffusion.image_keys``).

Usage::

    scheduler = get_scheduler("dpmsolver++", "path/to/stable-diffusion/scheduler")  # or a dict, or None
    key_x_T, key_steps = jax.random.split(key)
    sample = jax.jit(lambda params, x_T, key_steps: run(
        scheduler, lambda x, t: unet.apply(params, x, t), x_T, key_steps, 25))

Matching diffusers also means matching its quirks, which are noted where they occur (DDIM's and PNDM's step
size T // N whatever the spacing; Euler's init_noise_sigma for "leading"; the churn noise being added after the
model call). Tests: ``tests/test_schedulers.py`` (each step against diffusers' own step code, the grids, the
whole loop, compilation).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ddpm_jax.diffusion import (VARIANCES, EpsFn, ddim_step, p_mean_variance, p_sample, predict_x0_and_eps,
                                q_sample)
from ddpm_jax.schedules import Schedule, cosine_betas, respace, schedule_from_betas, scaled_linear_betas

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# diffusers' prediction_type -> ours (diffusion.PREDICTIONS)
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# diffusers' DDPM variance_type -> ours (diffusion.VARIANCES); "fixed_small_log" is the same σ² = β̃_t
VARIANCE_TYPES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}


def _check_choice(owner: str, what: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: unknown {what} {value!r}; valid choices: {', '.join(map(repr, choices))}")


# ================================================================================================
# Configs (diffusers' scheduler_config.json)
# ================================================================================================

def read_scheduler_config(path: str | Path) -> dict[str, Any]:
    """A diffusers ``scheduler_config.json``, given as the file or as the folder that holds it."""
    path = Path(path)
    file = path / "scheduler_config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no scheduler config at {file}; pass a scheduler_config.json or its folder")
    return json.loads(file.read_text())


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The fields every scheduler shares; defaults are diffusers' (β linear 1e-4 → 0.02, T = 1000).

    Subclasses re-declare a field to change its default, as diffusers' classes differ (e.g. "leading" for
    DDIM/PNDM, "linspace" for Euler and DPM-Solver).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    # the library's own Schedule (``from_schedule``): its ᾱ's replace the β fields above (not compared: arrays)
    trained_schedule: Schedule | None = dataclasses.field(default=None, compare=False, repr=False)
    # the diffusers config's keys this class does not use (e.g. a PNDM config's ``clip_sample``), kept, as
    # diffusers keeps them, for another scheduler configured from this one (``get_scheduler("ddim", pndm.config)``)
    hidden: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    # diffusers options of this class that are implemented only at the value given here
    _UNSUPPORTED: ClassVar[dict[str, Any]] = {"rescale_betas_zero_snr": False}
    _PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "sample", "v_prediction")

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_choice(name, "beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice(name, "timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice(name, "prediction_type", self.prediction_type, self._PREDICTION_TYPES)
        if int(self.num_train_timesteps) < 2:
            raise ValueError(f"{name}: num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ValueError(f"{name}: trained_betas has {len(self.trained_betas)} values, "
                             f"num_train_timesteps is {self.num_train_timesteps}")
        if self.trained_schedule is not None and self.trained_schedule.num_timesteps != self.num_train_timesteps:
            raise ValueError(f"{name}: trained_schedule has T = {self.trained_schedule.num_timesteps}, "
                             f"num_train_timesteps is {self.num_train_timesteps}")

    @classmethod
    def from_schedule(cls, schedule: Schedule, **fields: Any) -> SchedulerConfig:
        """This class's config for a model trained with the library's ``schedule`` (``schedules.get_schedule``):
        T = ``schedule.num_timesteps`` and exactly its ᾱ's; ``fields`` set the other options (e.g.
        ``prediction_type="v_prediction"``, ``timestep_spacing="trailing"``)."""
        return cls(**{**fields, "num_train_timesteps": schedule.num_timesteps, "trained_schedule": schedule})

    def fields(self) -> dict[str, Any]:
        """The config's fields as a dict (shallow: ``trained_schedule`` stays a Schedule)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | Path) -> SchedulerConfig:
        """From a diffusers scheduler config (a dict, a ``scheduler_config.json`` or its folder).

        Keys this class does not have are ignored (as diffusers does); an option it does not implement must
        be at its default value.
        """
        if isinstance(config, (str, Path)):
            config = read_scheduler_config(config)
        for key, supported in cls._UNSUPPORTED.items():
            if key in config and config[key] != supported:
                raise ValueError(f"{cls.__name__}: {key}={config[key]!r} is not implemented in ddpm_jax "
                                 f"(only {supported!r}); remove it from the scheduler config")
        names = {f.name for f in dataclasses.fields(cls)} - {"hidden"}
        kwargs = {k: v for k, v in config.items() if k in names}
        hidden = {k: v for k, v in config.items() if k not in names and k != "hidden" and not k.startswith("_")}
        if kwargs.get("trained_betas") is not None:
            kwargs["trained_betas"] = tuple(float(b) for b in kwargs["trained_betas"])
        return cls(**kwargs, hidden=hidden)

    def betas(self) -> np.ndarray:
        """β_1..β_T in float64. diffusers' "linear" is linspace(beta_start, beta_end, T) with no 1000/T
        rescaling (so not ``schedules.linear_betas``); "squaredcos_cap_v2" is ``schedules.cosine_betas``."""
        T = int(self.num_train_timesteps)
        if self.trained_schedule is not None:
            return np.asarray(self.trained_schedule.betas, np.float64)
        if self.trained_betas is not None:
            return np.asarray(self.trained_betas, np.float64)
        if self.beta_schedule == "linear":
            return np.linspace(self.beta_start, self.beta_end, T, dtype=np.float64)
        if self.beta_schedule == "scaled_linear":
            return scaled_linear_betas(T, self.beta_start, self.beta_end)
        return cosine_betas(T)

    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_t = Π (1 − β_s), float64 [T]; the trained schedule's own ᾱ's if there is one."""
        if self.trained_schedule is not None:
            return np.asarray(self.trained_schedule.alphas_cumprod, np.float64)
        return np.cumprod(1.0 - self.betas())

    def schedule(self) -> Schedule:
        """The library's :class:`~ddpm_jax.schedules.Schedule` for these β's (``trained_schedule`` itself if set)."""
        if self.trained_schedule is not None:
            return self.trained_schedule
        return schedule_from_betas(self.betas())

    @property
    def prediction(self) -> str:
        """prediction_type in the library's words ("eps", "x0", "v")."""
        return PREDICTION_TYPES[self.prediction_type]


@dataclasses.dataclass(frozen=True)
class DDIMConfig(SchedulerConfig):
    """diffusers ``DDIMScheduler`` config."""

    clip_sample: bool = True
    set_alpha_to_one: bool = True

    _UNSUPPORTED: ClassVar[dict[str, Any]] = {"rescale_betas_zero_snr": False, "thresholding": False,
                                              "clip_sample_range": 1.0}


@dataclasses.dataclass(frozen=True)
class DDPMConfig(SchedulerConfig):
    """diffusers ``DDPMScheduler`` config (fixed variances only: no learned variances, no thresholding)."""

    variance_type: str = "fixed_small"
    clip_sample: bool = True

    _UNSUPPORTED: ClassVar[dict[str, Any]] = {"rescale_betas_zero_snr": False, "thresholding": False,
                                              "clip_sample_range": 1.0}

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice(type(self).__name__, "variance_type", self.variance_type, tuple(VARIANCE_TYPES))

    @property
    def variance(self) -> str:
        """variance_type in the library's words ("fixed_small", "fixed_large")."""
        return VARIANCE_TYPES[self.variance_type]


@dataclasses.dataclass(frozen=True)
class PNDMConfig(SchedulerConfig):
    """diffusers ``PNDMScheduler`` config. Only the PLMS variant (``skip_prk_steps=True``) is implemented."""

    skip_prk_steps: bool = True
    set_alpha_to_one: bool = False

    _UNSUPPORTED: ClassVar[dict[str, Any]] = {"skip_prk_steps": True}
    _PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.skip_prk_steps:
            raise ValueError("PNDMConfig: skip_prk_steps=False (Runge-Kutta warm-up) is not implemented; "
                             "use skip_prk_steps=True as Stable Diffusion does")


@dataclasses.dataclass(frozen=True)
class EulerConfig(SchedulerConfig):
    """diffusers ``EulerDiscreteScheduler`` config."""

    timestep_spacing: str = "linspace"
    final_sigmas_type: str = "zero"
    use_karras_sigmas: bool = False

    _UNSUPPORTED: ClassVar[dict[str, Any]] = {
        "rescale_betas_zero_snr": False, "interpolation_type": "linear", "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "timestep_type": "discrete", "sigma_min": None, "sigma_max": None}

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice(type(self).__name__, "final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))


@dataclasses.dataclass(frozen=True)
class EulerAncestralConfig(SchedulerConfig):
    """diffusers ``EulerAncestralDiscreteScheduler`` config."""

    timestep_spacing: str = "linspace"

    _PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")


@dataclasses.dataclass(frozen=True)
class DPMSolverConfig(SchedulerConfig):
    """diffusers ``DPMSolverMultistepScheduler`` config (algorithm_type "dpmsolver++" or "sde-dpmsolver++",
    orders 1 and 2)."""

    timestep_spacing: str = "linspace"
    algorithm_type: str = "dpmsolver++"
    solver_order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: str = "zero"
    use_karras_sigmas: bool = False

    _UNSUPPORTED: ClassVar[dict[str, Any]] = {
        "rescale_betas_zero_snr": False, "thresholding": False, "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False, "use_dynamic_shifting": False,
        "lambda_min_clipped": -math.inf, "variance_type": None}

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        _check_choice(name, "algorithm_type", self.algorithm_type, ("dpmsolver++", "sde-dpmsolver++"))
        _check_choice(name, "solver_order", self.solver_order, (1, 2))
        _check_choice(name, "solver_type", self.solver_type, ("midpoint", "heun"))
        _check_choice(name, "final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))


@dataclasses.dataclass(frozen=True)
class HeunConfig(SchedulerConfig):
    """diffusers ``HeunDiscreteScheduler`` config (its own β defaults: 0.00085 → 0.012, "linear")."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    timestep_spacing: str = "linspace"
    use_karras_sigmas: bool = False
    clip_sample: bool = False

    _UNSUPPORTED: ClassVar[dict[str, Any]] = {"use_exponential_sigmas": False, "use_beta_sigmas": False,
                                              "clip_sample_range": 1.0}


@dataclasses.dataclass(frozen=True)
class UniPCConfig(SchedulerConfig):
    """diffusers ``UniPCMultistepScheduler`` config (data prediction, orders 1 and 2, B(h) "bh1" or "bh2")."""

    timestep_spacing: str = "linspace"
    solver_order: int = 2
    solver_type: str = "bh2"
    lower_order_final: bool = True
    final_sigmas_type: str = "zero"
    use_karras_sigmas: bool = False

    _UNSUPPORTED: ClassVar[dict[str, Any]] = {
        "rescale_betas_zero_snr": False, "thresholding": False, "predict_x0": True, "disable_corrector": [],
        "solver_p": None, "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_flow_sigmas": False,
        "use_dynamic_shifting": False, "sigma_min": None, "sigma_max": None, "shift_terminal": None}

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        _check_choice(name, "solver_order", self.solver_order, (1, 2))
        _check_choice(name, "solver_type", self.solver_type, ("bh1", "bh2"))
        _check_choice(name, "final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))


# ================================================================================================
# Timestep grids (diffusers' set_timesteps)
# ================================================================================================

def spaced_timesteps(num_train_timesteps: int, num_steps: int, spacing: str, steps_offset: int = 0,
                     *, round_linspace: bool = True) -> np.ndarray:
    """The N timesteps of diffusers' ``set_timesteps``, descending, float64 [N] (Lin et al. 2024, Table 2):

    - "leading":  k·(T // N) for k = N−1 … 0, plus ``steps_offset`` (Stable Diffusion: offset 1, so 981 … 1);
    - "trailing": round(T − k·T/N) − 1 for k = 0 … N−1 (starts at T − 1);
    - "linspace": linspace(0, T − 1, N) reversed, rounded unless ``round_linspace=False`` (Euler keeps fractions).

    Written with the same NumPy expressions as diffusers, so that rounding ties fall the same way.
    """
    T, N = int(num_train_timesteps), int(num_steps)
    if not 1 <= N <= T:
        raise ValueError(f"num_steps must be in [1, {T}] (num_train_timesteps), got {num_steps}")
    if spacing == "linspace":
        t = np.linspace(0, T - 1, N)
        t = (t.round() if round_linspace else t)[::-1]
    elif spacing == "leading":
        t = (np.arange(0, N) * (T // N)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / N)) - 1
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; valid choices: {', '.join(TIMESTEP_SPACINGS)}")
    _check_last_timestep(t, T, N, steps_offset)
    return np.ascontiguousarray(t, dtype=np.float64)


def _check_last_timestep(t: np.ndarray, T: int, N: int, steps_offset: int) -> None:
    if t.max() > T - 1:
        raise ValueError(f"num_steps={N} with steps_offset={steps_offset} gives timestep {int(t.max())} "
                         f">= num_train_timesteps={T}; use fewer steps or steps_offset=0")


def sigma_table(config: SchedulerConfig) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) for t = 0 … T−1, float64 [T] (EDM Sec. 2: x̃ = x/√ᾱ = x̃_0 + σ ε)."""
    alphas_cumprod = config.alphas_cumprod()
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def _sigmas_at(config: SchedulerConfig, timesteps: np.ndarray, final_sigmas_type: str = "zero") -> np.ndarray:
    """σ(t) = √((1 − ᾱ_t)/ᾱ_t) linearly interpolated at (possibly fractional) ``timesteps``, then the final σ
    (0, or σ_1 for "sigma_min"): float64 [N + 1], as diffusers' Euler and DPM-Solver ``set_timesteps``."""
    sigmas = sigma_table(config)                               # [T]
    last = sigmas[0] if final_sigmas_type == "sigma_min" else 0.0
    return np.append(np.interp(timesteps, np.arange(len(sigmas)), sigmas), last)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM), Eq. 5: the N noise levels, descending, float64 [N],

        σ_i = (σ_max^{1/ρ} + i/(N − 1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ,  i = 0 … N−1,  ρ = 7,

    which spends more steps at small σ than a uniform t grid (diffusers' ``_convert_to_karras``)."""
    ramp = np.linspace(0, 1, int(num_steps))
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sigma_to_t(config: SchedulerConfig, sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) timesteps t with σ(t) = ``sigmas``: log σ interpolated linearly between the two integer
    timesteps around it, clipped to [0, T − 1] (diffusers' ``_sigma_to_t``). float64 [N]."""
    log_table = np.log(sigma_table(config))                                          # [T], increasing
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))              # [N]
    low = np.cumsum(log_sigma[None] - log_table[:, None] >= 0, axis=0).argmax(axis=0).clip(max=len(log_table) - 2)
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def karras_grid(config: SchedulerConfig, sigma_min: float, sigma_max: float, num_steps: int,
                round_timesteps: bool) -> tuple[np.ndarray, np.ndarray]:
    """``use_karras_sigmas``: (timesteps [N], σ's [N]) with σ's from :func:`karras_sigmas` and the model's
    timesteps from :func:`sigma_to_t` (rounded for the multistep solvers, whose timesteps are integers)."""
    sigmas = karras_sigmas(sigma_min, sigma_max, num_steps)
    t = sigma_to_t(config, sigmas)
    return (t.round() if round_timesteps else t), sigmas


def multistep_timesteps(config: SchedulerConfig, num_steps: int) -> np.ndarray:
    """The N integer timesteps of diffusers' DPM-Solver and UniPC ``set_timesteps`` (without Karras σ's), int64:
    "linspace" and "leading" divide the range into N + 1 parts and drop the last point (t = 0)."""
    T, N = config.num_train_timesteps, int(num_steps)
    if not 1 <= N <= T:
        raise ValueError(f"num_steps must be in [1, {T}] (num_train_timesteps), got {num_steps}")
    if config.timestep_spacing == "linspace":
        t = np.linspace(0, T - 1, N + 1).round()[::-1][:-1]
    elif config.timestep_spacing == "leading":
        t = (np.arange(0, N + 1) * (T // (N + 1))).round()[::-1][:-1] + config.steps_offset
    else:
        t = spaced_timesteps(T, N, "trailing")
    _check_last_timestep(t, T, N, config.steps_offset)  # diffusers would reuse σ_{T−1} and divide by h = 0
    return t.astype(np.int64)


def multistep_sigma_grid(config: DPMSolverConfig | UniPCConfig, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """DPM-Solver's and UniPC's grid: (timesteps int64 [N], σ's float64 [N + 1]). σ(t) at the timesteps, or with
    ``use_karras_sigmas`` Karras σ's between σ_0 and σ_{T−1} of the whole table (timesteps rounded, except
    DPM-Solver on the cosine schedule, as diffusers); then the final σ (0, or for "sigma_min" σ_0, UniPC's
    Karras grid its last σ)."""
    t = multistep_timesteps(config, num_steps)
    sigmas = _sigmas_at(config, t, config.final_sigmas_type)                          # [N+1]
    if config.use_karras_sigmas:
        table = sigma_table(config)
        rounded = isinstance(config, UniPCConfig) or config.beta_schedule != "squaredcos_cap_v2"
        t_float, karras = karras_grid(config, table[0], table[-1], len(t), rounded)
        # UniPC's "sigma_min" is the last Karras σ (σ_max when N = 1), DPM-Solver's σ_0 (diffusers)
        last = karras[-1] if isinstance(config, UniPCConfig) and config.final_sigmas_type == "sigma_min" else sigmas[-1]
        t, sigmas = t_float.astype(np.int64), np.append(karras, last)
    return t, sigmas


def euler_sigma_grid(config: EulerConfig | HeunConfig, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Euler's and Heun's grid: (timesteps float64 [N], σ's float64 [N + 1]). σ(t) at the spaced (fractional)
    timesteps, or with ``use_karras_sigmas`` Karras σ's between that grid's first and last σ, at fractional
    timesteps; then the final σ (0, or σ_0 for Euler's "sigma_min")."""
    c = config
    t = spaced_timesteps(c.num_train_timesteps, num_steps, c.timestep_spacing, c.steps_offset, round_linspace=False)
    t = t.astype(np.float32).astype(np.float64)  # diffusers' float32 timesteps, the σ's interpolated there
    sigmas = _sigmas_at(c, t, getattr(c, "final_sigmas_type", "zero"))           # [N+1]
    if c.use_karras_sigmas:
        t, karras = karras_grid(c, sigmas[-2], sigmas[0], len(t), round_timesteps=False)
        sigmas = np.append(karras, sigmas[-1])
    return t, sigmas


def vp_log_snr(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """σ-space → VP, float64: α = 1/√(σ² + 1) (= √ᾱ_t), σ' = σ α (= √(1 − ᾱ_t)) and the half log-SNR
    λ = log(α/σ') of DPM-Solver and UniPC (+∞ where σ = 0)."""
    sigmas = np.asarray(sigmas, np.float64)
    alpha = 1.0 / np.sqrt(sigmas**2 + 1.0)
    sigma_vp = sigmas * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma_vp)
    return alpha, sigma_vp, lam


def _f32(a: Any) -> jax.Array:
    return jnp.asarray(a, jnp.float32)


def _timestep_array(t: np.ndarray, dtype: Any) -> jax.Array:
    return jnp.asarray(np.asarray(t, np.float64).astype(dtype))


def _batch(value: jax.Array, sample: jax.Array) -> jax.Array:
    """A per-step scalar (timestep, index) as the [B] int32 array the equations of diffusion.py take."""
    return jnp.full((sample.shape[0],), value, jnp.int32)


def step_key(key: jax.Array, i: jax.Array | int) -> jax.Array:
    """Step i's key, ``fold_in(key, i)``; for per-example keys [B] (one typed key per example), each one's."""
    if key.ndim == 0:
        return jax.random.fold_in(key, i)
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, i)                 # [B] keys


def _step_noise(key: jax.Array | None, sample: jax.Array) -> jax.Array:
    """z ~ N(0, I) like ``sample`` [B, ...] from ``key``: one key for the batch, or per-example keys [B], each
    example's noise from its own (so an example's draw does not depend on the batch it is in); zeros without a
    key (deterministic use of a stochastic step)."""
    if key is None:
        return jnp.zeros_like(sample)
    if key.ndim == 0:
        return jax.random.normal(key, sample.shape, sample.dtype)
    return jax.vmap(lambda k: jax.random.normal(k, sample.shape[1:], sample.dtype))(key)   # [B, ...]


def _add_noise_vp(state: Any, x0: jax.Array, noise: jax.Array, i: jax.Array | int) -> jax.Array:
    """x at grid point i from a clean x_0: DDPM Eq. 4, x_{t_i} = √ᾱ_{t_i} x_0 + √(1 − ᾱ_{t_i}) ε (q_sample)."""
    return q_sample(state.schedule, x0, _batch(state.timesteps[i], x0), noise)


def _add_noise_sigma(state: Any, x0: jax.Array, noise: jax.Array, i: jax.Array | int) -> jax.Array:
    """x̃ at grid point i from a clean x_0 in σ-space: x̃ = x_0 + σ_i ε (EDM Sec. 2; diffusers' add_noise)."""
    return x0 + noise * state.sigmas[i]


# ================================================================================================
# DDPM (Algorithm 2, respaced for N < T)
# ================================================================================================

@struct.dataclass
class DDPMState:
    schedule: Schedule            # the respaced schedule: index k is the grid's k-th smallest timestep
    timesteps: jax.Array          # [N] int32, τ_i: the model's timestep at step i (descending)
    init_noise_sigma: jax.Array   # [] 1


@dataclasses.dataclass(frozen=True)
class DDPMScheduler:
    """Ancestral sampling, Algorithm 2 of Ho et al. 2020, as diffusers' ``DDPMScheduler``; the step is
    :func:`diffusion.p_sample`: x_{τ_{i+1}} = μ_θ(x_{τ_i}, τ_i) + σ z.

    On a grid τ of N < T timesteps (``set_timesteps``, diffusers' spacings) the chain is Algorithm 2 on the
    respaced schedule (Nichol & Dhariwal 2021, Sec. 4; :func:`schedules.respace`), β'_i = 1 − ᾱ_{τ_i}/ᾱ_{τ_{i−1}}
    and ᾱ = 1 after the last grid point, which is what diffusers' ``step`` computes from its ᾱ ratio. Step i
    (grid point τ_i, descending) is p_sample at index k = N−1−i of the respaced schedule, while the model is
    called with the original τ_i. With N = T this is Algorithm 2 on the original schedule, bit for bit. ``variance_type``
    "fixed_small"/"fixed_small_log" give σ² = β̃', "fixed_large" σ² = β'.

    One documented difference from diffusers: Algorithm 2 adds no noise at the last step (paper t = 1), while
    diffusers adds noise whenever the grid point τ > 0. With "fixed_small" that noise has σ² = β̃' = 0 there
    (diffusers clamps it to 1e-20, so σ = 1e-10), but with "fixed_large" on a grid whose last point is > 0
    (``steps_offset=1``, "trailing") diffusers' last step adds √β' z; we follow the paper.
    """

    config: DDPMConfig = DDPMConfig()
    p_sample_fn: Callable = p_sample
    p_mean_variance_fn: Callable = p_mean_variance

    name: ClassVar[str] = "ddpm"
    order: ClassVar[int] = 1    # grid points per step (diffusers' scheduler.order)

    def set_timesteps(self, num_steps: int) -> np.ndarray:
        """diffusers' ``set_timesteps(num_steps); timesteps``: int64 [N]."""
        c = self.config
        return spaced_timesteps(c.num_train_timesteps, num_steps, c.timestep_spacing, c.steps_offset).astype(np.int64)

    def init_state(self, num_steps: int, sample: jax.Array | None = None, start: int = 0) -> DDPMState:
        """The grid and the respaced schedule (a one-step method: ``start`` changes nothing)."""
        t = self.set_timesteps(num_steps)
        if len(t) == self.config.num_train_timesteps:  # every timestep: Algorithm 2 on the schedule itself
            schedule = self.config.schedule()
        else:
            schedule = respace(self.config.alphas_cumprod(), t)
        return DDPMState(schedule, _timestep_array(t, np.int32), _f32(1.0))

    def scale_model_input(self, state: DDPMState, sample: jax.Array, i: jax.Array | int) -> jax.Array:
        return sample

    def step(self, state: DDPMState, model_output: jax.Array, i: jax.Array | int, sample: jax.Array,
             key: jax.Array | None = None) -> tuple[jax.Array, DDPMState]:
        """x_{τ_{i+1}} = μ_θ(x_{τ_i}, τ_i) + σ z (Algorithm 2, line 4, on the respaced schedule; z from ``key``)."""
        k = _batch(state.timesteps.shape[0] - 1 - i, sample)                           # [B] respaced index
        prev = self.p_sample_fn(state.schedule, model_output, sample, k, _step_noise(key, sample),
                                prediction=self.config.prediction, variance=self.config.variance,
                                clip_denoised=self.config.clip_sample, p_mean_variance_fn=self.p_mean_variance_fn)
        return prev, state

    def add_noise(self, state: DDPMState, x0: jax.Array, noise: jax.Array, i: jax.Array | int) -> jax.Array:
        """x at grid point i from a clean x_0 (DDPM Eq. 4 at τ_i, i.e. at respaced index N−1−i)."""
        return q_sample(state.schedule, x0, _batch(state.timesteps.shape[0] - 1 - i, x0), noise)


# ================================================================================================
# DDIM
# ================================================================================================

@struct.dataclass
class DDIMState:
    schedule: Schedule
    timesteps: jax.Array          # [N] int32, τ_i: the model's timestep at step i
    prev_timesteps: jax.Array     # [N] int32, τ_i − T // N; −1 means ᾱ = 1 (set_alpha_to_one)
    init_noise_sigma: jax.Array   # [] 1


@dataclasses.dataclass(frozen=True)
class DDIMScheduler:
    """DDIM (Song et al. 2021, Eq. 12) as diffusers' ``DDIMScheduler``; the step is :func:`diffusion.ddim_step`.

    diffusers steps from τ to τ − T // N whatever the spacing (with "trailing" that is not always the next
    grid point); after the last step ᾱ = 1 (``set_alpha_to_one``) or ᾱ_1 (Stable Diffusion's config).
    ``eta`` is DDIM's η (Eq. 16): 0 = deterministic; it may be a traced value (a new η does not retrace).
    ``ddim_step_fn`` swaps the equation (default :func:`diffusion.ddim_step`).
    """

    config: DDIMConfig = DDIMConfig()
    eta: float | jax.Array = 0.0
    ddim_step_fn: Callable = ddim_step

    name: ClassVar[str] = "ddim"
    order: ClassVar[int] = 1    # grid points per step (diffusers' scheduler.order)

    def set_timesteps(self, num_steps: int) -> np.ndarray:
        """diffusers' ``set_timesteps(num_steps); timesteps``: int64 [N]."""
        c = self.config
        return spaced_timesteps(c.num_train_timesteps, num_steps, c.timestep_spacing, c.steps_offset).astype(np.int64)

    def init_state(self, num_steps: int, sample: jax.Array | None = None, start: int = 0) -> DDIMState:
        """The grid and each step's target timestep (a one-step method: ``start`` changes nothing)."""
        t = self.set_timesteps(num_steps)
        t_prev = t - self.config.num_train_timesteps // num_steps
        # "after the last step": ᾱ = 1 (ddim_step's t_prev < 0), or ᾱ_1 = alphas_cumprod[0] without set_alpha_to_one
        t_prev = np.where(t_prev < 0, -1 if self.config.set_alpha_to_one else 0, t_prev)
        return DDIMState(self.config.schedule(), _timestep_array(t, np.int32), _timestep_array(t_prev, np.int32),
                         _f32(1.0))

    def scale_model_input(self, state: DDIMState, sample: jax.Array, i: jax.Array | int) -> jax.Array:
        return sample

    def step(self, state: DDIMState, model_output: jax.Array, i: jax.Array | int, sample: jax.Array,
             key: jax.Array | None = None) -> tuple[jax.Array, DDIMState]:
        """x_{τ_i − T//N} = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε̂ + σ z (DDIM Eq. 12; σ = 0 for η = 0)."""
        prev = self.ddim_step_fn(state.schedule, model_output, sample, _batch(state.timesteps[i], sample),
                                 _batch(state.prev_timesteps[i], sample), _step_noise(key, sample), eta=self.eta,
                                 prediction=self.config.prediction, clip_denoised=self.config.clip_sample)
        return prev, state

    add_noise = staticmethod(_add_noise_vp)


# ================================================================================================
# PNDM (PLMS)
# ================================================================================================

# Rows: the multistep weights on (ε̂_i, the last three stored ε̂'s, most recent first) at the run's k-th step,
# k = i − start = 0, 1, 2, 3, ≥4. Step 0 is one DDIM step; step 1 re-does it from the same x with the average of ε̂_0 and the ε̂ at the point it
# reached (a second-order, Heun-like start); then Adams–Bashforth of orders 2, 3 and 4 (PNDM Eq. 12).
PLMS_WEIGHTS = np.array([
    [1.0, 0.0, 0.0, 0.0],
    [1 / 2, 1 / 2, 0.0, 0.0],
    [3 / 2, -1 / 2, 0.0, 0.0],
    [23 / 12, -16 / 12, 5 / 12, 0.0],
    [55 / 24, -59 / 24, 37 / 24, -9 / 24],
])


@struct.dataclass
class PNDMState:
    schedule: Schedule
    timesteps: jax.Array        # [N+1] int32, the model's timestep at step i
    from_timesteps: jax.Array   # [N+1] int32, the transfer φ goes from here …
    to_timesteps: jax.Array     # [N+1] int32, … to here (−1: ᾱ = 1)
    init_noise_sigma: jax.Array  # [] 1
    start: jax.Array            # [] int32, the grid point the run begins at: the PLMS warm-up counts from it
    ets: jax.Array              # [3, *shape] the last three stored model outputs, most recent first
    cur_sample: jax.Array       # [*shape] x at step 0, from which step 1 starts again


@dataclasses.dataclass(frozen=True)
class PNDMScheduler:
    """PLMS (Liu et al. 2022, Eq. 12 / Algorithm 2) as diffusers' ``PNDMScheduler`` with ``skip_prk_steps=True``.

    Each step combines the current and the stored model outputs with :data:`PLMS_WEIGHTS` into ε' and moves
    x by the transfer φ(x_t, ε', t, t − δ) of Eq. 9, which is exactly DDIM's η = 0 step (Eq. 12 of Song et
    al.), so it is :func:`diffusion.ddim_step`. With v-prediction the v̂'s are combined and then converted,
    as in diffusers. δ = T // N whatever the spacing (diffusers).
    """

    config: PNDMConfig = PNDMConfig()

    name: ClassVar[str] = "pndm"
    order: ClassVar[int] = 1    # grid points per step (diffusers' scheduler.order)

    def set_timesteps(self, num_steps: int) -> np.ndarray:
        """diffusers' ``set_timesteps(num_steps); timesteps``: int64 [N + 1] (the second grid point twice)."""
        c = self.config
        t = spaced_timesteps(c.num_train_timesteps, num_steps, c.timestep_spacing, c.steps_offset)[::-1]  # ascending
        return np.concatenate([t[:-1], t[-2:-1], t[-1:]])[::-1].astype(np.int64)

    def init_state(self, num_steps: int, sample: jax.Array, start: int = 0) -> PNDMState:
        """The grid and each step's transfer, for a run beginning at grid point ``start`` (diffusers' counter,
        which orders the warm-up, starts at 0 there: its second step, ``start + 1``, redoes the first's move from
        t + δ to t, whatever t is at that point of the grid, as diffusers does)."""
        t = self.set_timesteps(num_steps)
        delta = self.config.num_train_timesteps // num_steps
        t_from, t_to = t.copy(), t - delta
        if start + 1 < len(t):  # step start + 1 redoes step start's move (t + δ → t) with the averaged ε
            t_from[start + 1], t_to[start + 1] = t[start + 1] + delta, t[start + 1]
        t_to = np.where(t_to < 0, -1 if self.config.set_alpha_to_one else 0, t_to)
        return PNDMState(self.config.schedule(), _timestep_array(t, np.int32), _timestep_array(t_from, np.int32),
                         _timestep_array(t_to, np.int32), _f32(1.0), start=jnp.int32(start),
                         ets=jnp.zeros((3, *sample.shape), jnp.float32),
                         cur_sample=jnp.zeros(sample.shape, jnp.float32))

    def scale_model_input(self, state: PNDMState, sample: jax.Array, i: jax.Array | int) -> jax.Array:
        return sample

    def step(self, state: PNDMState, model_output: jax.Array, i: jax.Array | int, sample: jax.Array,
             key: jax.Array | None = None) -> tuple[jax.Array, PNDMState]:
        """x_{t−δ} = φ(x_t, ε', t, t−δ),  ε' = Σ_k w_k ε̂_{i−k} (PNDM Eqs. 11–12)."""
        k = i - state.start                                       # the step's place in the warm-up (diffusers' counter)
        w = jnp.asarray(PLMS_WEIGHTS, jnp.float32)[jnp.minimum(k, 4)]                  # [4]
        history = jnp.concatenate([model_output[None], state.ets])                      # [4, *shape]
        eps_prime = jnp.tensordot(w, history, axes=1)                                    # [*shape]
        x_from = jnp.where(k == 1, state.cur_sample, sample)
        prev = ddim_step(state.schedule, eps_prime, x_from, state.from_timesteps[i], state.to_timesteps[i],
                         jnp.zeros_like(sample), eta=0.0, prediction=self.config.prediction, clip_denoised=False)
        # diffusers stores every model output but step 1's (taken at the provisional point)
        ets = jnp.where(k == 1, state.ets, history[:3])
        cur_sample = jnp.where(k == 0, sample, state.cur_sample)
        return prev, state.replace(ets=ets, cur_sample=cur_sample)

    add_noise = staticmethod(_add_noise_vp)


# ================================================================================================
# Euler and Euler-ancestral (σ-space)
# ================================================================================================

def _euler_init_noise_sigma(config: SchedulerConfig, sigmas: np.ndarray) -> float:
    """σ_max for "linspace"/"trailing"; √(σ_max² + 1) for "leading" (a diffusers convention kept for parity)."""
    sigma_max = float(np.max(sigmas))
    return sigma_max if config.timestep_spacing in ("linspace", "trailing") else math.sqrt(sigma_max**2 + 1)


def _denoised(prediction_type: str, model_output: jax.Array, sample: jax.Array, sigma: jax.Array,
              sigma_hat: jax.Array) -> jax.Array:
    """D(x; σ), the x_0 estimate in σ-space (EDM Table 1, ε-prediction: c_skip = 1, c_out = −σ, so D = x − σ̂ ε̂).

    v-prediction: x_0 = x/(σ² + 1) − σ/√(σ² + 1) v̂ (x/√(σ²+1) is the VP sample the model saw)."""
    if prediction_type == "epsilon":
        return sample - sigma_hat * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / jnp.sqrt(sigma**2 + 1)) + sample / (sigma**2 + 1)
    return model_output  # "sample"


@struct.dataclass
class EulerState:
    timesteps: jax.Array         # [N] float32, the model's timestep at step i
    sigmas: jax.Array            # [N+1] float32, σ_i (σ_N = 0 or σ_min)
    gammas: jax.Array            # [N] float32, EDM's churn γ_i (0 unless s_churn > 0)
    init_noise_sigma: jax.Array  # []


def _scale_by_sigma(state: Any, sample: jax.Array, i: jax.Array | int) -> jax.Array:
    """x̃/√(σ_i² + 1): the VP x_t the model was trained on."""
    return sample / jnp.sqrt(state.sigmas[i] ** 2 + 1)


@dataclasses.dataclass(frozen=True)
class EulerScheduler:
    """Euler steps on the probability-flow ODE dx̃/dσ = (x̃ − D(x̃; σ))/σ (EDM Algorithm 2, first-order).

    With ``s_churn > 0`` (diffusers' step arguments s_churn, s_tmin, s_tmax, s_noise) each step first raises
    σ_i to σ̂ = (1 + γ_i) σ_i by adding noise √(σ̂² − σ_i²) s_noise z, γ_i = min(s_churn/N, √2 − 1) for σ_i in
    [s_tmin, s_tmax]. Unlike EDM, diffusers uses the model output taken *before* that noise (the model was
    called on x̃_i, σ_i); we match diffusers.
    """

    config: EulerConfig = EulerConfig()
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    name: ClassVar[str] = "euler"
    order: ClassVar[int] = 1    # grid points per step (diffusers' scheduler.order)

    def set_timesteps(self, num_steps: int) -> np.ndarray:
        """diffusers' ``set_timesteps(num_steps); timesteps``: float32 [N] (fractional for "linspace" and Karras)."""
        return euler_sigma_grid(self.config, num_steps)[0].astype(np.float32)

    def init_state(self, num_steps: int, sample: jax.Array | None = None, start: int = 0) -> EulerState:
        """The grid, its σ's and churn γ's (a one-step method: ``start`` changes nothing)."""
        t, sigmas = euler_sigma_grid(self.config, num_steps)                  # [N], [N+1]
        in_range = (self.s_tmin <= sigmas[:-1]) & (sigmas[:-1] <= self.s_tmax)
        gammas = np.where(in_range, min(self.s_churn / num_steps, math.sqrt(2) - 1), 0.0)
        return EulerState(_f32(t), _f32(sigmas), _f32(gammas), _f32(_euler_init_noise_sigma(self.config, sigmas)))

    scale_model_input = staticmethod(_scale_by_sigma)

    def step(self, state: EulerState, model_output: jax.Array, i: jax.Array | int, sample: jax.Array,
             key: jax.Array | None = None) -> tuple[jax.Array, EulerState]:
        """x̃_{i+1} = x̃ + (σ_{i+1} − σ̂) d,  d = (x̃ − D(x̃; σ̂))/σ̂ (EDM Algorithm 2, lines 4–9)."""
        sigma = state.sigmas[i]
        sigma_hat = sigma * (state.gammas[i] + 1)
        if self.s_churn > 0:  # lines 5–7: x̂ = x + √(σ̂² − σ²) ε, ε ~ N(0, S_noise² I)
            noise = _step_noise(key, sample) * self.s_noise
            sample = sample + noise * jnp.sqrt(sigma_hat**2 - sigma**2)
        denoised = _denoised(self.config.prediction_type, model_output, sample, sigma, sigma_hat)
        derivative = (sample - denoised) / sigma_hat
        return sample + derivative * (state.sigmas[i + 1] - sigma_hat), state

    add_noise = staticmethod(_add_noise_sigma)


@struct.dataclass
class EulerAncestralState:
    timesteps: jax.Array         # [N] float32
    sigmas: jax.Array            # [N+1] float32, σ_N = 0
    sigmas_up: jax.Array         # [N] float32, σ_up,i
    sigmas_down: jax.Array       # [N] float32, σ_down,i
    init_noise_sigma: jax.Array  # []


@dataclasses.dataclass(frozen=True)
class EulerAncestralScheduler:
    """The k-diffusion ancestral Euler step (``sample_euler_ancestral``), diffusers'
    ``EulerAncestralDiscreteScheduler``: from σ_i, an Euler step of the ODE to

        σ_down = √(σ_{i+1}² − σ_up²),   σ_up = √(σ_{i+1}² (σ_i² − σ_{i+1}²)/σ_i²),

    then fresh noise σ_up z, so x̃_{i+1} has total noise level σ_{i+1} (with η = 1 this is DDPM's ancestral
    step in σ-space). The last step (σ_N = 0) adds no noise.
    """

    config: EulerAncestralConfig = EulerAncestralConfig()

    name: ClassVar[str] = "euler_ancestral"
    order: ClassVar[int] = 1    # grid points per step (diffusers' scheduler.order)

    def set_timesteps(self, num_steps: int) -> np.ndarray:
        """diffusers' ``set_timesteps(num_steps); timesteps``: float32 [N]."""
        c = self.config
        return spaced_timesteps(c.num_train_timesteps, num_steps, c.timestep_spacing, c.steps_offset,
                                round_linspace=False).astype(np.float32)

    def init_state(self, num_steps: int, sample: jax.Array | None = None, start: int = 0) -> EulerAncestralState:
        """The grid, its σ's, σ_up's and σ_down's (a one-step method: ``start`` changes nothing)."""
        t = self.set_timesteps(num_steps)
        sigmas = _sigmas_at(self.config, t)                                      # [N+1], float64
        s_from, s_to = sigmas[:-1], sigmas[1:]
        sigmas_up = np.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
        sigmas_down = np.sqrt(s_to**2 - sigmas_up**2)
        return EulerAncestralState(_f32(t), _f32(sigmas), _f32(sigmas_up), _f32(sigmas_down),
                                   _f32(_euler_init_noise_sigma(self.config, sigmas)))

    scale_model_input = staticmethod(_scale_by_sigma)

    def step(self, state: EulerAncestralState, model_output: jax.Array, i: jax.Array | int, sample: jax.Array,
             key: jax.Array | None = None) -> tuple[jax.Array, EulerAncestralState]:
        """x̃_{i+1} = x̃ + (σ_down − σ_i) d + σ_up z,  d = (x̃ − D(x̃; σ_i))/σ_i,  z ~ N(0, I) from ``key``."""
        sigma = state.sigmas[i]
        denoised = _denoised(self.config.prediction_type, model_output, sample, sigma, sigma)
        derivative = (sample - denoised) / sigma
        noise = _step_noise(key, sample)
        prev = sample + derivative * (state.sigmas_down[i] - sigma) + noise * state.sigmas_up[i]
        return prev, state

    add_noise = staticmethod(_add_noise_sigma)


# ================================================================================================
# DPM-Solver++(2M) and DPM-Solver++(2M) SDE
# ================================================================================================

def _x0_vp(prediction_type: str, model_output: jax.Array, sample: jax.Array, sigma: jax.Array) -> jax.Array:
    """x̂_0 from the VP sample x = α x̃ at noise level σ (diffusers' DPM-Solver/UniPC ``convert_model_output``):
    :func:`_denoised` D(x̃; σ) at x̃ = x √(σ² + 1), i.e. (x − σ' ε̂)/α for ε, α x − σ' v̂ for v."""
    return _denoised(prediction_type, model_output, sample * jnp.sqrt(sigma**2 + 1), sigma, sigma)


def _add_noise_vp_sigma(state: Any, x0: jax.Array, noise: jax.Array, i: jax.Array | int) -> jax.Array:
    """x at grid point i from a clean x_0 at the grid's σ_i (Karras' or σ(t_i)): α_i x_0 + σ'_i ε (DDPM Eq. 4
    with √ᾱ = α_i = 1/√(σ_i² + 1); diffusers' DPM-Solver and UniPC ``add_noise``)."""
    sigma = state.sigmas[i]
    return (x0 + noise * sigma) / jnp.sqrt(sigma**2 + 1)


def dpm_solver_pp_coefficients(sigmas: np.ndarray, second_order: np.ndarray, solver_type: str = "midpoint",
                               sde: bool = False) -> np.ndarray:
    """Per-step (A_i, P_i, Q_i, S_i), float64 [N, 4], so that DPM-Solver++'s multistep update is

        x_{i+1} = A_i x_i + P_i x̂_0(x_i) + Q_i x̂_0(x_{i−1}) + S_i z,   z ~ N(0, I).

    With α = 1/√(σ² + 1), σ' = σ α (the VP noise level, ``sigmas`` are σ = σ'/α), λ = log(α/σ') and
    h_i = λ_{i+1} − λ_i (Lu et al. 2022, DPM-Solver++ Algorithm 2):

    - first order (DPM-Solver++(1), which is DDIM): x_{i+1} = (σ'_{i+1}/σ'_i) x_i + α_{i+1}(1 − e^{−h_i}) x̂_0,i;
    - second order, "midpoint" (Algorithm 2): replace x̂_0,i by D_i = (1 + 1/(2r_i)) x̂_0,i − 1/(2r_i) x̂_0,i−1,
      r_i = h_{i−1}/h_i;
    - "heun" (diffusers' variant): + α_{i+1}((e^{−h} − 1)/h + 1)(x̂_0,i − x̂_0,i−1)/r_i instead.
    - ``sde`` ("sde-dpmsolver++", DPM-Solver++(2M) SDE, Lu et al. 2022's data-prediction SDE solver): the
      reverse SDE solved exactly with x̂_0 held fixed over the step,
      x_{i+1} = (σ'_{i+1}/σ'_i) e^{−h} x_i + α_{i+1}(1 − e^{−2h}) x̂_0,i + σ'_{i+1} √(1 − e^{−2h}) z,
      i.e. the ODE coefficients with h → 2h in the x̂_0 terms (midpoint D_i as above; "heun" with
      ((1 − e^{−2h})/(−2h) + 1)), A scaled by e^{−h}, and the fresh noise S = σ'_{i+1} √(1 − e^{−2h}).

    At σ_{i+1} = 0 (the last step with final σ "zero"): λ = ∞, A = S = 0, and the step returns x̂_0.
    """
    alpha, sigma_vp, lam = vp_log_snr(sigmas)              # [N+1] each
    coefficients = np.zeros((len(sigmas) - 1, 4))
    for i in range(len(sigmas) - 1):
        h = lam[i + 1] - lam[i]
        hh = 2 * h if sde else h                           # the exponent of the x̂_0 terms
        phi = -alpha[i + 1] * np.expm1(-hh)                # α_{i+1}(1 − e^{−h}), or (1 − e^{−2h}) for the SDE
        A = sigma_vp[i + 1] / sigma_vp[i] * (np.exp(-h) if sde else 1.0)
        S = sigma_vp[i + 1] * np.sqrt(-np.expm1(-2 * h)) if sde else 0.0   # σ'_{i+1} √(1 − e^{−2h})
        P, Q = phi, 0.0
        if second_order[i]:
            r = (lam[i] - lam[i - 1]) / h
            if solver_type == "midpoint":
                P, Q = phi * (1 + 0.5 / r), -phi * 0.5 / r
            else:
                psi = alpha[i + 1] * (np.expm1(-hh) / hh + 1.0)
                P, Q = phi + psi / r, -psi / r
        coefficients[i] = A, P, Q, S
    return coefficients


@struct.dataclass
class DPMSolverState:
    timesteps: jax.Array         # [N] int32
    sigmas: jax.Array            # [N+1] float32, σ_i = √((1 − ᾱ)/ᾱ) at t_i, or Karras'; σ_N = 0 or σ_min
    coefficients: jax.Array      # [N, 4] float32, (A, P, Q, S) of dpm_solver_pp_coefficients
    init_noise_sigma: jax.Array  # [] 1
    prev_x0: jax.Array           # [*shape] x̂_0 of the previous step (zeros before the first)


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepScheduler:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) as diffusers' ``DPMSolverMultistepScheduler``, and with
    ``algorithm_type="sde-dpmsolver++"`` DPM-Solver++(2M) SDE (fresh noise z at every step, from ``key``).

    Data prediction: the model output is converted to x̂_0 at the grid's σ_i (:func:`_x0_vp`) and the
    multistep history is the previous x̂_0. Order per step as diffusers: first order at step 0, and at the last
    step when ``final_sigmas_type="zero"`` or ``euler_at_final`` or (``lower_order_final`` and N < 15);
    second order otherwise (if ``solver_order=2``). ``use_karras_sigmas``: Karras σ's ("DPM++ 2M Karras",
    :func:`multistep_sigma_grid`).
    """

    config: DPMSolverConfig = DPMSolverConfig()

    name: ClassVar[str] = "dpmsolver++"
    order: ClassVar[int] = 1    # grid points per step (diffusers' scheduler.order)

    def set_timesteps(self, num_steps: int) -> np.ndarray:
        """diffusers' ``set_timesteps(num_steps); timesteps``: int64 [N] (:func:`multistep_sigma_grid`)."""
        return multistep_sigma_grid(self.config, num_steps)[0]

    def orders(self, num_steps: int, start: int = 0) -> np.ndarray:
        """The order (1 or 2) of each of the N steps, as diffusers' ``step`` chooses it for a run beginning at grid
        point ``start`` (its ``lower_order_nums`` counts from there: no history before it; "< 15" is of the whole grid)."""
        c = self.config
        n = len(self.set_timesteps(num_steps))
        last_first_order = c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero"
        orders = np.full(n, c.solver_order)
        orders[:start + 1] = 1
        if last_first_order:
            orders[-1] = 1
        return orders

    def init_state(self, num_steps: int, sample: jax.Array, start: int = 0) -> DPMSolverState:
        """The grid, its σ's and each step's (A, P, Q, S) for a run beginning at grid point ``start`` (first order there)."""
        t, sigmas = multistep_sigma_grid(self.config, num_steps)                      # [N], [N+1]
        coefficients = dpm_solver_pp_coefficients(sigmas, self.orders(num_steps, start) == 2, self.config.solver_type,
                                                  sde=self.config.algorithm_type == "sde-dpmsolver++")
        return DPMSolverState(_timestep_array(t, np.int32), _f32(sigmas), _f32(coefficients), _f32(1.0),
                              prev_x0=jnp.zeros(sample.shape, jnp.float32))

    def scale_model_input(self, state: DPMSolverState, sample: jax.Array, i: jax.Array | int) -> jax.Array:
        return sample

    def step(self, state: DPMSolverState, model_output: jax.Array, i: jax.Array | int, sample: jax.Array,
             key: jax.Array | None = None) -> tuple[jax.Array, DPMSolverState]:
        """x_{i+1} = A_i x_i + P_i x̂_0,i + Q_i x̂_0,i−1 (+ S_i z for the SDE; :func:`dpm_solver_pp_coefficients`)."""
        x0 = _x0_vp(self.config.prediction_type, model_output, sample, state.sigmas[i])
        A, P, Q, S = state.coefficients[i]
        prev = A * sample + P * x0 + Q * state.prev_x0
        if self.config.algorithm_type == "sde-dpmsolver++":
            prev = prev + S * _step_noise(key, sample)
        return prev, state.replace(prev_x0=x0)

    add_noise = staticmethod(_add_noise_vp_sigma)


# ================================================================================================
# Heun (EDM Algorithm 2)
# ================================================================================================

@struct.dataclass
class HeunState:
    timesteps: jax.Array         # [2N−1] float32: t_0, t_1, t_1, t_2, t_2, …, t_{N−1}, t_{N−1}
    sigmas: jax.Array            # [2N] float32:   σ_0, σ_1, σ_1, …, σ_{N−1}, σ_{N−1}, 0
    init_noise_sigma: jax.Array  # []
    derivative: jax.Array        # [*shape] d_k of the Euler half of the current step (Algorithm 2, line 6)
    start_sample: jax.Array      # [*shape] x̃_k, where the current step started


@dataclasses.dataclass(frozen=True)
class HeunScheduler:
    """EDM (Karras et al. 2022) Algorithm 2 with S_churn = 0: Heun's second-order method on the probability-flow
    ODE dx̃/dσ = (x̃ − D(x̃; σ))/σ, as diffusers' ``HeunDiscreteScheduler``.

    Each step k = 0 … N−1 calls the model twice, so the grid has 2N − 1 points (diffusers' interleaved
    timesteps; the last step, to σ_N = 0, is a plain Euler step: Algorithm 2 corrects only if σ_{i+1} ≠ 0):

    - even grid point 2k, at (x̃_k, σ_k): d_k = (x̃_k − D(x̃_k; σ_k))/σ_k,  x̃' = x̃_k + (σ_{k+1} − σ_k) d_k
      (lines 5–8, the Euler step);
    - odd grid point 2k + 1, at (x̃', σ_{k+1}): d' = (x̃' − D(x̃'; σ_{k+1}))/σ_{k+1},
      x̃_{k+1} = x̃_k + (σ_{k+1} − σ_k)(d_k + d')/2 (lines 9–11, the trapezoidal correction).

    The step is pure in the grid index, so a run may start at any even grid point (img2img: diffusers' begin
    index t_start · order, order = 2). ``use_karras_sigmas`` puts the σ_k on Karras' Eq. 5 grid.
    """

    config: HeunConfig = HeunConfig()

    name: ClassVar[str] = "heun"
    order: ClassVar[int] = 2    # grid points per step (diffusers' scheduler.order): img2img starts at t_start · 2

    def set_timesteps(self, num_steps: int) -> np.ndarray:
        """diffusers' ``set_timesteps(num_steps); timesteps``: float32 [2N − 1], every t after the first twice."""
        t = euler_sigma_grid(self.config, num_steps)[0]
        return np.concatenate([t[:1], np.repeat(t[1:], 2)]).astype(np.float32)

    def init_state(self, num_steps: int, sample: jax.Array, start: int = 0) -> HeunState:
        """The interleaved grid and σ's; pure in the grid index, so ``start`` (an even grid point) changes nothing."""
        _, sigmas = euler_sigma_grid(self.config, num_steps)                          # [N+1], σ_N = 0
        interleaved = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])  # [2N]
        return HeunState(_f32(self.set_timesteps(num_steps)), _f32(interleaved),
                         _f32(_euler_init_noise_sigma(self.config, sigmas)),
                         derivative=jnp.zeros(sample.shape, jnp.float32),
                         start_sample=jnp.zeros(sample.shape, jnp.float32))

    scale_model_input = staticmethod(_scale_by_sigma)

    def step(self, state: HeunState, model_output: jax.Array, i: jax.Array | int, sample: jax.Array,
             key: jax.Array | None = None) -> tuple[jax.Array, HeunState]:
        """Even i: x̃' = x̃_k + (σ_{k+1} − σ_k) d_k; odd i: x̃_{k+1} = x̃_k + (σ_{k+1} − σ_k)(d_k + d')/2."""
        sigma = state.sigmas[i]                                  # σ_k (even i) or σ_{k+1} (odd i)
        denoised = _denoised(self.config.prediction_type, model_output, sample, sigma, sigma)
        if self.config.clip_sample:
            denoised = jnp.clip(denoised, -1.0, 1.0)
        derivative = (sample - denoised) / sigma
        first = i % 2 == 0
        euler = sample + derivative * (state.sigmas[i + 1] - sigma)
        heun = state.start_sample + (state.derivative + derivative) / 2 * (sigma - state.sigmas[i - 1])
        new_state = state.replace(derivative=jnp.where(first, derivative, state.derivative),
                                  start_sample=jnp.where(first, sample, state.start_sample))
        return jnp.where(first, euler, heun), new_state

    add_noise = staticmethod(_add_noise_sigma)


# ================================================================================================
# UniPC (bh1/bh2, orders 1 and 2)
# ================================================================================================

def unipc_coefficients(sigmas: np.ndarray, s: int, order: int, corrector: bool,
                       solver_type: str = "bh2") -> np.ndarray:
    """(A, C_t, C_0, C_1), float64 [4]: one UniPC update of the data-prediction form (Zhao et al. 2023, UniPC:
    UniP-p, the predictor, and UniC-p, the corrector) from grid point s to t = s + 1,

        x_t = A x_s + C_t x̂_0(t) + C_0 x̂_0(s) + C_1 x̂_0(s − 1).

    With λ = log(α/σ') (:func:`vp_log_snr`), h = λ_t − λ_s, r = (λ_{s−1} − λ_s)/h and B(h) = e^{−h} − 1 ("bh2")
    or −h ("bh1"), in diffusers' variables hh = −h:

        x_t = (σ'_t/σ'_s) x_s − α_t (e^{−h} − 1) x̂_0(s) − α_t B(h) Σ_k ρ_k D_k,

    D_1 = (x̂_0(s − 1) − x̂_0(s))/r (order 2) and, for the corrector, D_t = x̂_0(t) − x̂_0(s) with r_t = 1. The
    predictor of order 2 takes ρ = 1/2; the corrector solves R ρ = b, R_{jk} = r_k^{j−1}, b_j = j! φ_{j+1}(hh)/B
    with hh φ_1 = e^{hh} − 1 and φ_{j+1} = φ_j/hh − 1/j! (order 1: ρ_t = 1/2). C_t = 0 for the predictor.
    """
    alpha, sigma_vp, lam = vp_log_snr(sigmas)
    t = s + 1
    h = lam[t] - lam[s]
    hh = -h
    h_phi_1 = np.expm1(hh)
    B = np.expm1(hh) if solver_type == "bh2" else hh
    A, C_t, C_0, C_1 = sigma_vp[t] / sigma_vp[s], 0.0, -alpha[t] * h_phi_1, 0.0
    rks = ([(lam[s - 1] - lam[s]) / h] if order == 2 else []) + [1.0]
    if corrector:
        if order == 1:
            rhos = np.array([0.5])
        else:
            R, b, h_phi_k, factorial = [], [], h_phi_1 / hh - 1, 1
            for j in range(1, order + 1):
                R.append(np.power(rks, j - 1))
                b.append(h_phi_k * factorial / B)
                factorial *= j + 1
                h_phi_k = h_phi_k / hh - 1 / factorial
            rhos = np.linalg.solve(np.array(R), np.array(b))
        C_t, C_0 = -alpha[t] * B * rhos[-1], C_0 + alpha[t] * B * rhos[-1]       # ρ_t D_t
    else:
        rhos = np.array([0.5] * (order - 1) + [0.0])
    if order == 2:                                                               # ρ_1 D_1
        c = alpha[t] * B * rhos[0] / rks[0]
        C_0, C_1 = C_0 + c, C_1 - c
    return np.array([A, C_t, C_0, C_1])


@struct.dataclass
class UniPCState:
    timesteps: jax.Array         # [N] int32
    sigmas: jax.Array            # [N+1] float32, σ_N = 0 or σ_min
    predictor: jax.Array         # [N, 2, 4] float32: step i's UniP coefficients for order 1, 2
    corrector: jax.Array         # [N, 2, 4] float32: step i's UniC coefficients (i − 1 → i) for order 1, 2
    max_order: jax.Array         # [N] int32, the order diffusers allows at step i (lower_order_final)
    init_noise_sigma: jax.Array  # [] 1
    x0s: jax.Array               # [2, *shape] x̂_0 of the last two steps, most recent first
    last_sample: jax.Array       # [*shape] x_{i−1} (corrected), where the last predictor started
    last_order: jax.Array        # [] int32, the order of the last predictor step
    num_steps_taken: jax.Array   # [] int32, steps run so far (capped at solver_order): the warm-up


@dataclasses.dataclass(frozen=True)
class UniPCMultistepScheduler:
    """UniPC (Zhao et al. 2023) as diffusers' ``UniPCMultistepScheduler`` (data prediction, B(h) "bh2" as the
    Stable Diffusion configs, or "bh1"; orders 1 and 2).

    At step i the model output at x_i first *corrects* x_i (UniC, from x_{i−1} with x̂_0 at i as the new point;
    not at a run's first step), then the *predictor* (UniP) moves the corrected x_i to x_{i+1}. The order warms
    up from 1 as a run starts (state ``num_steps_taken``, not the grid index, so a run may start at any grid
    point, as diffusers' img2img), and is 1 at the last step with ``lower_order_final``. x̂_0 is taken at the
    grid's σ_i, like DPM-Solver; ``use_karras_sigmas`` puts the σ's on Karras' grid.
    """

    config: UniPCConfig = UniPCConfig()

    name: ClassVar[str] = "unipc"
    order: ClassVar[int] = 1    # grid points per step (diffusers' scheduler.order)

    def set_timesteps(self, num_steps: int) -> np.ndarray:
        """diffusers' ``set_timesteps(num_steps); timesteps``: int64 [N] (:func:`multistep_sigma_grid`)."""
        return multistep_sigma_grid(self.config, num_steps)[0]

    def init_state(self, num_steps: int, sample: jax.Array, start: int = 0) -> UniPCState:
        """The grid, σ's and history; the warm-up counts the steps taken (``num_steps_taken``), so ``start`` changes
        nothing here."""
        c = self.config
        t, sigmas = multistep_sigma_grid(c, num_steps)                               # [N], [N+1]
        n = len(t)
        tables = np.zeros((2, n, 2, 4))                                      # [predictor/corrector, N, order, 4]
        with np.errstate(divide="ignore", invalid="ignore"):
            for i in range(n):
                for order in (1, 2):
                    if i - order + 1 >= 0:                                           # the predictor's history exists
                        tables[0, i, order - 1] = unipc_coefficients(sigmas, i, order, False, c.solver_type)
                    if i - order >= 0:                                               # the corrector's (from i − 1)
                        tables[1, i, order - 1] = unipc_coefficients(sigmas, i - 1, order, True, c.solver_type)
        max_order = np.minimum(c.solver_order, n - np.arange(n)) if c.lower_order_final else np.full(n, c.solver_order)
        return UniPCState(_timestep_array(t, np.int32), _f32(sigmas), _f32(tables[0]), _f32(tables[1]),
                          jnp.asarray(max_order, jnp.int32), _f32(1.0),
                          x0s=jnp.zeros((2, *sample.shape), jnp.float32),
                          last_sample=jnp.zeros(sample.shape, jnp.float32),
                          last_order=jnp.zeros((), jnp.int32), num_steps_taken=jnp.zeros((), jnp.int32))

    def scale_model_input(self, state: UniPCState, sample: jax.Array, i: jax.Array | int) -> jax.Array:
        return sample

    def step(self, state: UniPCState, model_output: jax.Array, i: jax.Array | int, sample: jax.Array,
             key: jax.Array | None = None) -> tuple[jax.Array, UniPCState]:
        """x_i ← UniC(x_{i−1}, x̂_0(x_i), x̂_0's) (not on a run's first step); x_{i+1} = UniP(x_i, x̂_0's)."""
        x0 = _x0_vp(self.config.prediction_type, model_output, sample, state.sigmas[i])   # at the uncorrected x_i
        A, C_t, C_0, C_1 = state.corrector[i, jnp.maximum(state.last_order, 1) - 1]
        corrected = A * state.last_sample + C_t * x0 + C_0 * state.x0s[0] + C_1 * state.x0s[1]
        sample = jnp.where(state.num_steps_taken > 0, corrected, sample)
        x0s = jnp.stack([x0, state.x0s[0]])                                             # [2, *shape]
        order = jnp.minimum(state.max_order[i], state.num_steps_taken + 1)
        A, _, C_0, C_1 = state.predictor[i, order - 1]
        prev = A * sample + C_0 * x0s[0] + C_1 * x0s[1]
        taken = jnp.minimum(state.num_steps_taken + 1, self.config.solver_order)
        return prev, state.replace(x0s=x0s, last_sample=sample, last_order=order, num_steps_taken=taken)

    add_noise = staticmethod(_add_noise_vp_sigma)


# ================================================================================================
# Registry and the sampling loop
# ================================================================================================

SCHEDULERS: dict[str, type] = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerScheduler,
    "euler_ancestral": EulerAncestralScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "sde-dpmsolver++": DPMSolverMultistepScheduler,
    "heun": HeunScheduler,
    "unipc": UniPCMultistepScheduler,
    "ddpm": DDPMScheduler,
}
CONFIGS: dict[str, type[SchedulerConfig]] = {
    "ddim": DDIMConfig, "pndm": PNDMConfig, "euler": EulerConfig, "euler_ancestral": EulerAncestralConfig,
    "dpmsolver++": DPMSolverConfig, "sde-dpmsolver++": DPMSolverConfig, "heun": HeunConfig, "unipc": UniPCConfig,
    "ddpm": DDPMConfig,
}
# what a name sets in the config whatever the config says ("sde-dpmsolver++" is DPM-Solver's SDE algorithm_type)
NAME_OVERRIDES: dict[str, dict[str, Any]] = {"sde-dpmsolver++": {"algorithm_type": "sde-dpmsolver++"},
                                             "dpmsolver++": {"algorithm_type": "dpmsolver++"}}
# the schedulers with Karras σ's: "<name>_karras" sets use_karras_sigmas=True ("DPM++ 2M Karras" = "dpmsolver++_karras")
KARRAS_SUFFIX = "_karras"
KARRAS_SCHEDULERS = tuple(name for name, config in CONFIGS.items()
                          if "use_karras_sigmas" in {f.name for f in dataclasses.fields(config)})
NAMES = tuple(SCHEDULERS) + tuple(name + KARRAS_SUFFIX for name in KARRAS_SCHEDULERS)  # every name get_scheduler takes
# diffusers' _class_name -> our name (DPMSolverMultistepScheduler: the config's algorithm_type picks ODE or SDE)
DIFFUSERS_CLASS_NAMES = {
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "DPMSolverMultistepScheduler": "dpmsolver++",
    "HeunDiscreteScheduler": "heun",
    "UniPCMultistepScheduler": "unipc",
    "DDPMScheduler": "ddpm",
}

Scheduler = (DDPMScheduler | DDIMScheduler | PNDMScheduler | EulerScheduler | EulerAncestralScheduler
             | DPMSolverMultistepScheduler | HeunScheduler | UniPCMultistepScheduler)


def get_scheduler(name: str | None, config: Mapping[str, Any] | str | Path | SchedulerConfig | None = None, *,
                  schedule: Schedule | None = None, prediction: str | None = None, clip_sample: bool | None = None,
                  variance: str | None = None, **kwargs: Any) -> Scheduler:
    """The scheduler ``name`` (one of :data:`NAMES`: "ddpm", "ddim", "pndm", "euler", "euler_ancestral",
    "dpmsolver++", "sde-dpmsolver++", "heun", "unipc", each of :data:`KARRAS_SCHEDULERS` with "_karras" for
    Karras σ's, e.g. "dpmsolver++_karras"; or a diffusers ``_class_name`` such as "EulerDiscreteScheduler"),
    configured from ``config``: a diffusers config dict, a ``scheduler_config.json`` or its folder, one of our
    config dataclasses, or None (diffusers' defaults). ``name=None`` takes the config's ``_class_name``. A short
    name sets what it names whatever the config says ("sde-dpmsolver++" the SDE algorithm_type, "dpmsolver++"
    the ODE one, "_karras" use_karras_sigmas); a diffusers class name takes the config as it is.

    ``schedule``: a library :class:`~ddpm_jax.schedules.Schedule` whose ᾱ's to use (a model trained with
    ``schedules.get_schedule``; see the module docstring). ``prediction`` ("eps", "x0", "v"), ``clip_sample``
    and ``variance`` ("fixed_small", "fixed_large") override the config where the class has that option.
    ``kwargs`` go to the scheduler (``eta``/``ddim_step_fn`` for DDIM, ``p_sample_fn``/``p_mean_variance_fn``
    for DDPM, ``s_churn``… for Euler).
    """
    if isinstance(config, (str, Path)):
        config = read_scheduler_config(config)
    if name is None:
        name = config.get("_class_name") if isinstance(config, Mapping) else None
        if name is None:
            raise ValueError("get_scheduler: no name given and the config has no _class_name")
    key = DIFFUSERS_CLASS_NAMES.get(name, name)
    overrides: dict[str, Any] = dict(NAME_OVERRIDES.get(name, {}))
    if key.endswith(KARRAS_SUFFIX) and key[:-len(KARRAS_SUFFIX)] in KARRAS_SCHEDULERS:
        key = key[:-len(KARRAS_SUFFIX)]
        overrides.update(NAME_OVERRIDES.get(key, {}), use_karras_sigmas=True)
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(NAMES)} "
                         f"(or diffusers' {', '.join(DIFFUSERS_CLASS_NAMES)})")
    config_cls, scheduler_cls = CONFIGS[key], SCHEDULERS[key]
    if config is None:
        config = config_cls()
    elif isinstance(config, SchedulerConfig):
        if not isinstance(config, config_cls):  # another class's config: its fields, and the keys it kept
            names = {f.name for f in dataclasses.fields(config_cls)}
            fields = {k: v for k, v in config.fields().items() if k != "hidden"}
            carried = {**config.hidden, **fields}
            config = config_cls(**{k: v for k, v in carried.items() if k in names - {"hidden"}},
                                hidden={k: v for k, v in carried.items() if k not in names})
    else:
        config = config_cls.from_config(config)
    if schedule is not None:
        overrides.update(num_train_timesteps=schedule.num_timesteps, trained_schedule=schedule)
    if prediction is not None:
        inverse = {ours: theirs for theirs, ours in PREDICTION_TYPES.items()}
        _check_choice(scheduler_cls.__name__, "prediction", prediction, tuple(inverse))
        overrides["prediction_type"] = inverse[prediction]
    if variance is not None:
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; valid choices: {', '.join(VARIANCES)}")
        overrides["variance_type"] = variance
    if clip_sample is not None:
        overrides["clip_sample"] = bool(clip_sample)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if k in fields})
    allowed = {f.name for f in dataclasses.fields(scheduler_cls)} - {"config"}
    if set(kwargs) - allowed:
        raise ValueError(f"{scheduler_cls.__name__} has no option {', '.join(sorted(set(kwargs) - allowed))}; "
                         f"its options: {', '.join(sorted(allowed)) or 'none'}")
    return scheduler_cls(config, **kwargs)


class Trajectory(NamedTuple):
    """A run of :func:`run`, step by step (S = the number of steps run, end − start)."""

    x: jax.Array            # [S+1, B, ...] the sample at the start grid point, then after each step (x[-1] = result)
    model_input: jax.Array  # [S, B, ...]   scale_model_input(x_i): what the model saw at step i
    t: jax.Array            # [S]           the model's timestep at step i (int32; float32 for the Euler schedulers)


def run(scheduler: Scheduler, eps_fn: EpsFn, x: jax.Array, key: jax.Array | None, num_steps: int, *,
        start: int = 0, end: int | None = None, x_is_noise: bool = True,
        on_step: Callable[[jax.Array], None] | None = None,
        after_step: Callable[[jax.Array, jax.Array, Any], jax.Array] | None = None,
        return_trajectory: bool = False) -> jax.Array | tuple[jax.Array, Trajectory]:
    """THE sampling loop: steps ``start … end−1`` (default ``end`` = n) of the scheduler's grid for ``num_steps``
    as ONE ``lax.scan``, as diffusers' pipelines run them::

        state = init_state(num_steps, x, start)                     (a multistep history begins at start)
        x = x_T · init_noise_sigma                                  (x_is_noise)
        for i, t in enumerate(timesteps[start:end], start):
            x = step(state, eps_fn(scale_model_input(x, i), t), i, x, fold_in(key, i))
            x = after_step(x, i, state)                             (if given)

    Args:
      x: [B, ...] the initial noise x_T ~ N(0, I) (``x_is_noise``, multiplied by init_noise_sigma here), or,
        with ``x_is_noise=False``, already the sample at grid point ``start`` (img2img: ``scheduler.add_noise``).
      key: the steps' key, ``key_steps`` of the noise-key rule (module docstring): step i draws from
        ``jax.random.fold_in(key, i)``; or per-example keys [B], each example drawing from its own.
        None only for deterministic schedulers (a fixed key is used).
      eps_fn: ``eps_fn(x, t)`` gets x [B, ...] and t [B] (int32, or float32 for the Euler schedulers) and returns
        the model output (ε̂, v̂ or x̂_0, per the config's ``prediction_type``); e.g. a classifier-free-guided model.
      num_steps: static (with ``start``); n = len(timesteps) is num_steps, or num_steps + 1 for PNDM.
      end: static; stop before grid point ``end`` and return the sample there (SDXL's base → refiner split,
        ``denoising_end``: the rest of the grid is another model's).
      on_step: ``on_step(i)`` runs on the host after step i (``jax.debug.callback``: a progress bar without
        splitting the program).
      after_step: ``after_step(x, i, state) -> x``, traced into the loop after step i (x is the sample at grid point
        i + 1): a change of the sample between steps, e.g. inpainting's latent blending with the known region.

    Returns x after the last step [B, ...]; with ``return_trajectory`` the pair (x, :class:`Trajectory`).
    To compile once and vary the model's inputs, jit a function that takes them as arguments::

        sample = jax.jit(lambda params, cond, g, x_T, key: run(
            scheduler, lambda x, t: guided_unet(params, x, t, cond, g), x_T, key, 50))
    """
    x = jnp.asarray(x, jnp.float32)
    n = len(scheduler.set_timesteps(num_steps))
    if not 0 <= start < n:
        raise ValueError(f"start must be in [0, {n - 1}] (the grid has {n} points), got {start}")
    state = scheduler.init_state(num_steps, x, start=start)
    batch = x.shape[0]
    end = n if end is None else end
    if not start < end <= n:
        raise ValueError(f"end must be in [{start + 1}, {n}] (after start {start}; the grid has {n} points), got {end}")
    if x_is_noise:
        x = x * state.init_noise_sigma
    if key is None:
        key = jax.random.key(0)  # unused by deterministic steps

    def body(carry, i):
        x, state = carry
        t = jnp.full((batch,), state.timesteps[i], state.timesteps.dtype)   # [B]
        x_in = scheduler.scale_model_input(state, x, i)                     # [B, ...]
        x_next, state = scheduler.step(state, eps_fn(x_in, t), i, x, step_key(key, i))
        if after_step is not None:
            x_next = after_step(x_next, i, state)
        if on_step is not None:
            jax.debug.callback(on_step, i)
        return (x_next, state), ((x_in, x_next) if return_trajectory else None)

    (x_end, _), steps = jax.lax.scan(body, (x, state), jnp.arange(start, end, dtype=jnp.int32))
    if not return_trajectory:
        return x_end
    model_inputs, xs = steps                                                  # [S, B, ...] each
    return x_end, Trajectory(jnp.concatenate([x[None], xs]), model_inputs, state.timesteps[start:end])
