"""Class- and context-conditional diffusion training (training.py + pipelines.py) on tiny configs."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddpm_jax import checkpoints
from ddpm_jax.pipelines import generate, training_data
from ddpm_jax.training import diffusion as diffusion_trainer
from ddpm_jax.training import loop
from ddpm_jax.models.unet import UNet, UNetConfig
from ddpm_jax.schedules import get_schedule
from ddpm_jax.workdir import load_diffusion_model
from _training_fixtures import in_process_compilation_cache, tiny_config, tiny_images

# Compile-bound but for the two training runs (tests/conftest.py): measured under the same load, the dropout and
# guidance-sweep tests 46 → 18 s and 46 → 16 s without XLA's backend optimisation; the text-conditional run
# 19 → 44 s (its 20 steps run longer unoptimised), so the runs keep full optimisation.
pytestmark = pytest.mark.fast_compile

NUM_CLASSES = 10


def class_config(**train):
    config = tiny_config(**train)
    config.model.num_class_embeds = NUM_CLASSES + 1
    config.condition = ml_collections.ConfigDict(dict(kind="class", num_classes=NUM_CLASSES, p_uncond=0.25))
    config.sample.guidance = 2.0
    return config


def text_config(**train):
    config = tiny_config(**train)
    config.model.update(down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=6, num_attention_heads=2)
    config.condition = ml_collections.ConfigDict(dict(kind="text", p_uncond=0.25))
    return config


def class_data(n=8):
    labels = np.arange(n, dtype=np.int32) % NUM_CLASSES
    return training_data.DiffusionData({"x0": tiny_images(n), "label": labels},
                                   null_condition={"label": np.asarray(NUM_CLASSES, np.int32)},
                                   grid_condition={"label": np.arange(4, dtype=np.int32)},
                                   grid_titles=["0", "1", "2", "3"])


def context_data(n=8):
    rng = np.random.default_rng(0)
    return training_data.DiffusionData({"x0": tiny_images(n), "context": rng.normal(size=(n, 5, 6)).astype(np.float32)},
                                   null_condition={"context": np.zeros((5, 6), np.float32)},
                                   grid_condition={"context": rng.normal(size=(4, 5, 6)).astype(np.float32)})


@pytest.fixture(autouse=True)
def _compilation_cache():
    with in_process_compilation_cache():  # the three runs below compile the same step: compile once
        yield


@pytest.mark.full_optimization
def test_class_conditional_run_trains_samples_and_resumes_exactly(tmp_path):
    config = class_config(num_steps=8, ckpt_every=4, sample_every=8)
    full = diffusion_trainer.train(config, tmp_path / "full", data=class_data())
    assert (tmp_path / "full" / "samples" / "step_0000008.png").is_file()       # guided sample grid
    losses = [json.loads(l)["loss"] for l in open(tmp_path / "full" / "metrics.jsonl")]
    assert all(np.isfinite(losses))

    diffusion_trainer.train(class_config(num_steps=4, ckpt_every=4, sample_every=8), tmp_path / "split", data=class_data())
    resumed = diffusion_trainer.train(config, tmp_path / "split", data=class_data())
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.full_optimization
def test_text_conditional_run_trains_and_samples(tmp_path):
    state = diffusion_trainer.train(text_config(num_steps=3, ckpt_every=3, sample_every=3), tmp_path, data=context_data())
    assert (tmp_path / "samples" / "step_0000003.png").is_file()
    assert "attn2" in str(jax.tree.structure(state.params))                     # cross-attention was trained
    assert checkpoints.latest_step(tmp_path) == 3


def test_conditioning_dropout_is_per_example_and_uses_the_null_condition():
    """p_uncond = 1 trains only the unconditional model: the result must not depend on the labels."""
    config = class_config()
    config.condition.p_uncond = 1.0
    model = UNet(UNetConfig(**config.model.to_dict()))
    schedule = get_schedule("linear", 100)
    step = jax.jit(diffusion_trainer.make_train_step(model, schedule, config, null_condition={"label": NUM_CLASSES}))
    tx = loop.make_optimizer(1e-3, 0, 1.0)
    state = diffusion_trainer.create_train_state(model, tx, jax.random.key(0), (1, 8, 8, 1),
                                        condition={"class_labels": jnp.zeros((1,), jnp.int32)})
    x = jnp.asarray(tiny_images(8))
    key = jax.random.key(1)
    _, m_a = step(state, {"x0": x, "label": jnp.zeros(8, jnp.int32)}, key)
    _, m_b = step(state, {"x0": x, "label": jnp.full(8, 2, jnp.int32)}, key)
    assert float(m_a["loss"]) == float(m_b["loss"])
    config.condition.p_uncond = 0.0
    step = jax.jit(diffusion_trainer.make_train_step(model, schedule, config, null_condition={"label": NUM_CLASSES}))
    _, m_a = step(state, {"x0": x, "label": jnp.zeros(8, jnp.int32)}, key)
    _, m_b = step(state, {"x0": x, "label": jnp.full(8, 2, jnp.int32)}, key)
    assert float(m_a["loss"]) != float(m_b["loss"])


def test_bad_input_gives_one_line_errors(tmp_path):
    config = class_config()
    config.model.in_channels = 3
    with pytest.raises(ValueError, match="have 1 channels but model.in_channels=3"):
        diffusion_trainer.train(config, tmp_path, data=class_data())
    config = class_config()
    data = class_data()
    data.arrays["label"][0] = NUM_CLASSES + 5
    with pytest.raises(ValueError, match="class"):
        diffusion_trainer.train(config, tmp_path, data=data)
    config = text_config()
    data = context_data()
    data.arrays["context"] = data.arrays["context"][..., :4]
    with pytest.raises(ValueError, match="cross_attention_dim is 6"):
        diffusion_trainer.train(config, tmp_path, data=data)
    with pytest.raises(ValueError, match="no null_condition"):
        diffusion_trainer.make_train_step(UNet(UNetConfig(**class_config().model.to_dict())), get_schedule("linear", 100),
                                 class_config())(None, {"x0": jnp.zeros((2, 8, 8, 1)), "label": jnp.zeros(2)},
                                                 jax.random.key(0))
    config = class_config()
    config.condition.kind = "caption"
    with pytest.raises(ValueError, match="condition.kind must be"):
        training_data.load_training_data(config)
    assert checkpoints.latest_step(tmp_path) is None


def test_generation_guidance_sweep_and_its_errors(tmp_path, monkeypatch):
    """generate.generate on a trained class-conditional workdir (compiled once for every seed and w); the judged
    guidance sweep writes its files."""
    from ddpm_jax.evaluation import conditional, judge as judge_lib

    diffusion_trainer.train(class_config(num_steps=2, ckpt_every=2), tmp_path / "run", data=class_data())
    model = load_diffusion_model(tmp_path / "run")
    assert model.kind == "class" and int(model.null_condition["label"]) == NUM_CLASSES
    traces = []
    traced = generate.guided_sample
    monkeypatch.setattr(generate, "guided_sample", lambda *args: traces.append(1) or traced(*args))  # at trace time
    a = generate.generate(model, labels=[1, 2], guidance_scale=1.0, steps=3, seed=0)["images"]
    b = generate.generate(model, labels=[1, 2], guidance_scale=1.0, steps=3, seed=0)["images"]
    c = generate.generate(model, labels=[1, 2], guidance_scale=4.0, steps=3, seed=0)["images"]
    generate.generate(model, labels=[3, 4], guidance_scale=2.0, steps=3, seed=1)
    d = generate.generate(model, labels=[1, 2], guidance_scale=1.0, steps=3, seed=0, sampler="ddim", eta=0.0)["images"]
    e = generate.generate(model, labels=[1, 2], guidance_scale=1.0, steps=3, seed=0, sampler="ddim", eta=1.0)["images"]
    assert len(traces) == 1                                           # another seed, w, label or η: no retrace
    assert np.abs(d - e).max() > 1e-4                                                   # η changes the samples
    assert a.shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(a, b)                                          # seed → identical images
    assert np.abs(a - c).max() > 1e-4                                           # w changes the samples
    with pytest.raises(ValueError, match="class"):
        generate.generate(model, labels=[NUM_CLASSES + 1], steps=2)
    with pytest.raises(ValueError, match="finite"):
        generate.generate(model, labels=[1], guidance_scale=float("nan"), steps=2)
    with pytest.raises(ValueError, match="give class labels"):
        generate.generate(model, prompts=["a seven"], steps=2)

    judge = judge_lib.train_judge(8, seed=0, num_steps=30, progress=False)
    sweep = conditional.guidance_sweep(model, scales=(0.0, 2.0), per_class=2, steps=2, judge=judge, progress=False)
    assert [r["guidance"] for r in sweep["rows"]] == [0.0, 2.0]
    assert all(0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["classifier_fid"]) for r in sweep["rows"])
    written = conditional.save_sweep(sweep, tmp_path / "run")
    assert {p.name for p in written} == {"guidance_sweep.json", "guidance_sweep.png", "guidance_sweep_w0.png",
                                         "guidance_sweep_w2.png"}
    assert json.loads((tmp_path / "run" / "guidance_sweep.json").read_text())["rows"][1]["guidance"] == 2.0
