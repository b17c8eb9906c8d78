"""ddpm_jax/schedulers.py against diffusers' own schedulers (PyTorch): grids, steps, whole loops, compilation.

Reference precision (as in test_diffusers_parity_schedulers.py). diffusers keeps ᾱ_t in float32 (its cumprod
drifts by up to 2e-5 relative) and rounds its σ grid to float32. For the step and loop comparisons we therefore
run diffusers' step code on float64 tensors, with ᾱ_t = cumprod(1 − β_t) from the exact float64 β_t and σ's
recomputed from it in float64, and require our float32 results to agree to ATOL = 1e-5 max abs (inputs are
float32 values, so both sides see the same numbers). The Euler schedulers work in σ-space, where samples reach
|x| ≈ 60 at σ_max ≈ 14.6 and one float32 ulp is 4e-6; there the bound is 1e-5 relative to max(1, |x|). The grids
themselves are compared with diffusers' float32 arrays directly (timesteps exactly; σ's to rtol 3e-5).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.schedulers import (scheduling_ddpm, scheduling_dpmsolver_multistep,  # noqa: E402
                                  scheduling_euler_ancestral_discrete, scheduling_euler_discrete)

from ddpm_jax import schedulers as S  # noqa: E402

pytestmark = pytest.mark.fast_compile  # compile-bound: many tiny programs, each run once (tests/conftest.py)

ATOL = 1e-5
# Stable Diffusion v1.x scheduler_config.json (PNDM), as on the Hub
SD_CONFIG = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}
DIFFUSERS = {"ddim": diffusers.DDIMScheduler, "pndm": diffusers.PNDMScheduler, "euler": diffusers.EulerDiscreteScheduler,
             "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
             "dpmsolver++": diffusers.DPMSolverMultistepScheduler, "ddpm": diffusers.DDPMScheduler,
             "sde-dpmsolver++": diffusers.DPMSolverMultistepScheduler, "heun": diffusers.HeunDiscreteScheduler,
             "unipc": diffusers.UniPCMultistepScheduler}
SIGMA_SPACE = ("euler", "euler_ancestral", "heun")  # σ-space samplers: float32 σ grid, large |x|
STOCHASTIC = ("euler_ancestral", "sde-dpmsolver++", "ddpm")  # fresh noise at every step
NAMES = tuple(DIFFUSERS)
S_DATA = 1.0  # data x0 ~ N(0, S_DATA² I) for the analytic model

f32 = lambda a: jnp.asarray(a, jnp.float32)
f64 = lambda a: torch.from_numpy(np.asarray(a, np.float64))


def our_sigmas64(name, config, num_steps):
    """Our σ grid in float64 as diffusers lays it out (Heun's interleaved)."""
    sched = S.get_scheduler(name, config)
    if name in ("dpmsolver++", "sde-dpmsolver++", "unipc"):
        return S.multistep_sigma_grid(sched.config, num_steps)[1]
    sigmas = S.euler_sigma_grid(sched.config, num_steps)[1]
    return np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]]) if name == "heun" else sigmas


def reference(name, config, num_steps, float64=True, **step_kw):
    """diffusers' scheduler for ``config`` after set_timesteps(num_steps); in float64 (see the module docstring)."""
    config = {**config, **S.NAME_OVERRIDES.get(name, {})}
    ref = DIFFUSERS[name].from_config(config)
    ref.set_timesteps(num_steps)
    if float64:
        ours = S.CONFIGS[name].from_config(config)
        betas = ours.betas()
        np.testing.assert_allclose(betas, ref.betas.numpy(), rtol=1e-6)  # the same β's
        ab = np.cumprod(1 - betas)
        ref.alphas_cumprod = f64(ab)
        if name == "ddpm":
            ref.one = f64(1.0)
        elif name in ("ddim", "pndm"):
            ref.final_alpha_cumprod = f64(1.0 if config.get("set_alpha_to_one", name == "ddim") else ab[0])
        elif not config.get("use_karras_sigmas") and name != "heun":
            # σ(t) interpolated at the grid, then the final σ: diffusers' formula, in float64
            sig = np.sqrt((1 - ab) / ab)
            last = sig[0] if config.get("final_sigmas_type") == "sigma_min" else 0.0
            sigmas = np.append(np.interp(ref.timesteps.numpy().astype(np.float64), np.arange(len(sig)), sig), last)
            np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=3e-5)
            ref.sigmas = f64(sigmas)
        else:  # Karras' σ's, Heun's interleaved grid: ours in float64, checked against diffusers' float32
            sigmas = our_sigmas64(name, config, num_steps)
            np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=3e-5)
            ref.sigmas = f64(sigmas)
    return ref


def sigma_table(config):
    ab = config.alphas_cumprod()
    return np.sqrt((1 - ab) / ab)  # [T] float64


def optimal_eps_jax(config, s=S_DATA):
    """ε*(x_t, t) = E[ε | x_t] for x0 ~ N(0, s²), with σ(t) interpolated (Euler's fractional t):
    √(1−ᾱ) x/(ᾱ s² + 1 − ᾱ) = σ√(1 + σ²) x/(s² + σ²), ᾱ = 1/(1 + σ²) (no cancellation at small σ)."""
    table = f32(sigma_table(config))
    grid = jnp.arange(table.shape[0], dtype=jnp.float32)

    def eps_fn(x, t):
        sig = jnp.interp(t.astype(jnp.float32), grid, table).reshape((-1,) + (1,) * (x.ndim - 1))
        return sig * jnp.sqrt(1 + sig**2) * x / (s**2 + sig**2)
    return eps_fn


def optimal_eps_torch(config, s=S_DATA):
    table = sigma_table(config)

    def eps_fn(x, t):
        sig = float(np.interp(float(t), np.arange(len(table)), table))
        return sig * np.sqrt(1 + sig**2) * x / (s**2 + sig**2)
    return eps_fn


class FeedNoise:
    """Replaces diffusers' randn_tensor (Euler, Euler-ancestral, DDPM) so that it returns our noise for step ``i``
    (the test sets ``i`` before each step; Euler draws only at steps with churn)."""

    def __init__(self, monkeypatch, noise_of):
        self.noise_of, self.i, self.calls = noise_of, None, 0
        for module in (scheduling_euler_discrete, scheduling_euler_ancestral_discrete, scheduling_ddpm,
                       scheduling_dpmsolver_multistep):
            monkeypatch.setattr(module, "randn_tensor", self)

    def __call__(self, shape, **kw):
        self.calls += 1
        noise = self.noise_of(self.i)
        assert tuple(noise.shape) == tuple(shape)
        return f64(noise)


def close(ours, ref, name):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    scale = max(1.0, np.abs(ref).max()) if name in SIGMA_SPACE else 1.0
    return np.abs(ours - ref).max() / scale


# ------------------------------------------------------------------------------------------------
# Grids: timesteps, σ's, init_noise_sigma
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)])
def test_timesteps_and_sigmas_match_set_timesteps(name, spacing, offset):
    config = {**SD_CONFIG, "timestep_spacing": spacing, "steps_offset": offset}
    sched = S.get_scheduler(name, config)
    for num_steps in (1, 2, 3, 7, 20, 50, 999):
        if name in ("dpmsolver++", "sde-dpmsolver++", "unipc") and (spacing, offset, num_steps) == ("leading", 1, 999):
            continue  # gives t = 1000: an error (test_bad_num_steps_and_missing_config_file)
        ref = reference(name, config, num_steps, float64=False)
        ours = sched.set_timesteps(num_steps)
        assert ours.dtype == ref.timesteps.numpy().dtype
        np.testing.assert_array_equal(ours, ref.timesteps.numpy(), err_msg=f"{num_steps} steps")
        state = sched.init_state(num_steps, jnp.zeros((1, 2)))
        np.testing.assert_array_equal(np.asarray(state.timesteps), ref.timesteps.numpy().astype(np.float32))
        # init_noise_sigma: diffusers' float32 σ_max (cumprod drift) vs ours from float64
        np.testing.assert_allclose(float(state.init_noise_sigma), float(ref.init_noise_sigma), rtol=3e-5)
        if hasattr(state, "sigmas"):
            np.testing.assert_allclose(np.asarray(state.sigmas), ref.sigmas.numpy(), rtol=3e-5, atol=1e-7)


KARRAS = ("euler", "dpmsolver++", "sde-dpmsolver++", "heun", "unipc")


@pytest.mark.parametrize("name", KARRAS)
@pytest.mark.parametrize("extra", [{}, {"timestep_spacing": "leading", "steps_offset": 1},
                                   {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}])
def test_karras_timesteps_and_sigmas_match_set_timesteps(name, extra):
    """use_karras_sigmas (Karras et al. 2022 Eq. 5, ρ = 7): σ's between the ends of the grid (Euler, Heun) or of
    the whole table (DPM-Solver, UniPC), timesteps by σ → t (rounded for the multistep solvers): the same
    integer timesteps as diffusers; the σ's and fractional timesteps to rtol 3e-5 (diffusers' float32 cumprod,
    module docstring). Not compared: the cosine schedule, whose float32 σ_{T−1} in diffusers is off by far more
    (β_T = 0.999, see test_diffusers_parity_schedulers.py), which moves Karras' whole grid."""
    config = {**SD_CONFIG, "use_karras_sigmas": True, **extra}
    sched = S.get_scheduler(name, config)
    for num_steps in (1, 2, 7, 25, 50):
        ref = reference(name, config, num_steps, float64=False)
        ours = sched.set_timesteps(num_steps)
        assert ours.dtype == ref.timesteps.numpy().dtype
        if ours.dtype == np.int64:  # rounded: equal
            np.testing.assert_array_equal(ours, ref.timesteps.numpy(), err_msg=f"{num_steps} steps")
        else:  # fractional (Euler, Heun): σ → t on diffusers' float32 table drifts like its σ's
            np.testing.assert_allclose(ours, ref.timesteps.numpy(), rtol=3e-5, atol=1e-4, err_msg=f"{num_steps} steps")
        state = sched.init_state(num_steps, jnp.zeros((1, 2)))
        np.testing.assert_allclose(np.asarray(state.sigmas), ref.sigmas.numpy(), rtol=3e-5, atol=1e-7)
        np.testing.assert_allclose(float(state.init_noise_sigma), float(ref.init_noise_sigma), rtol=3e-5)
    assert S.get_scheduler(name + "_karras", SD_CONFIG).config == sched.config.__class__.from_config(
        {**SD_CONFIG, "use_karras_sigmas": True, **S.NAME_OVERRIDES.get(name, {})})


def test_sd_leading_grid_is_981_to_1():
    t = S.get_scheduler("ddim", SD_CONFIG).set_timesteps(50)
    assert t[0] == 981 and t[-1] == 1 and len(t) == 50
    assert list(S.get_scheduler("pndm", SD_CONFIG).set_timesteps(50)[:3]) == [981, 961, 961]  # PLMS: N + 1 calls


# ------------------------------------------------------------------------------------------------
# Steps, several in sequence (the multistep history), against diffusers' step
# ------------------------------------------------------------------------------------------------

STEP_CASES = [
    ("ddim", {}, {}, 10), ("ddim", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, {}, 10),
    ("ddim", {"clip_sample": True, "set_alpha_to_one": True, "prediction_type": "sample"}, {"eta": 0.7}, 10),
    ("pndm", {}, {}, 10), ("pndm", {"prediction_type": "v_prediction", "timestep_spacing": "linspace"}, {}, 7),
    ("euler", {}, {}, 10), ("euler", {"prediction_type": "v_prediction", "timestep_spacing": "linspace"}, {}, 10),
    ("euler", {"final_sigmas_type": "sigma_min", "prediction_type": "sample"},
     {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 8.0}, 10),  # churn on some steps only
    ("euler_ancestral", {}, {}, 10),
    ("euler_ancestral", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, {}, 10),
    ("dpmsolver++", {}, {}, 10), ("dpmsolver++", {}, {}, 20),  # N < 15 and N ≥ 15 (lower_order_final)
    ("dpmsolver++", {"solver_type": "heun", "final_sigmas_type": "sigma_min", "prediction_type": "v_prediction"}, {},
     20),
    ("dpmsolver++", {"solver_type": "heun", "final_sigmas_type": "sigma_min", "lower_order_final": False}, {}, 10),
    ("dpmsolver++", {"solver_order": 1, "timestep_spacing": "leading", "prediction_type": "sample"}, {}, 10),
    # Karras σ's ("DPM++ 2M Karras", Euler and Heun with use_karras_sigmas)
    ("dpmsolver++", {"use_karras_sigmas": True}, {}, 20),
    ("dpmsolver++", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "prediction_type": "v_prediction"},
     {}, 10),
    ("euler", {"use_karras_sigmas": True}, {}, 10),
    ("euler", {"use_karras_sigmas": True, "prediction_type": "v_prediction", "timestep_spacing": "leading"}, {}, 10),
    # DPM-Solver++(2M) SDE
    ("sde-dpmsolver++", {}, {}, 10), ("sde-dpmsolver++", {"use_karras_sigmas": True}, {}, 20),
    ("sde-dpmsolver++", {"solver_type": "heun", "prediction_type": "v_prediction", "final_sigmas_type": "sigma_min"},
     {}, 10),
    # Heun (EDM Algorithm 2): 2N − 1 model calls
    ("heun", {}, {}, 10), ("heun", {"use_karras_sigmas": True, "prediction_type": "v_prediction"}, {}, 10),
    ("heun", {"prediction_type": "sample", "clip_sample": True, "timestep_spacing": "leading"}, {}, 7),
    # UniPC (bh2 as SD configs; bh1; Karras; order 1)
    ("unipc", {}, {}, 10), ("unipc", {"use_karras_sigmas": True, "prediction_type": "v_prediction"}, {}, 20),
    ("unipc", {"solver_type": "bh1", "lower_order_final": False, "final_sigmas_type": "sigma_min"}, {}, 10),
    ("unipc", {"solver_order": 1, "timestep_spacing": "trailing", "prediction_type": "sample"}, {}, 10),
]


@pytest.mark.parametrize("name,config,kwargs,num_steps", STEP_CASES)
def test_step_sequence_matches_diffusers_step(name, config, kwargs, num_steps, monkeypatch):
    """Every step of a run on random (x_i, model output_i), fed identically to both, with the same noise."""
    _check_step_sequence(name, config, kwargs, num_steps, monkeypatch)


@pytest.mark.parametrize("name", NAMES)
def test_steps_from_mid_grid_match_diffusers_begin_index(name, monkeypatch):
    """A run that begins at grid point 3 of 10 (img2img, inpainting): init_state(N, x, start) against diffusers'
    fresh scheduler with set_begin_index(3) stepping timesteps[3:] (PNDM: its warm-up counter starts there too);
    the multistep methods' history and lower-order start restart at 3, so steps 3, 4, … are not those of a run
    from 0 (checked: they differ)."""
    _check_step_sequence(name, {}, {}, 10, monkeypatch, start=3 * S.get_scheduler(name, SD_CONFIG).order)


def _check_step_sequence(name, config, kwargs, num_steps, monkeypatch, start=0):
    config = {**SD_CONFIG, **config}
    sched = S.get_scheduler(name, config, **kwargs)
    ref = reference(name, config, num_steps)
    if start and hasattr(ref, "set_begin_index"):
        ref.set_begin_index(start)
    rng = np.random.default_rng(0)
    shape = (2, 4, 4, 3)
    state = sched.init_state(num_steps, jnp.zeros(shape), start=start)
    from_zero = sched.init_state(num_steps, jnp.zeros(shape))
    key = jax.random.key(1)
    noise_of = lambda i: np.asarray(jax.random.normal(jax.random.fold_in(key, i), shape), np.float64)
    feed = FeedNoise(monkeypatch, noise_of)
    worst, unlike_from_zero = 0.0, 0.0
    for i, t in enumerate(ref.timesteps[start:], start):
        feed.i = i
        x = (float(state.init_noise_sigma) * rng.standard_normal(shape)).astype(np.float32).astype(np.float64)
        model_output = rng.standard_normal(shape).astype(np.float32).astype(np.float64)
        ref.scale_model_input(f64(x), t)
        step_kw = dict(kwargs)  # eta, s_churn, …: diffusers' step arguments
        if name == "ddim" and kwargs.get("eta", 0) > 0:
            step_kw["variance_noise"] = f64(noise_of(i))
        prev_ref = ref.step(f64(model_output), t, f64(x), **step_kw).prev_sample.numpy()
        prev, state = sched.step(state, f32(model_output), i, f32(x), jax.random.fold_in(key, i))
        worst = max(worst, close(prev, prev_ref, name))
        if start:  # the same inputs through a state made for a run from grid point 0
            prev_from_zero, from_zero = sched.step(from_zero, f32(model_output), i, f32(x), jax.random.fold_in(key, i))
            unlike_from_zero = max(unlike_from_zero, close(prev_from_zero, prev_ref, name))
    assert worst <= ATOL, worst
    assert (unlike_from_zero > 1e-2) == (start > 0 and name in ("pndm", "dpmsolver++", "sde-dpmsolver++")), unlike_from_zero
    assert (feed.calls > 0) == (name in STOCHASTIC or "s_churn" in kwargs)  # our noise reached diffusers


# ------------------------------------------------------------------------------------------------
# The whole loop: one lax.scan against diffusers' Python loop with the same model and noise
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_sample_loop_matches_diffusers_loop(name, monkeypatch):
    """Stable Diffusion's config, 20 steps, the optimal ε-model for N(0, 1) data, the same x_T (and noise)."""
    num_steps, shape = 20, (2, 4, 4, 3)
    sched = S.get_scheduler(name, SD_CONFIG)
    x_T = np.asarray(jax.random.normal(jax.random.key(7), shape), np.float64)
    key = jax.random.key(3)
    ours = jax.jit(lambda x_T, key: S.run(sched, optimal_eps_jax(sched.config), x_T, key, num_steps))(f32(x_T), key)

    ref = reference(name, SD_CONFIG, num_steps)
    feed = FeedNoise(monkeypatch, lambda i: np.asarray(jax.random.normal(jax.random.fold_in(key, i), shape), np.float64))
    eps = optimal_eps_torch(sched.config)
    x = f64(x_T) * float(ref.init_noise_sigma)
    for i, t in enumerate(ref.timesteps):
        feed.i = i
        x = ref.step(eps(ref.scale_model_input(x, t), t), t, x).prev_sample
    assert close(ours, x.numpy(), "loop") <= ATOL  # the final x is O(1): absolute tolerance


@pytest.mark.parametrize("name", ["dpmsolver++_karras", "sde-dpmsolver++_karras", "heun_karras", "unipc_karras"])
def test_karras_sample_loop_matches_diffusers_loop(name, monkeypatch):
    """"DPM++ 2M Karras" and friends: the whole 12-step loop as in test_sample_loop_matches_diffusers_loop."""
    base, num_steps, shape = name[:-len("_karras")], 12, (2, 4, 4, 3)
    sched = S.get_scheduler(name, SD_CONFIG)
    x_T = np.asarray(jax.random.normal(jax.random.key(7), shape), np.float64)
    key = jax.random.key(3)
    ours = jax.jit(lambda x_T, key: S.run(sched, optimal_eps_jax(sched.config), x_T, key, num_steps))(f32(x_T), key)
    ref = reference(base, {**SD_CONFIG, "use_karras_sigmas": True}, num_steps)
    noise_of = lambda i: np.asarray(jax.random.normal(jax.random.fold_in(key, i), shape), np.float64)  # noqa: E731
    feed = FeedNoise(monkeypatch, noise_of)
    eps = optimal_eps_torch(sched.config)
    x = f64(x_T) * float(ref.init_noise_sigma)
    for i, t in enumerate(ref.timesteps):
        feed.i = i
        x = ref.step(eps(ref.scale_model_input(x, t), t), t, x).prev_sample
    assert close(ours, x.numpy(), "loop") <= ATOL


@pytest.mark.parametrize("name,start", [("heun", 6), ("unipc", 3), ("unipc_karras", 4)])
def test_a_run_from_mid_grid_matches_diffusers_begin_index(name, start):
    """img2img starts a run at grid point ``start`` (diffusers: ``set_begin_index(t_start · order)``, Heun's order
    is 2); the multistep UniPC warms up again from order 1 without a corrector, as diffusers' fresh history."""
    base, num_steps, shape = name.removesuffix("_karras"), 10, (2, 4, 4, 3)
    config = {**SD_CONFIG, "use_karras_sigmas": name.endswith("_karras")}
    sched = S.get_scheduler(name, SD_CONFIG)
    x = np.asarray(jax.random.normal(jax.random.key(7), shape), np.float64)
    ours = S.run(sched, optimal_eps_jax(sched.config), f32(x), None, num_steps, start=start, x_is_noise=False)
    ref = reference(base, config, num_steps)
    ref.set_begin_index(start)
    eps, x = optimal_eps_torch(sched.config), f64(x)
    for t in ref.timesteps[start:]:
        x = ref.step(eps(ref.scale_model_input(x, t), t), t, x).prev_sample
    assert close(ours, x.numpy(), "loop") <= ATOL


# |Var(x_0)/s² − 1| measured at 50 steps (Stable Diffusion's config, s = 1): DDIM 5.2%, PNDM 0.1%, Euler 6.0%,
# DPM-Solver++(2M) 1.5% (its last step jumps from σ ≈ 0.12 to 0, x̂_0 = D(x), which shrinks by s²/(s² + σ²));
# at 100 steps 2.7%, 0.0%, 3.3%, 0.8%: the first-order solvers' error halves.
# UniPC 1.6% / 0.9%, DPM++ 2M Karras 0.26% / 0.01%, UniPC Karras 0.03% (Karras' grid spends its steps at small σ,
# where the last-step shrinkage comes from); Heun 0.39% at 50 steps (0.14% at 25, 0.51% at 100: its last step
# is an Euler step from σ(t = 0) ≈ 0.029 to 0 on every linspace grid, which floors the error, so no convergence
# check for it).
VARIANCE_BOUNDS_50 = {"ddim": 0.06, "pndm": 0.005, "euler": 0.07, "dpmsolver++": 0.02, "unipc": 0.02, "heun": 0.006,
                      "dpmsolver++_karras": 0.005, "unipc_karras": 0.001}


@pytest.mark.parametrize("name", list(VARIANCE_BOUNDS_50))
def test_deterministic_solvers_sample_the_data_variance(name):
    """With the optimal ε-model for x0 ~ N(0, s²) every step is linear in x, so x_0 = g·x_T and Var(x_0) = g²
    exactly (x_T ~ N(0, 1)); s = 1 is about the spread of SD's scaled latents. 50 steps give s² within a few %,
    and 100 steps come closer."""
    sched = S.get_scheduler(name, SD_CONFIG)
    eps_fn = optimal_eps_jax(sched.config)
    error = {n: abs(float(S.run(sched, eps_fn, jnp.ones((1, 1, 1, 1)), None, n).squeeze()) ** 2 / S_DATA**2 - 1)
             for n in (50, 100)}
    assert error[50] < VARIANCE_BOUNDS_50[name], error
    if name not in ("heun", "unipc_karras"):  # UniPC Karras: 0.03% at 50 steps, 0.06% at 100, both at its floor
        assert error[100] < error[50], error


@pytest.mark.full_optimization  # 40k samples × 100 steps: run-bound
def test_euler_ancestral_samples_the_data_variance():
    """Monte-Carlo, 40k samples (SE of the variance 0.7%): the ancestral (SDE) sampler is first order and needs
    more steps than the ODE solvers; measured Var/s² − 1: −10.6% at 50 steps, −6.0% at 100, −3.9% at 200."""
    sched = S.get_scheduler("euler_ancestral", SD_CONFIG)
    x_T = jax.random.normal(jax.random.key(0), (40_000, 1, 1, 1))
    error = {}
    for n in (50, 100):
        x0 = np.asarray(S.run(sched, optimal_eps_jax(sched.config), x_T, jax.random.key(1), n), np.float64)
        error[n] = abs(x0.var() / S_DATA**2 - 1)
        assert abs(x0.mean()) < 5 * S_DATA / np.sqrt(len(x0))
    assert error[50] < 0.13 and error[100] < error[50] - 0.02, error


# ------------------------------------------------------------------------------------------------
# Compilation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_new_conditioning_or_guidance_scale_does_not_retrace(name):
    """A stand-in for classifier-free guidance: the loop closes over (cond, g), passed to jit as arguments."""
    sched = S.get_scheduler(name, SD_CONFIG)
    traces = {"loop": 0, "model": 0}

    def model(x, t, cond, g):
        traces["model"] += 1  # runs only while JAX traces
        return g * x * cond + t.reshape(-1, 1, 1, 1) * 1e-4

    def run(cond, g, x_T, key):
        traces["loop"] += 1
        return S.run(sched, lambda x, t: model(x, t, cond, g), x_T, key, 8)

    run = jax.jit(run)
    x_T, key = jnp.ones((2, 2, 2, 1)), jax.random.key(0)
    a = run(jnp.full((1, 2, 2, 1), 0.1), 1.0, x_T, key)
    b = run(jnp.full((1, 2, 2, 1), 0.2), 7.5, x_T, key)
    assert traces == {"loop": 1, "model": 1}  # 8 (or 9) steps, one trace; new cond and g: no retrace
    assert not np.allclose(a, b)


# ------------------------------------------------------------------------------------------------
# Registry, configs and bad input
# ------------------------------------------------------------------------------------------------

def test_registry_names_and_diffusers_class_names(tmp_path):
    for name, cls in S.SCHEDULERS.items():
        assert isinstance(S.get_scheduler(name, SD_CONFIG), cls)
    for class_name, name in S.DIFFUSERS_CLASS_NAMES.items():
        assert type(S.get_scheduler(class_name)) is S.SCHEDULERS[name]
        assert DIFFUSERS[name].__name__ == class_name
    (tmp_path / "scheduler_config.json").write_text(json.dumps(SD_CONFIG))
    from_folder = S.get_scheduler(None, tmp_path)  # _class_name → PNDM
    assert isinstance(from_folder, S.PNDMScheduler)
    assert from_folder.config == S.PNDMConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                              steps_offset=1)
    euler = S.get_scheduler("euler", tmp_path / "scheduler_config.json")
    assert euler.config.timestep_spacing == "linspace"  # the config has none: the class's default, as diffusers
    assert S.get_scheduler("ddim", S.PNDMConfig(steps_offset=1)).config.steps_offset == 1  # another class's config


def test_names_set_what_they_name_and_class_names_take_the_config():
    dpm_config = {**SD_CONFIG, "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++",
                  "use_karras_sigmas": True}
    from_class = S.get_scheduler(None, dpm_config)          # diffusers' class + config: DPM++ 2M SDE Karras
    assert (from_class.config.algorithm_type, from_class.config.use_karras_sigmas) == ("sde-dpmsolver++", True)
    ode = S.get_scheduler("dpmsolver++", dpm_config)         # the short name sets the ODE, the config keeps Karras
    assert (ode.config.algorithm_type, ode.config.use_karras_sigmas) == ("dpmsolver++", True)
    sde = S.get_scheduler("sde-dpmsolver++_karras", SD_CONFIG)
    assert (sde.config.algorithm_type, sde.config.use_karras_sigmas) == ("sde-dpmsolver++", True)
    assert isinstance(S.get_scheduler(None, {**SD_CONFIG, "_class_name": "HeunDiscreteScheduler"}), S.HeunScheduler)
    assert isinstance(S.get_scheduler(None, {**SD_CONFIG, "_class_name": "UniPCMultistepScheduler"}),
                      S.UniPCMultistepScheduler)
    assert set(S.NAMES) == set(S.SCHEDULERS) | {n + "_karras" for n in KARRAS}
    assert S.get_scheduler("heun").config.beta_end == 0.012 and S.HeunConfig().beta_schedule == "linear"  # its defaults


def test_unknown_scheduler_lists_the_known_ones():
    known = (r"unknown scheduler 'lms'; known: ddim, pndm, euler, euler_ancestral, dpmsolver\+\+, sde-dpmsolver\+\+, "
             r"heun, unipc, ddpm, euler_karras, dpmsolver\+\+_karras, .* \(or diffusers' DDIMSch")
    with pytest.raises(ValueError, match=known):
        S.get_scheduler("lms")
    with pytest.raises(ValueError, match="unknown scheduler 'euler_ancestral_karras'"):  # diffusers has no such option
        S.get_scheduler("euler_ancestral_karras")
    with pytest.raises(ValueError, match="no name given"):
        S.get_scheduler(None, {"beta_schedule": "linear"})


@pytest.mark.parametrize("name,bad,match", [
    ("euler", {"use_exponential_sigmas": True}, "use_exponential_sigmas=True is not implemented"),
    ("heun", {"use_beta_sigmas": True}, "HeunConfig: use_beta_sigmas=True is not implemented"),
    ("unipc", {"solver_order": 3}, "UniPCConfig: unknown solver_order 3; valid choices: 1, 2"),
    ("unipc", {"predict_x0": False}, "predict_x0=False is not implemented"),
    ("unipc", {"disable_corrector": [0]}, r"disable_corrector=\[0\] is not implemented"),
    ("unipc", {"solver_type": "bh3"}, "unknown solver_type 'bh3'"),
    ("pndm", {"skip_prk_steps": False}, "skip_prk_steps=False is not implemented"),
    ("ddim", {"thresholding": True}, "thresholding=True is not implemented"),
    ("dpmsolver++", {"algorithm_type": "dpmsolver"},
     "DPMSolverConfig: unknown algorithm_type 'dpmsolver'; valid choices: 'dpmsolver\\+\\+', 'sde-dpmsolver\\+\\+'"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver"}, "unknown algorithm_type 'sde-dpmsolver'"),
    ("dpmsolver++", {"solver_order": 3}, "unknown solver_order 3"),
    ("ddim", {"timestep_spacing": "uniform"},
     "DDIMConfig: unknown timestep_spacing 'uniform'; valid choices: 'leading', 'trailing', 'linspace'"),
    ("euler", {"beta_schedule": "sigmoid"}, "unknown beta_schedule 'sigmoid'"),
    ("pndm", {"prediction_type": "sample"}, "unknown prediction_type 'sample'"),
])
def test_unsupported_or_unknown_options_are_one_line_errors(name, bad, match):
    with pytest.raises(ValueError, match=match):
        S.get_scheduler(name, {**SD_CONFIG, **bad})


def test_bad_num_steps_and_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 1000\]"):
        S.get_scheduler("euler", SD_CONFIG).set_timesteps(1001)
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 1000\]"):
        S.get_scheduler("dpmsolver++").init_state(0, jnp.zeros((1, 2)))
    dpm_leading = S.get_scheduler("dpmsolver++", {**SD_CONFIG, "timestep_spacing": "leading"})  # N + 1 parts, offset 1
    with pytest.raises(ValueError, match="num_steps=999 with steps_offset=1 gives timestep 1000 >= num_train_timesteps"):
        dpm_leading.set_timesteps(999)
    with pytest.raises(ValueError, match="gives timestep 1000"):
        S.get_scheduler("ddim", SD_CONFIG).set_timesteps(1000)
    with pytest.raises(FileNotFoundError, match="no scheduler config at"):
        S.get_scheduler("ddim", tmp_path)


def test_trained_betas_and_cosine_schedule_follow_diffusers():
    betas = np.linspace(1e-4, 0.03, 100)
    ours = S.get_scheduler("ddim", {"trained_betas": list(betas), "num_train_timesteps": 100})
    np.testing.assert_array_equal(ours.config.betas(), betas)
    ref = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2")
    np.testing.assert_allclose(S.DDIMConfig(beta_schedule="squaredcos_cap_v2").betas(), ref.betas.numpy(), rtol=1e-6)
    ref = diffusers.DDIMScheduler(num_train_timesteps=200)  # "linear" is not rescaled with T, unlike schedules.linear_betas
    np.testing.assert_allclose(S.DDIMConfig(num_train_timesteps=200).betas(), ref.betas.numpy(), rtol=1e-6)


SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}


@pytest.mark.parametrize("name,cls", [("ddim", "DDIMScheduler"), ("ddpm", "DDPMScheduler"),
                                      ("euler", "EulerDiscreteScheduler")])
def test_a_scheduler_configured_from_another_keeps_the_keys_the_first_did_not_use(name, cls):
    """SD v1's scheduler_config.json is PNDM's with ``clip_sample: false``, a key PNDM does not use. diffusers keeps
    it in the PNDM scheduler's config, so ``DDIMScheduler.from_config(pndm.config)`` does not clip; ours too
    (``SchedulerConfig.hidden``), also through a class that does not use it either (DDIM → Euler → DDIM)."""
    pndm = S.get_scheduler(None, SD15_SCHEDULER)
    ours = S.get_scheduler(name, pndm.config)
    theirs = getattr(diffusers, cls).from_config(diffusers.PNDMScheduler.from_config(SD15_SCHEDULER).config)
    for key in ("clip_sample", "set_alpha_to_one", "steps_offset", "beta_schedule", "beta_start", "beta_end"):
        if hasattr(ours.config, key):
            assert getattr(ours.config, key) == theirs.config[key], key
    assert ours.config.hidden.get("clip_sample", getattr(ours.config, "clip_sample", None)) is False
    again = S.get_scheduler("ddim", S.get_scheduler("euler", S.get_scheduler("ddim", pndm.config).config).config)
    assert again.config.clip_sample is False and again.config.set_alpha_to_one is False
