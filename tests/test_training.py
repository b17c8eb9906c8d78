"""training.py in this (single-device) process: optimizer, EMA, the loop's outputs, overfitting, NaN stop.

Multi-device equivalence is in test_parallel.py; kill-and-resume in test_checkpoints_resume.py.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _training_fixtures import in_process_compilation_cache, tiny_config, tiny_images
from ddpm_jax import checkpoints, data, parallel
from ddpm_jax.training import diffusion as diffusion_trainer
from ddpm_jax.training import loop


@pytest.fixture(autouse=True)
def _compilation_cache():
    with in_process_compilation_cache():
        yield


# ------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------

def test_lr_warmup_is_linear_from_zero_as_in_ho_et_al():
    schedule = loop.make_lr_schedule(2e-4, 5000)
    np.testing.assert_allclose([schedule(0), schedule(2500), schedule(5000), schedule(800_000)],
                               [0.0, 1e-4, 2e-4, 2e-4], rtol=1e-6)
    assert float(loop.make_lr_schedule(1e-3, 0)(0)) == pytest.approx(1e-3)


def test_optimizer_clips_the_global_norm_before_adam():
    params = {"w": jnp.zeros(3)}
    grads = {"w": jnp.array([30.0, 40.0, 0.0])}  # norm 50
    tx = loop.make_optimizer(lr=1.0, warmup_steps=0, grad_clip=1.0)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    # Adam's first step is -lr · sign(g) whatever the scale; the clip shows in its first moment.
    np.testing.assert_allclose(state[1][0].mu["w"], 0.1 * np.array([0.6, 0.8, 0.0]), rtol=1e-5)
    np.testing.assert_allclose(updates["w"][:2], [-1.0, -1.0], rtol=1e-4)
    # No clipping: plain Adam.
    unclipped = loop.make_optimizer(lr=1.0, warmup_steps=0, grad_clip=None)
    _, s = unclipped.update(grads, unclipped.init(params), params)
    np.testing.assert_allclose(s[0].mu["w"], 0.1 * np.array([30.0, 40.0, 0.0]), rtol=1e-5)


def test_ema_decay_warmup():
    steps = jnp.arange(4)
    np.testing.assert_allclose(loop.ema_decay_at(steps, 0.999, warmup=False), [0.999] * 4)
    np.testing.assert_allclose(loop.ema_decay_at(steps, 0.999, warmup=True),
                               [1 / 10, 2 / 11, 3 / 12, 4 / 13], rtol=1e-6)
    assert float(loop.ema_decay_at(jnp.asarray(10**6), 0.999, warmup=True)) == np.float32(0.999)


def test_ema_update():
    ema = loop.ema_update({"a": jnp.ones(2)}, {"a": jnp.zeros(2)}, decay=0.9)
    np.testing.assert_allclose(ema["a"], [0.9, 0.9])


def test_unknown_parallel_mode_is_a_clear_error():
    config = tiny_config(parallel="vmap")
    with pytest.raises(ValueError, match="train.parallel"):
        diffusion_trainer.compile_train_step(None, None, config, parallel.make_mesh())


def test_load_params_without_checkpoint_says_train_first(tmp_path):
    with pytest.raises(FileNotFoundError, match="train first") as info:
        checkpoints.load_params(tmp_path / "run")
    assert str(tmp_path / "run") in str(info.value)
    assert checkpoints.latest_step(tmp_path / "run") is None


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

def test_train_overfits_eight_images_and_writes_its_outputs(tmp_path):
    config = tiny_config(num_steps=60, log_every=10, ckpt_every=30, sample_every=60)
    state = diffusion_trainer.train(config, tmp_path, images=tiny_images())

    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    assert set(records[0]) >= {"step", "loss", "grad_norm", "lr", "steps_per_sec"}
    assert records[-1]["loss"] < 0.5 * records[0]["loss"], [r["loss"] for r in records]
    assert records[-1]["lr"] == pytest.approx(config.train.lr)

    for name in ("config.json", "loss.png", "samples/step_0000060.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    assert int(state.step) == 60
    assert checkpoints.latest_step(tmp_path) == 60
    for ema, field in ((True, state.ema_params), (False, state.params)):
        loaded = checkpoints.load_params(tmp_path, ema=ema)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), loaded, field)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    get_batch = data.get_batch

    def poisoned(images, step, *args, **kwargs):
        batch = get_batch(images, step, *args, **kwargs)
        return batch * np.nan if step == 5 else batch

    monkeypatch.setattr(data, "get_batch", poisoned)
    config = tiny_config(num_steps=20, ckpt_every=2, log_every=100)
    with pytest.raises(FloatingPointError, match=r"at step 5\b"):
        diffusion_trainer.train(config, tmp_path, images=tiny_images())
    assert checkpoints.latest_step(tmp_path) == 4
    params = checkpoints.load_params(tmp_path, ema=False)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_training_from_a_lazy_image_folder_equals_training_on_the_float_array(tmp_path):
    """``data.name="folder:..."`` trains through ``data.open_dataset`` (uint8, decoded per batch, prefetched); the
    parameters equal, bit for bit, those of training on the same images materialised as one float32 array."""
    from PIL import Image

    folder = tmp_path / "pictures"
    folder.mkdir()
    for i, image in enumerate(tiny_images(8)):                        # [8, 8, 1] in {-1, 1} → 0 / 255 PNGs
        Image.fromarray(((image[..., 0] + 1) * 127.5).astype(np.uint8)).save(folder / f"{i}.png")
    config = tiny_config(num_steps=3, ckpt_every=3, log_every=3)
    config.data.name = f"folder:{folder}"
    lazy = diffusion_trainer.train(config, tmp_path / "lazy")
    array = diffusion_trainer.train(config, tmp_path / "array", images=data.load_dataset(config.data))
    np.testing.assert_array_equal(data.load_dataset(config.data), tiny_images(8))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), lazy.params, array.params)
