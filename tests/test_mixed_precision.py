"""bfloat16 against float32, module by module, with stated bounds (issue 15 item 3).

Training (``config.train.compute_dtype = "bfloat16"``, ``training/diffusion.compute_model``): the U-Net computes
in bf16, parameters / Adam state / EMA stay float32, the loss is reduced in float32. Inference
(bf16 weights and compute, what ``StableDiffusion(..., dtype="bf16")`` runs): the U-Net forward, the VAE decode
and the CLIP text encoder each against their float32 selves on the same (rounded) random weights.

The bounds are the measured errors (in the comments, this CPU) with a margin of about 2–3×: bf16 keeps 8 bits
of mantissa (relative rounding 2⁻⁹ ≈ 0.2% per operation), so relative errors of 0.5–3% through a few layers are
expected; an error of order 1 (a wrong cast, a float16 overflow, a bf16 reduction) fails them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _training_fixtures import in_process_compilation_cache, tiny_config, tiny_images
from ddpm_jax.models.clip import CLIPTextConfig, CLIPTextTransformer
from ddpm_jax.models.unet import UNet, UNetConfig
from ddpm_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from ddpm_jax.schedules import get_schedule
from ddpm_jax.training import diffusion as diffusion_trainer
from ddpm_jax.training import loop

pytestmark = pytest.mark.fast_compile  # one step / one call of tiny programs each


@pytest.fixture(autouse=True)
def _compilation_cache():
    with in_process_compilation_cache():
        yield


def _relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _cosine(a, b) -> float:
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]).astype(np.float64)
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)]).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _one_step(compute_dtype: str):
    """One training step of the tiny U-Net (dropout, flips, clipping) in ``compute_dtype``: (state, metrics)."""
    config = tiny_config(compute_dtype=compute_dtype)
    model = UNet(UNetConfig(**config.model.to_dict()))
    tx = loop.make_optimizer(config.train.lr, config.train.warmup_steps, config.train.grad_clip)
    state = diffusion_trainer.create_train_state(model, tx, jax.random.key(0), (1, 8, 8, 1))
    step = diffusion_trainer.make_train_step(model, get_schedule("linear", config.diffusion.num_timesteps), config)
    return jax.jit(step)(state, jnp.asarray(tiny_images(n=8)), jax.random.key(7))


def test_bfloat16_training_step_matches_float32_and_keeps_float32_state():
    (state32, m32), (state16, m16) = _one_step("float32"), _one_step("bfloat16")
    # Same draws (t, ε, flips, dropout masks): only the arithmetic differs. Measured: loss 1.4e-3 relative,
    # grad norm 2.0e-4 relative, gradient cosine 0.99997 (Adam's first moment after one step is (1−β₁)·g_clipped).
    assert abs(float(m16["loss"]) - float(m32["loss"])) < 5e-3 * float(m32["loss"])
    assert abs(float(m16["grad_norm"]) - float(m32["grad_norm"])) < 5e-3 * float(m32["grad_norm"])
    mu32, mu16 = (jax.tree.leaves(s.opt_state, is_leaf=lambda x: hasattr(x, "mu"))[0] for s in (state32, state16))
    assert _cosine(mu16.mu, mu32.mu) > 0.999
    floats = jax.tree.leaves((state16.params, state16.ema_params, state16.opt_state))
    assert {x.dtype for x in floats if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}


def test_bad_compute_dtype_is_one_clear_error():
    config = tiny_config(compute_dtype="float16")
    model = UNet(UNetConfig(**config.model.to_dict()))
    with pytest.raises(ValueError, match=r"train.compute_dtype must be one of \['bfloat16', 'float32'\], got 'float16'"):
        diffusion_trainer.make_train_step(model, get_schedule("linear", 100), config)


# SD v1's layout, tiny (as benchmarks/bench_stable_diffusion.py's "tiny"): cross-attention at one level, f = 2.
UNET = UNetConfig(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), mid_block_type="UNetMidBlock2DCrossAttn",
                  cross_attention_dim=32, num_attention_heads=2, norm_num_groups=16, norm_eps=1e-5,
                  flip_sin_to_cos=True, freq_shift=0, downsample_padding=1)
VAE = AutoencoderKLConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=16, sample_size=16)
TEXT = CLIPTextConfig(vocab_size=600, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                      num_attention_heads=2, eos_token_id=599)


def _random_params(module, *inputs):
    """Random float32 parameters without compiling ``init`` (host-side numpy, shapes from ``eval_shape``): kernels
    and embeddings N(0, 1/fan_in), norm scales 1 + N(0, 0.1²), biases N(0, 0.1²)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name, std = path[-1].key, 0.1
        if name in ("kernel", "embedding"):
            std = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.normal(1.0 if name == "scale" else 0.0, std, leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _bf16(module):
    return module.clone(**({"config": dataclasses.replace(module.config, dtype=jnp.bfloat16)}
                           if hasattr(module.config, "dtype") else {"dtype": jnp.bfloat16}))


def test_bfloat16_inference_per_module_within_stated_bounds():
    """bf16 weights and compute (what ``StableDiffusion(..., dtype="bf16")`` runs) against float32, same weights."""
    key = jax.random.split(jax.random.key(3), 3)
    z = jax.random.normal(key[0], (2, 8, 8, 4))                               # [B, h, w, 4] latents
    t = jnp.array([10, 700])
    context = jax.random.normal(key[1], (2, 7, 32))                           # [B, L, D_ctx]
    ids = jax.random.randint(key[2], (2, 16), 0, 599)                         # [B, T] token ids
    unet, vae, text = UNet(UNET), AutoencoderKL(VAE), CLIPTextTransformer(TEXT)
    calls = {  # module → (params, f(module, params))
        "unet": (_random_params(unet, z, t, context), lambda m, p: m.apply({"params": p}, z, t, context)),
        "vae": (_random_params(vae, jnp.zeros((1, 2, 2, 3))),
                lambda m, p: m.apply({"params": p}, z, method=AutoencoderKL.decode_latents)),
        "text": (_random_params(text, ids), lambda m, p: m.apply({"params": p}, ids).last_hidden_state),
    }
    errors = {}
    for (name, (params, call)), module in zip(calls.items(), (unet, vae, text)):
        half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
        run = lambda m, p: jax.jit(lambda p: call(m, p))(p)  # noqa: E731  (one program per module and dtype)
        errors[name] = _relative_error(run(_bf16(module), half), run(module, params))
    # Measured (relative L2 error, this CPU): U-Net ε 0.015, VAE decode 0.0084, CLIP last hidden state 0.010.
    assert errors["unet"] < 0.04 and errors["vae"] < 0.025 and errors["text"] < 0.03, errors
