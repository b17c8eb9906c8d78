"""The training step runs the U-Net once on the whole batch, yet every random draw stays per example.

What makes that exact: ``loss_simple`` takes one key per example (example b's t, ε as for a batch of
one) and ``layers.ExampleDropout`` draws example b's mask from its own key. So the batched step equals
the per-example (vmapped) step it replaced; test_parallel.py checks it still equals itself over 8 devices
and under pmap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _training_fixtures import in_process_compilation_cache, tiny_config, tiny_images
from ddpm_jax import diffusion
from ddpm_jax.models.layers import ExampleDropout
from ddpm_jax.models.unet import UNet, UNetConfig
from ddpm_jax.schedules import get_schedule
from ddpm_jax.training import diffusion as diffusion_trainer
from ddpm_jax.training import loop

# Compile-bound (one or two steps of tiny programs; tests/conftest.py): measured under the same load, the step
# equality 86 → 44 s, the loss and dropout checks 11 → 4 s and 9 → 3 s without XLA's backend optimisation.
pytestmark = pytest.mark.fast_compile


@pytest.fixture(autouse=True)
def _compilation_cache():
    with in_process_compilation_cache():
        yield


def test_example_dropout_mask_depends_on_the_examples_own_key_only():
    x = jnp.ones((4, 6, 6, 8))                                               # [B, H, W, C]
    keys = jax.random.split(jax.random.key(0), 4)                             # [B]
    layer = ExampleDropout(0.25)
    drop = jax.jit(lambda x, k: layer.apply({}, x, k, deterministic=False))
    batch = drop(x, keys)
    alone = jnp.concatenate([drop(x[b:b + 1], keys[b:b + 1]) for b in range(4)])
    np.testing.assert_array_equal(batch, alone)                               # same mask alone or in a batch
    np.testing.assert_allclose(np.unique(np.asarray(batch)), [0.0, 1.0 / 0.75], rtol=1e-6)  # inverted dropout
    assert abs(float(jnp.mean(batch == 0)) - 0.25) < 0.05                     # 1152 draws: 4σ ≈ 0.05
    assert not np.array_equal(batch[0], batch[1])                             # examples differ
    np.testing.assert_array_equal(layer.apply({}, x, keys, deterministic=True), x)
    with pytest.raises(ValueError, match="one key per example"):
        layer.apply({}, x, keys[:3], deterministic=False)


def test_loss_simple_with_one_key_per_example_is_the_mean_of_the_batches_of_one():
    schedule = get_schedule("linear", 100)
    x0 = jax.random.normal(jax.random.key(0), (5, 4, 4, 2))
    keys = jax.random.split(jax.random.key(1), 5)
    model_fn = lambda x_t, t: 0.5 * x_t + 0.01 * t[:, None, None, None]
    loss = jax.jit(lambda x, k: diffusion.loss_simple(schedule, model_fn, x, k))
    batched = loss(x0, keys)
    per_example = [loss(x0[b:b + 1], keys[b]) for b in range(5)]
    np.testing.assert_allclose(batched, np.mean(per_example), rtol=1e-6)
    with pytest.raises(ValueError, match="4 keys for a batch of 5"):
        diffusion.loss_simple(schedule, model_fn, x0, keys[:4])


def _per_example_reference(model, schedule, params, x0, key, step):
    """The former step's numbers: each example's loss and gradient alone (the model on a batch of one, so
    this also checks that the U-Net with dropout_keys gives each example of a batch its own output)."""
    step_key = jax.random.fold_in(key, step)

    @jax.jit
    def example_loss_and_grad(params, x, i):
        flip_key, loss_key, dropout_key, _ = jax.random.split(jax.random.fold_in(step_key, i), 4)
        x = jnp.where(jax.random.bernoulli(flip_key), x[:, ::-1, :], x)

        def loss(params):
            model_fn = lambda x_t, t: model.apply({"params": params}, x_t, t, train=True,
                                                  dropout_keys=dropout_key[None])
            return diffusion.loss_simple(schedule, model_fn, x[None], loss_key)

        return jax.value_and_grad(loss)(params)

    losses, grads = zip(*(example_loss_and_grad(params, x0[i], i) for i in range(x0.shape[0])))
    return np.mean(losses), jax.tree.map(lambda *g: jnp.mean(jnp.stack(g), axis=0), *grads)


def test_batched_train_step_equals_the_per_example_step():
    config = tiny_config()                                                    # dropout 0.1, random flips
    model = UNet(UNetConfig(**config.model.to_dict()))
    schedule = get_schedule("linear", config.diffusion.num_timesteps)
    tx = loop.make_optimizer(config.train.lr, config.train.warmup_steps, config.train.grad_clip)
    state = diffusion_trainer.create_train_state(model, tx, jax.random.key(0), (1, 8, 8, 1))
    state = state.replace(step=jnp.asarray(3, jnp.int32))
    x0, key = jnp.asarray(tiny_images(n=8)), jax.random.key(7)
    _, metrics = jax.jit(diffusion_trainer.make_train_step(model, schedule, config))(state, x0, key)
    loss, grads = _per_example_reference(model, schedule, state.params, x0, key, state.step)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))),
                               rtol=1e-5)


def test_train_step_weights_the_loss_by_config_min_snr_gamma():
    """``config.diffusion.min_snr_gamma`` reaches the step: its loss is ``loss_simple(..., min_snr_gamma=γ)``
    on the examples' own (t, ε) keys, and it differs from the unweighted L_simple (γ = None or 0)."""
    config = tiny_config()
    config.data.random_flip, config.model.dropout = False, 0.0
    model = UNet(UNetConfig(**config.model.to_dict()))
    schedule = get_schedule("linear", config.diffusion.num_timesteps)
    tx = loop.make_optimizer(config.train.lr, config.train.warmup_steps, config.train.grad_clip)
    state = diffusion_trainer.create_train_state(model, tx, jax.random.key(0), (1, 8, 8, 1))
    x0, key = jnp.asarray(tiny_images(n=8)), jax.random.key(7)
    step_key = jax.random.fold_in(key, state.step)
    loss_keys = jnp.stack([jax.random.split(jax.random.fold_in(step_key, i), 4)[1] for i in range(8)])
    model_fn = lambda x_t, t: model.apply({"params": state.params}, x_t, t)
    losses = {}
    for gamma in (None, 0.0, 0.5):
        config.diffusion.min_snr_gamma = gamma
        _, metrics = jax.jit(diffusion_trainer.make_train_step(model, schedule, config))(state, x0, key)
        expected = diffusion.loss_simple(schedule, model_fn, x0, loss_keys, min_snr_gamma=gamma or None)  # 0: off
        np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
        losses[gamma] = float(metrics["loss"])
    assert losses[0.0] == losses[None]
    assert losses[0.5] < 0.9 * losses[None]                  # w_t = min(SNR, 0.5)/SNR < 1 for most t
    config.diffusion.min_snr_gamma = -1.0                     # a bad value: one line naming the config field
    with pytest.raises(ValueError, match="diffusion.min_snr_gamma") as info:
        jax.jit(diffusion_trainer.make_train_step(model, schedule, config))(state, x0, key)
    assert "\n" not in str(info.value)
