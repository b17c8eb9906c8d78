"""Rematerialisation (``UNetConfig.remat``): the same function, the same gradients, the same parameters.

``nn.remat`` only changes what the backward pass keeps and what it recomputes, so outputs and
gradients must equal the plain model's up to float rounding (bound 1e-6), and the
parameter tree must be identical (a checkpoint trained either way loads into the other).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models.unet import REMAT_POLICIES, UNet, UNetConfig, apply_with_attention_maps

pytestmark = pytest.mark.fast_compile  # compile-bound: tiny U-Nets, a few calls each (tests/conftest.py)

# Every kind of block in one tiny one-level U-Net: ResNet blocks with dropout (train mode, per-example keys),
# self-attention (the down level), cross-attention transformers (the up level and the mid block).
CONFIG = UNetConfig(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8,), layers_per_block=1,
                    down_block_types=("AttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                    mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=4, num_attention_heads=2,
                    norm_num_groups=4, cross_attention_dim=12, dropout=0.1)
NUM_BLOCKS = 1 + 1 + 2 + 2 + 1 + 2   # down: ResNet + self-attention; mid: 2 ResNets + transformer; up: 2 × 2


def _inputs(config, batch=2):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, 4, 4, config.in_channels)), jnp.float32)
    t = jnp.asarray([3, 700][:batch], jnp.int32)
    context = (jnp.asarray(rng.standard_normal((batch, 5, 12)), jnp.float32) if config.cross_attention_dim else None)
    return x, t, context


def _params(config, x, t, context):
    """Random parameters of the plain model's shapes (cheaper to compile than init)."""
    shapes = jax.eval_shape(UNet(config).init, jax.random.key(0), x, t, context)["params"]
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


def test_remat_gives_the_same_outputs_gradients_and_parameter_tree():
    config = CONFIG
    x, t, context = _inputs(config)
    params = _params(config, x, t, context)
    keys = jax.random.split(jax.random.key(2), x.shape[0])                   # per-example dropout keys

    def loss_and_grad(remat):
        model = UNet(dataclasses.replace(config, remat=remat))
        shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, context)["params"]
        assert jax.tree.structure(shapes) == jax.tree.structure(params)     # same names: checkpoints load
        assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(lambda p: p.shape, params)

        def loss(p):
            out = model.apply({"params": p}, x, t, context, train=True, dropout_keys=keys)
            return jnp.mean(out ** 2), out
        lowered = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params)
        barriers = lowered.as_text().count("optimization_barrier")              # jax.checkpoint's, one per block
        (value, out), grads = lowered.compile()(params)
        return barriers, value, out, grads

    plain, remat = loss_and_grad("none"), loss_and_grad("blocks")
    assert plain[0] == 0 and remat[0] == NUM_BLOCKS                                     # remat is really on
    np.testing.assert_allclose(remat[2], plain[2], atol=1e-6, rtol=0)                  # outputs
    np.testing.assert_allclose(remat[1], plain[1], atol=1e-6, rtol=0)                  # loss
    jax.tree.map(lambda g, h: np.testing.assert_allclose(g, h, atol=1e-6, rtol=1e-6), remat[3], plain[3])


def test_attention_maps_are_recorded_under_remat():
    x, t, context = _inputs(CONFIG, batch=1)
    params = _params(CONFIG, x, t, context)
    maps_of = lambda remat: jax.jit(lambda p: apply_with_attention_maps(  # noqa: E731
        UNet(dataclasses.replace(CONFIG, remat=remat)), p, x, t, context))(params)
    (out, maps), (out_r, maps_r) = maps_of("none"), maps_of("blocks")
    np.testing.assert_allclose(out_r, out, atol=1e-6, rtol=0)
    assert maps_r.keys() == maps.keys() and maps
    for name in maps:
        np.testing.assert_allclose(maps_r[name], maps[name], atol=1e-6, rtol=0)


def test_unknown_remat_is_one_clear_error():
    assert set(REMAT_POLICIES) == {"none", "blocks"}
    with pytest.raises(ValueError, match="remat must be one of .*'blocks'.* got 'all'"):
        UNetConfig(remat="all")
