"""The kernels written for speed equal the ones they replaced: ``layers.GroupNorm`` vs Flax's ``nn.GroupNorm``
and torch's ``group_norm``, and the fused ``dot_product_attention`` vs the explicit softmax(QKᵀ/√d)V of
``attention_probs`` (the path that returns the probabilities for attention maps)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models.layers import Attention, GroupNorm, attention_probs, dot_product_attention


def test_group_norm_equals_flax_forward_and_backward():
    shape, groups = (3, 6, 5, 32), 8                                          # NHWC
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), shape)             # mean 3, std 2: not centred
    params = {"scale": jax.random.normal(jax.random.key(1), shape[-1:]), "bias": jnp.arange(shape[-1]) * 0.1}
    ours, flax = GroupNorm(groups, epsilon=1e-6), nn.GroupNorm(groups, epsilon=1e-6)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(2), x)) == jax.tree.map(jnp.shape, flax.init(jax.random.key(2), x))
    out = lambda m: lambda p, x: m.apply({"params": p}, x)
    loss = lambda m: lambda p, x: jnp.sum(jnp.sin(out(m)(p, x)))
    both = jax.jit(lambda p, x: [(out(m)(p, x), jax.grad(loss(m), (0, 1))(p, x)) for m in (ours, flax)])
    (y_ours, g_ours), (y_flax, g_flax) = both(params, x)
    np.testing.assert_allclose(y_ours, y_flax, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_flax)):  # sums over many terms: 1e-5 of the largest
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_group_norm_equals_torch_and_keeps_bf16_output():
    torch = pytest.importorskip("torch")
    x = 3.0 + 2.0 * np.random.default_rng(0).standard_normal((2, 4, 4, 16)).astype(np.float32)   # NHWC
    gamma, beta = np.linspace(0.5, 1.5, 16, dtype=np.float32), np.linspace(-1, 1, 16, dtype=np.float32)
    ours = GroupNorm(4, epsilon=1e-6).apply({"params": {"scale": gamma, "bias": beta}}, x)
    ref = torch.nn.functional.group_norm(torch.from_numpy(x).permute(0, 3, 1, 2), 4, torch.from_numpy(gamma),
                                         torch.from_numpy(beta), eps=1e-6).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    bf16 = GroupNorm(4, dtype=jnp.bfloat16).apply({"params": {"scale": gamma, "bias": beta}}, x)
    assert bf16.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="16 channels do not split into num_groups=5"):
        GroupNorm(5).init(jax.random.key(0), x)


def test_fused_attention_equals_the_explicit_softmax_path_with_and_without_a_mask():
    q = jax.random.normal(jax.random.key(0), (2, 9, 2, 8))                    # [B, T, heads, d]
    k, v = (jax.random.normal(jax.random.key(i), (2, 5, 2, 8)) for i in (1, 2))  # [B, S, heads, d]
    mask = jnp.tril(jnp.ones((9, 5), bool))[None, None]                      # [1, 1, T, S]; every row keeps ≥ 1
    for m in (None, mask):
        explicit = jnp.einsum("bhts,bshd->bthd", attention_probs(q, k, m), v)
        np.testing.assert_allclose(dot_product_attention(q, k, v, m), explicit, atol=1e-5)
    # The module: storing the probabilities (the attention-map path) changes nothing in the output.
    layer = Attention(query_dim=16, num_heads=2, head_dim=8, sow_attention_probs=True)
    x, context = jax.random.normal(jax.random.key(3), (2, 9, 16)), jax.random.normal(jax.random.key(4), (2, 5, 12))
    params = layer.init(jax.random.key(5), x, context)
    both = jax.jit(lambda p: (layer.apply(p, x, context), layer.apply(p, x, context, mutable=["intermediates"])))
    fused, (with_maps, state) = both(params)
    np.testing.assert_allclose(fused, with_maps, atol=1e-5)
    assert jax.tree.leaves(state["intermediates"])[0].shape == (2, 2, 9, 5)
