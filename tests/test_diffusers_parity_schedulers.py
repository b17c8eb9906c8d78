"""Parity with diffusers' DDPMScheduler and DDIMScheduler (PyTorch), for every schedule and every timestep.

Reference precision. diffusers keeps ᾱ_t in float32 and recomputes β_t = 1 − ᾱ_t/ᾱ_{t−1} in float32 inside
``step``; at small t that subtraction cancels ~4 digits (β_1 = 1e-4), so float32 diffusers is itself off by
up to ~3e-4 there; and its float32 β_T = 0.999 (cosine) makes 1 − β_T wrong by 3e-5 relative. We therefore
run diffusers' own step code in float64, with ᾱ_t = cumprod(1 − β_t) from the exact float64 β_t, as the
reference, and require our float32 results to match it to 1e-5 max abs. The schedules themselves are
compared with diffusers' float32 arrays directly (test_schedule_matches_diffusers).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ddpm_jax import diffusion as D  # noqa: E402
from ddpm_jax.samplers import ddim_sample  # noqa: E402
from ddpm_jax.schedulers import spaced_timesteps  # noqa: E402
from ddpm_jax.schedules import BETA_FUNCTIONS, extract, get_schedule  # noqa: E402

T = 1000
SCHEDULES = {  # ours -> (diffusers beta_schedule, diffusers kwargs)
    "linear": ("linear", {}),
    "cosine": ("squaredcos_cap_v2", {}),
    "scaled_linear": ("scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
}
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
ATOL = 1e-5


def make_scheduler(cls, name, float64=True, **kw):
    beta_schedule, schedule_kw = SCHEDULES[name]
    sched = cls(num_train_timesteps=T, beta_schedule=beta_schedule, **schedule_kw, **kw)
    if float64:
        betas64 = torch.from_numpy(BETA_FUNCTIONS[name](T, **schedule_kw))
        np.testing.assert_allclose(betas64.numpy(), sched.betas.numpy(), rtol=1e-6)  # the same schedule
        sched.alphas_cumprod = torch.cumprod(1 - betas64, dim=0)
        sched.one = torch.tensor(1.0, dtype=torch.float64)                  # DDPMScheduler's ᾱ_0
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)  # DDIMScheduler's, set_alpha_to_one
    return sched


def inputs(name, timesteps, seed=0, shape=(4, 4, 3), prediction="eps"):
    """x_t ~ q(x_t | x0) and a model output near the true ε (or x0, v), so that x̂0 is sometimes clipped.

    Float64 numpy arrays holding float32 values, so that both sides see exactly the same inputs."""
    rng = np.random.default_rng(seed)
    n = len(timesteps)
    x0 = rng.uniform(-1, 1, (n, *shape))
    eps = rng.standard_normal((n, *shape))
    s = get_schedule(name, T)
    x_t = np.asarray(D.q_sample(s, jnp.asarray(x0, jnp.float32), jnp.asarray(timesteps), jnp.asarray(eps, jnp.float32)), np.float64)
    target = {"eps": eps, "x0": x0,
              "v": np.asarray(D.v_from_x0_eps(s, jnp.asarray(x0, jnp.float32), jnp.asarray(timesteps), jnp.asarray(eps, jnp.float32)))}
    model_output = target[prediction] + 0.3 * rng.standard_normal((n, *shape))
    noise = rng.standard_normal((n, *shape))
    x0, eps, x_t, model_output, noise = (a.astype(np.float32).astype(np.float64) for a in (x0, eps, x_t, model_output, noise))
    return s, x0, eps, x_t, model_output, noise


f32 = lambda a: jnp.asarray(a, jnp.float32)
f64 = lambda a: torch.from_numpy(np.asarray(a, np.float64))


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_matches_diffusers(name):
    ref = make_scheduler(diffusers.DDPMScheduler, name, float64=False)
    s = get_schedule(name, T)
    np.testing.assert_allclose(s.betas, ref.betas.numpy(), rtol=1e-6)
    # diffusers' cumprod runs in float32 (relative error grows with t); ours in float64
    np.testing.assert_allclose(s.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=2e-5)


@pytest.mark.parametrize("name", SCHEDULES)
def test_q_sample_and_v_match_add_noise_and_get_velocity(name):
    ref = make_scheduler(diffusers.DDPMScheduler, name, float64=False)  # float32 is accurate here
    t = np.arange(T)
    s, x0, eps, _, _, _ = inputs(name, t)
    x_t = D.q_sample(s, f32(x0), jnp.asarray(t), f32(eps))
    x_t_ref = ref.add_noise(torch.from_numpy(x0).float(), torch.from_numpy(eps).float(), torch.from_numpy(t))
    assert np.abs(np.asarray(x_t) - x_t_ref.numpy()).max() <= ATOL
    v = D.v_from_x0_eps(s, f32(x0), jnp.asarray(t), f32(eps))
    v_ref = ref.get_velocity(torch.from_numpy(x0).float(), torch.from_numpy(eps).float(), torch.from_numpy(t))
    assert np.abs(np.asarray(v) - v_ref.numpy()).max() <= ATOL


DDPM_CASES = ([(name, var, clip, "eps") for name in SCHEDULES for var in ("fixed_small", "fixed_large") for clip in (True, False)]
              + [(name, "fixed_small", True, pred) for name in SCHEDULES for pred in ("x0", "v")])


@pytest.mark.parametrize("name,variance,clip,prediction", DDPM_CASES)
def test_p_sample_matches_ddpm_scheduler_step(name, variance, clip, prediction):
    """Algorithm 2, one step, at all 1000 timesteps. diffusers draws z from a generator; we seed it per
    timestep and draw the same z again for our p_sample."""
    ref = make_scheduler(diffusers.DDPMScheduler, name, variance_type=variance, clip_sample=clip,
                         prediction_type=PREDICTION_TYPES[prediction])
    t = np.arange(T)
    s, _, _, x_t, model_output, _ = inputs(name, t, prediction=prediction)
    prev_ref, x0_ref, noise = [], [], []
    for i in t:
        out = ref.step(f64(model_output[i:i + 1]), int(i), f64(x_t[i:i + 1]), generator=torch.Generator().manual_seed(int(i)))
        prev_ref.append(out.prev_sample.numpy())
        x0_ref.append(out.pred_original_sample.numpy())
        noise.append(torch.randn((1, *x_t.shape[1:]), generator=torch.Generator().manual_seed(int(i)), dtype=torch.float64).numpy())
    prev_ref, x0_ref, noise = (np.concatenate(a) for a in (prev_ref, x0_ref, noise))

    kw = dict(prediction=prediction, variance=variance, clip_denoised=clip)
    prev = D.p_sample(s, f32(model_output), f32(x_t), jnp.asarray(t), f32(noise), **kw)
    assert np.abs(np.asarray(prev) - prev_ref).max() <= ATOL
    x0_hat = D.p_mean_variance(s, f32(model_output), f32(x_t), jnp.asarray(t), **kw).x0_hat
    # x̂0 = x_t/√ᾱ_t − √(1/ᾱ_t − 1) ε̂ cancels digits: float32 rounding grows by 1/√ᾱ_t (up to 2e4 for cosine)
    tol = ATOL * np.asarray(s.sqrt_recip_alphas_cumprod)[:, None, None, None]
    assert np.all(np.abs(np.asarray(x0_hat) - x0_ref) <= tol)


DDIM_CASES = ([(name, clip, eta, "eps") for name in SCHEDULES for clip in (True, False) for eta in (0.0, 0.5, 1.0)]
              + [(name, True, 0.5, pred) for name in SCHEDULES for pred in ("x0", "v")])


@pytest.mark.parametrize("name,clip,eta,prediction", DDIM_CASES)
def test_ddim_step_matches_ddim_scheduler_step(name, clip, eta, prediction):
    """DDIM Eq. 12 at every timestep of a 50-step schedule (and ᾱ = 1 after the last), with the same z."""
    ref = make_scheduler(diffusers.DDIMScheduler, name, clip_sample=clip, prediction_type=PREDICTION_TYPES[prediction])
    ref.set_timesteps(50)
    t = ref.timesteps.numpy()
    s, _, _, x_t, model_output, noise = inputs(name, t, seed=1, prediction=prediction)
    prev_ref = np.concatenate([
        ref.step(f64(model_output[i:i + 1]), int(ti), f64(x_t[i:i + 1]), eta=eta, variance_noise=f64(noise[i:i + 1])).prev_sample.numpy()
        for i, ti in enumerate(t)])
    prev = D.ddim_step(s, f32(model_output), f32(x_t), jnp.asarray(t), jnp.asarray(t - T // 50), f32(noise),
                       eta=eta, prediction=prediction, clip_denoised=clip)
    assert np.abs(np.asarray(prev) - prev_ref).max() <= ATOL


@pytest.mark.parametrize("num_train_timesteps,num_steps", [(1000, 1), (1000, 3), (1000, 7), (1000, 50), (1000, 999),
                                                           (1000, 1000), (200, 30)])
def test_ddim_timesteps_match_set_timesteps(num_train_timesteps, num_steps):
    ref = diffusers.DDIMScheduler(num_train_timesteps=num_train_timesteps)
    ref.set_timesteps(num_steps)
    np.testing.assert_array_equal(spaced_timesteps(num_train_timesteps, num_steps, "leading"), ref.timesteps.numpy())


@pytest.mark.parametrize("name", SCHEDULES)
def test_ddim_sample_chain_matches_diffusers_loop(name):
    """The whole 50-step DDIM chain (η = 0, clipping on) from the same x_T with the same analytic ε-model."""
    sigma2 = 0.25
    s = get_schedule(name, T)

    def eps_fn(x_t, t):  # the optimal ε for x0 ~ N(0, 0.25 I)
        ab = extract(s.alphas_cumprod, t, x_t.shape)
        return jnp.sqrt(1 - ab) * x_t / (ab * sigma2 + 1 - ab)

    x_T = np.random.default_rng(2).standard_normal((4, 4, 4, 3))

    ours = ddim_sample(eps_fn, s, x_T.shape, jax.random.key(0), num_steps=50, x_T=f32(x_T))

    ref = make_scheduler(diffusers.DDIMScheduler, name)
    ref.set_timesteps(50)
    x = f64(x_T)
    for t in ref.timesteps:
        ab = ref.alphas_cumprod[t]
        x = ref.step((1 - ab).sqrt() * x / (ab * sigma2 + 1 - ab), t, x).prev_sample
    assert np.abs(np.asarray(ours) - x.numpy()).max() <= ATOL


# ------------------------------------------------------------------------------------------------
# schedulers.DDPMScheduler (Algorithm 2, respaced for N < T) against diffusers' DDPMScheduler.step
# ------------------------------------------------------------------------------------------------

DDPM_GRIDS = {"all": (T, {}), "leading50": (50, {"steps_offset": 1}), "trailing50": (50, {"timestep_spacing": "trailing"})}


@pytest.mark.parametrize("grid", list(DDPM_GRIDS))
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
@pytest.mark.parametrize("prediction", list(PREDICTION_TYPES))
def test_ddpm_scheduler_step_matches_diffusers(grid, variance_type, prediction, monkeypatch):
    """Every step of a grid, on random (x, model output) with the same injected noise, to ATOL = 1e-5 max abs
    against diffusers' float64 step (ᾱ from the exact float64 β's, see the module docstring). Ours is built from
    the library's own Schedule (get_schedule("linear")), so this also checks that those ᾱ's are the ones used.

    The one expected difference (schedulers.DDPMScheduler's docstring): with "fixed_large" on a grid whose last
    point τ > 0, diffusers' last step adds √β' z, β' = 1 − ᾱ_τ; Algorithm 2 adds no noise at its last step."""
    from diffusers.schedulers import scheduling_ddpm

    from ddpm_jax import schedulers as S

    num_steps, config = DDPM_GRIDS[grid]
    ref = make_scheduler(diffusers.DDPMScheduler, "linear", variance_type=variance_type, clip_sample=True,
                         prediction_type=PREDICTION_TYPES[prediction], **config)
    ref.set_timesteps(num_steps)
    ours = S.get_scheduler("ddpm", {**config, "variance_type": variance_type}, schedule=get_schedule("linear", T),
                           prediction=prediction, clip_sample=True)
    np.testing.assert_array_equal(ours.set_timesteps(num_steps), ref.timesteps.numpy())
    state = ours.init_state(num_steps, jnp.zeros((1, 4, 4, 3)))
    t = ref.timesteps.numpy()
    _, _, _, x_t, model_output, _ = inputs("linear", t, seed=3, prediction=prediction)
    key = jax.random.key(5)
    noise = np.asarray(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), x_t.shape[1:]))(
        jnp.arange(len(t))), np.float64)[:, None]                                   # [N, 1, 4, 4, 3]
    fed = iter(noise)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: f64(next(fed)))
    step = jax.jit(lambda mo, i, x: ours.step(state, mo, i, x, jax.random.fold_in(key, i))[0])
    worst = 0.0
    for i, ti in enumerate(t):
        expected = ref.step(f64(model_output[i:i + 1]), int(ti), f64(x_t[i:i + 1])).prev_sample.numpy()
        got = np.asarray(step(f32(model_output[i:i + 1]), i, f32(x_t[i:i + 1])), np.float64)
        if i == len(t) - 1 and ti > 0 and variance_type == "fixed_large":  # diffusers' extra last-step noise
            expected = expected - np.sqrt(1 - ref.alphas_cumprod[int(ti)].item()) * noise[i]
        worst = max(worst, np.abs(got - expected).max())
    assert worst <= ATOL, worst
