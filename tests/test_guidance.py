"""Classifier-free guidance: Eq. 6 at w = 0 and 1, one batched call = two separate calls, no recompile
for a new w, use by the samplers, conditioning dropout's rate, and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import guidance
from ddpm_jax.guidance import drop_condition, guided_eps_fn, null_class_label, unet_guided_eps_fn, unet_model_fn
from ddpm_jax.models.unet import UNet, UNetConfig
from ddpm_jax.samplers import ddim_sample
from ddpm_jax.schedules import get_schedule

pytestmark = pytest.mark.fast_compile  # compile-bound: tiny programs, a few calls each (tests/conftest.py)

B, H, W, C = 3, 8, 8, 4


def toy_model_fn(x_t, t, cond):
    """A closed-form "network" whose output depends on x_t, t, a context [N, L, D] and labels [N]."""
    scale = 1.0 + cond["context"].mean(axis=(1, 2)) + 0.1 * cond["class_labels"]  # [N]
    return 0.5 * x_t * scale[:, None, None, None] + 1e-3 * t[:, None, None, None]


def _conditions(seed=0):
    rng = np.random.default_rng(seed)
    cond = {"context": jnp.asarray(rng.standard_normal((B, 5, 6)), jnp.float32), "class_labels": jnp.array([0, 1, 2])}
    uncond = {"context": jnp.zeros((1, 5, 6)), "class_labels": jnp.full((B,), 7)}  # a shared ∅ context
    return cond, uncond


def _x_t():
    return jax.random.normal(jax.random.key(0), (B, H, W, C)), jnp.array([10, 500, 999])


def test_scale_one_is_conditional_and_zero_is_unconditional():
    cond, uncond = _conditions()
    x, t = _x_t()
    expected_cond = toy_model_fn(x, t, cond)
    expected_uncond = toy_model_fn(x, t, jax.tree.map(lambda a: jnp.broadcast_to(a, (B,) + a.shape[1:]), uncond))
    np.testing.assert_allclose(guided_eps_fn(toy_model_fn, cond, uncond, 1.0)(x, t), expected_cond, atol=1e-6)
    np.testing.assert_allclose(guided_eps_fn(toy_model_fn, cond, uncond, 0.0)(x, t), expected_uncond, atol=1e-6)
    # w = 7.5 extrapolates beyond the conditional prediction (Eq. 6), and a scalar t is the whole batch's.
    guided = guided_eps_fn(toy_model_fn, cond, uncond, 7.5)(x, 500)
    t500 = jnp.full((B,), 500)
    e_c, e_u = toy_model_fn(x, t500, cond), toy_model_fn(x, t500, jax.tree.map(lambda a: jnp.broadcast_to(a, (B,) + a.shape[1:]), uncond))
    np.testing.assert_allclose(guided, e_u + 7.5 * (e_c - e_u), atol=1e-5)


def test_one_batched_call():
    calls = []

    def counting_model_fn(x_t, t, cond):
        calls.append(x_t.shape[0])
        return toy_model_fn(x_t, t, cond)

    cond, uncond = _conditions()
    guided_eps_fn(counting_model_fn, cond, uncond, 3.0)(*_x_t())
    assert calls == [2 * B]  # one call on the doubled batch


# A tiny text- and class-conditional U-Net with random weights (cheaper than init to compile).
TINY = UNetConfig(
    sample_size=8, in_channels=C, out_channels=C, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=6, num_attention_heads=2, norm_num_groups=8,
    num_class_embeds=4,
)  # fmt: skip


def _tiny_unet():
    unet = UNet(TINY)
    shapes = jax.eval_shape(unet.init, jax.random.key(0), *TINY.input_specs())["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)
    return unet, params


def test_unet_batched_equals_two_separate_calls_with_a_negative_prompt():
    unet, params = _tiny_unet()
    x, t = _x_t()
    cond, _ = _conditions()
    cond["class_labels"] = jnp.array([0, 1, 2])
    # A "negative prompt": an arbitrary context (and label) instead of the null one.
    negative = {"context": jax.random.normal(jax.random.key(3), (1, 5, 6)), "class_labels": jnp.array([3, 3, 3])}
    w = 4.0
    # Jitted (eager U-Net calls dispatch op by op: 3x slower on CPU); the two separate calls share one
    # compiled program, so the negative context [1, L, D] is broadcast to the batch for them.
    guided = jax.jit(unet_guided_eps_fn(unet, params, cond, negative, w))(x, t)
    apply = jax.jit(lambda c: unet.apply({"params": params}, x, t, **c))
    e_c = apply(cond)
    e_n = apply(dict(negative, context=jnp.broadcast_to(negative["context"], cond["context"].shape)))
    assert np.abs(e_c - e_n).mean() > 1e-2  # the two conditions really differ
    np.testing.assert_allclose(guided, e_n + w * (e_c - e_n), rtol=0, atol=2e-5)


def test_changing_the_scale_does_not_recompile_and_samplers_use_it():
    traces = []

    def traced_model_fn(x_t, t, cond):
        traces.append(1)  # runs once per trace, never at run time
        return toy_model_fn(x_t, t, cond)

    cond, uncond = _conditions()
    schedule = get_schedule("linear", 100)
    key = jax.random.key(1)

    @jax.jit
    def sample(w):
        return ddim_sample(guided_eps_fn(traced_model_fn, cond, uncond, w), schedule, (B, H, W, C), key, num_steps=4)

    samples = [sample(jnp.float32(w)) for w in (1.0, 3.0, 7.5)]
    assert len(traces) == 1
    assert np.abs(samples[0] - samples[2]).mean() > 1e-3  # w changes the result
    # At w = 1, guided sampling is conditional sampling.
    conditional = ddim_sample(lambda x, t: toy_model_fn(x, t, cond), schedule, (B, H, W, C), key, num_steps=4)
    np.testing.assert_allclose(samples[0], conditional, atol=1e-5)


def test_schedulers_use_it_with_float_timesteps():
    """schedulers.run (same eps_fn convention; Euler passes float t) with a traced scale."""
    from ddpm_jax.schedulers import get_scheduler, run

    traces = []

    def traced_model_fn(x_t, t, cond):
        traces.append(t.dtype)
        return toy_model_fn(x_t, t, cond)

    cond, uncond = _conditions()
    scheduler = get_scheduler("euler")
    x_T = jax.random.normal(jax.random.key(2), (B, H, W, C))
    guided = jax.jit(lambda w: run(scheduler, guided_eps_fn(traced_model_fn, cond, uncond, w), x_T, None, 3))
    first, second = guided(jnp.float32(1.0)), guided(jnp.float32(5.0))
    assert traces == [jnp.float32]  # one trace, float timesteps passed through
    conditional = run(scheduler, lambda x, t: toy_model_fn(x, t, cond), x_T, None, 3)
    np.testing.assert_allclose(first, conditional, atol=1e-4)
    assert np.all(np.isfinite(second)) and np.abs(second - first).mean() > 1e-3


def test_drop_condition_rate_and_pairing():
    n, p = 20_000, 0.1
    labels = jnp.arange(n) % 10
    dropped = drop_condition(jax.random.key(0), labels, null_class_label(10), p)
    rate = float(jnp.mean(dropped == 10))
    # Binomial(n, p)/n has standard deviation sqrt(p(1-p)/n) = 0.0021; allow 4.5 of them.
    assert abs(rate - p) < 4.5 * np.sqrt(p * (1 - p) / n)
    kept = dropped != 10
    np.testing.assert_array_equal(dropped[kept], labels[kept])  # the others are untouched
    assert dropped.dtype == labels.dtype
    # A context and a label drop together (one draw per example); the empty-prompt states [L, D] fill in.
    context = jax.random.normal(jax.random.key(1), (n, 3, 2)) + 5.0
    empty = jnp.zeros((1, 3, 2))
    out = drop_condition(jax.random.key(0), {"class_labels": labels, "context": context}, {"class_labels": 10, "context": empty}, p)
    np.testing.assert_array_equal(out["class_labels"], dropped)  # same key, same draws
    np.testing.assert_array_equal(jnp.all(out["context"] == 0.0, axis=(1, 2)), ~kept)
    assert jnp.all(drop_condition(jax.random.key(2), labels, 10, 0.0) == labels)
    assert jnp.all(drop_condition(jax.random.key(2), labels, 10, 1.0) == 10)
    # p can be a traced value.
    rate_jit = jax.jit(lambda p: jnp.mean(drop_condition(jax.random.key(0), labels, 10, p) == 10))(0.5)
    assert abs(float(rate_jit) - 0.5) < 4.5 * np.sqrt(0.25 / n)


def test_guidance_errors():
    cond, uncond = _conditions()
    for bad in (float("nan"), float("inf"), jnp.float32(-jnp.inf)):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
            guided_eps_fn(toy_model_fn, cond, uncond, bad)
    with pytest.raises(ValueError, match="guidance_scale must be a scalar"):
        guided_eps_fn(toy_model_fn, cond, uncond, jnp.ones(3))
    with pytest.raises(ValueError, match="cond and uncond must have the same structure"):
        guided_eps_fn(toy_model_fn, cond, {"context": uncond["context"]}, 2.0)
    with pytest.raises(ValueError, match="each cond entry needs a leading batch dimension 1 or 2"):
        guided_eps_fn(toy_model_fn, cond, uncond, 2.0)(jnp.zeros((2, H, W, C)), jnp.zeros(2, jnp.int32))

    unet, params = _tiny_unet()
    good = {"context": jnp.zeros((B, 5, 6)), "class_labels": jnp.array([0, 1, 2])}
    null = {"context": jnp.zeros((1, 5, 6)), "class_labels": jnp.full((B,), 3)}
    with pytest.raises(ValueError, match="class_labels must be in \\[0, 4\\) \\(num_class_embeds\\), got values from 4 to 4"):
        unet_guided_eps_fn(unet, params, good, dict(null, class_labels=jnp.full((B,), 4)), 2.0)
    with pytest.raises(ValueError, match="context has last dimension 5 but the U-Net's cross_attention_dim is 6"):
        unet_guided_eps_fn(unet, params, dict(good, context=jnp.zeros((B, 5, 5))), null, 2.0)
    with pytest.raises(ValueError, match="this U-Net has cross-attention"):
        unet_guided_eps_fn(unet, params, {"class_labels": good["class_labels"]}, {"class_labels": null["class_labels"]}, 2.0)
    with pytest.raises(ValueError, match="cond must be a dict with keys among \\('context', 'class_labels', 'text_embeds', 'time_ids'\\).*'labels'"):
        unet_guided_eps_fn(unet, params, {"labels": good["class_labels"]}, null, 2.0)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        unet_guided_eps_fn(unet, params, good, null, float("nan"))
    # Traced, not run (the batched test above runs it): an eager U-Net call costs ~20 s of CPU dispatch.
    assert jax.eval_shape(unet_model_fn(unet, params), *_x_t(), good).shape == (B, H, W, C)


def test_drop_condition_errors():
    labels = jnp.arange(4)
    key = jax.random.key(0)
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="the drop probability p must be in \\[0, 1\\]"):
            drop_condition(key, labels, 10, p)
    with pytest.raises(ValueError, match="null_cond of shape \\(7, 2\\) does not fit one example of cond, shape \\(3, 2\\)"):
        drop_condition(key, jnp.zeros((4, 3, 2)), jnp.zeros((7, 2)))
    with pytest.raises(ValueError, match="cond and null_cond must have the same structure"):
        drop_condition(key, {"class_labels": labels}, 10)
    with pytest.raises(ValueError, match="cond needs arrays with one leading batch dimension B"):
        drop_condition(key, {"a": labels, "b": jnp.zeros((3, 2))}, {"a": 0, "b": 0.0})
    with pytest.raises(ValueError, match="cond needs arrays with one leading batch dimension B"):
        drop_condition(key, jnp.int32(3), 10)
    assert guidance.null_class_label(10) == 10
