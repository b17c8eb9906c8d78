"""The U-Net and its layers: shapes, the DDPM parameter count, dropout, input errors."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models.layers import Attention, timestep_embedding
from ddpm_jax.models.unet import UNet, UNetConfig

# A tiny 2-level U-Net with attention everywhere, for the tests that really run the model.
TINY = UNetConfig(
    sample_size=8,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
    attention_head_dim=8,
    norm_num_groups=8,
)


def _shapes(config, x_shape, t_shape=None, **kw):
    """Params and output shapes without computing anything (jax.eval_shape)."""
    module = UNet(config)
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    t = jax.ShapeDtypeStruct(x_shape[:1] if t_shape is None else t_shape, jnp.int32)
    params = jax.eval_shape(module.init, jax.random.key(0), x, t)["params"]
    out = jax.eval_shape(lambda p, x, t: module.apply({"params": p}, x, t, **kw), params, x, t)
    return params, out


def _random_params(module, *args):
    """Random params of the right shapes; cheaper than module.init (whose initialisers compile slowly on CPU)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)


def test_ddpm_cifar10_has_35_7m_parameters():
    # Ho et al.'s 35.7M (Appendix B), as in google/ddpm-cifar10-32:
    #   conv_in 3.6k + timestep MLP 0.33M + conv_out 3.5k + output GroupNorm
    #   + down path 4 levels × 2 ResNets, 3 downsample convs, 2 attention blocks at 16×16    (≈ 9.9M)
    #   + mid block: 2 ResNets (256 ch, 1.31M each) and 1 attention block (0.26M)          (≈ 2.9M)
    #   + up path 4 levels × 3 ResNets on concatenated skips, 3 upsample convs, 3 attention blocks at 16×16 (≈ 22.6M)
    # (A 256-channel ResNet block: 2 convs 3×3×256×256 = 1.18M + time projection 512×256 + norms.)
    params, out = _shapes(UNetConfig.ddpm_cifar10(), (1, 32, 32, 3))
    assert sum(math.prod(p.shape) for p in jax.tree.leaves(params)) == 35_746_307
    assert out.shape == (1, 32, 32, 3) and out.dtype == jnp.float32


@pytest.mark.parametrize(
    "config, x_shape",
    [
        (UNetConfig.ddpm_cifar10(), (2, 32, 32, 3)),
        (UNetConfig.ddpm_cifar10(), (1, 64, 48, 3)),  # any size divisible by 2^(levels-1)
        (dataclasses.replace(TINY, in_channels=1, out_channels=2), (3, 8, 8, 1)),
        (dataclasses.replace(TINY, dtype=jnp.bfloat16), (2, 8, 16, 3)),  # bf16 compute, f32 output
    ],
)
def test_output_shape(config, x_shape):
    params, out = _shapes(config, x_shape)
    assert out.shape == x_shape[:3] + (config.out_channels,) and out.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_dropout_only_in_training():
    # One level, no attention: the cheapest U-Net to run (not jitted: compiling costs more here).
    config = dataclasses.replace(
        TINY, block_out_channels=(16,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), dropout=0.5
    )
    module = UNet(config)
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
    t = jnp.array([0, 999])
    params = _random_params(module, x, t)
    apply = module.apply
    evaluate = apply({"params": params}, x, t)
    np.testing.assert_array_equal(evaluate, apply({"params": params}, x, t))
    train = [apply({"params": params}, x, t, train=True, rngs={"dropout": jax.random.key(s)}) for s in (0, 0, 1)]
    np.testing.assert_array_equal(train[0], train[1])  # same key, same mask
    assert not np.allclose(train[0], train[2])  # new key, new mask
    assert not np.allclose(train[0], evaluate)
    # A scalar t means the same timestep for the whole batch.
    np.testing.assert_allclose(apply({"params": params}, x, 7), apply({"params": params}, x, jnp.array([7, 7])), atol=1e-6)


@pytest.mark.parametrize(
    "x_shape, t_shape, message",
    [
        ((2, 12, 16, 3), (2,), "divisible by 2\\^\\(levels-1\\) = 8"),  # ddpm_cifar10 has 4 levels
        ((2, 3, 32, 32), (2,), "3 channels|32 channels"),  # NCHW by mistake
        ((2, 32, 32, 1), (2,), "x has 1 channels but config.in_channels=3"),
        ((32, 32, 3), (32,), "must be \\[B, H, W, C\\]"),
        ((2, 32, 32, 3), (3,), "t must be a scalar or have shape \\[B\\]"),
        ((2, 32, 32, 3), (2, 1), "t must be a scalar or have shape \\[B\\]"),
    ],
)
def test_bad_inputs(x_shape, t_shape, message):
    with pytest.raises(ValueError, match=message):
        _shapes(UNetConfig.ddpm_cifar10(), x_shape, t_shape)


def test_bad_configs():
    with pytest.raises(ValueError, match="divisible by norm_num_groups=16 \\(not: \\[40\\]\\)"):
        dataclasses.replace(TINY, block_out_channels=(16, 40), norm_num_groups=16)
    with pytest.raises(ValueError, match="one entry per level"):
        dataclasses.replace(TINY, block_out_channels=(16, 32, 32))
    with pytest.raises(ValueError, match="unsupported block type 'SimpleCrossAttnDownBlock2D'"):
        dataclasses.replace(TINY, down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D"))
    with pytest.raises(ValueError, match="attention_head_dim=12"):
        dataclasses.replace(TINY, attention_head_dim=12)


@pytest.mark.parametrize("dim, flip, shift", [(8, False, 1), (9, True, 0)])
def test_timestep_embedding_formula(dim, flip, shift):
    t = np.array([0.0, 1.0, 999.0])
    half = dim // 2
    freqs = 10000.0 ** (-np.arange(half) / (half - shift))
    sin, cos = np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)
    expected = np.concatenate([cos, sin] if flip else [sin, cos], axis=1)
    if dim % 2:
        expected = np.pad(expected, ((0, 0), (0, 1)))
    np.testing.assert_allclose(timestep_embedding(t, dim, flip, shift), expected, atol=2e-4)


def test_attention_is_softmax_qkT_v_and_takes_a_context():
    """Cross-attention: 5 query tokens of 16 features attend to 7 context tokens of 12 features."""
    attention = Attention(query_dim=16, num_heads=2, head_dim=4)
    x, context = jax.random.normal(jax.random.key(0), (2, 5, 16)), jax.random.normal(jax.random.key(1), (2, 7, 12))
    params = _random_params(attention, x, context)
    out = attention.apply({"params": params}, x, context)
    assert out.shape == (2, 5, 16)

    dense = lambda name, a: a @ params[name]["kernel"] + params[name]["bias"]
    q, k, v = (dense(n, a).reshape(2, -1, 2, 4) for n, a in (("to_q", x), ("to_k", context), ("to_v", context)))
    weights = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(4.0), axis=-1)  # [B, heads, T, S]
    expected = dense("to_out_0", jnp.einsum("bhts,bshd->bthd", weights, v).reshape(2, 5, 8))
    np.testing.assert_allclose(out, expected, atol=1e-5)
