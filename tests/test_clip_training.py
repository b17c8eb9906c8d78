"""Contrastive CLIP training (training/clip.py) on a tiny synthetic captioned dataset, and its metrics.

The dataset: 8×8 images with a bright block in one of four quadrants (label 0..3) and captions naming the
digit label and the quadrant, so image and caption carry the same information. Tiny towers (one layer,
width 16) keep each run to a few seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import jax
import ml_collections
import numpy as np
import pytest

from _training_fixtures import in_process_compilation_cache, subprocess_env
from ddpm_jax import checkpoints, cli
from ddpm_jax.training import clip as clip_trainer
from ddpm_jax.data import DIGIT_NAMES
from ddpm_jax.workdir import load_clip_model, load_clip_text

QUADRANTS = ("top left", "top right", "bottom left", "bottom right")


def tiny_dataset(n: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=n).astype(np.int32)
    images = np.full((n, 8, 8, 1), -1.0, np.float32)
    captions = []
    for i, label in enumerate(labels):
        r, c = divmod(int(label), 2)
        images[i, 4 * r: 4 * r + 4, 4 * c: 4 * c + 4] = rng.uniform(0.2, 1.0)
        form = ["a handwritten digit {name} in the {where}", "the number {digit}, {where}"][i % 2]
        captions.append(form.format(name=DIGIT_NAMES[label], digit=label, where=QUADRANTS[label]))
    return types.SimpleNamespace(images=images, labels=labels, captions=captions)


def tiny_config(**train) -> ml_collections.ConfigDict:
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=8)
    config = ml_collections.ConfigDict()
    config.data = ml_collections.ConfigDict(dict(image_size=8, layout="random", seed=0, num_held_out=16))
    config.tokenizer = ml_collections.ConfigDict(dict(path=None, vocab_size=600, context_length=12))
    config.model = ml_collections.ConfigDict(dict(
        text=dict(vocab_size=1, max_position_embeddings=12, eos_token_id=1, **tower),
        vision=dict(image_size=8, patch_size=4, num_channels=1, **tower),
        projection_dim=8, logit_scale_init_value=float(np.log(1 / 0.07))))
    config.train = ml_collections.ConfigDict(dict(
        batch_size=16, num_steps=30, lr=3e-3, warmup_steps=2, grad_clip=1.0, ema_decay=0.9, ema_warmup=True,
        seed=0, log_every=5, ckpt_every=15, keep_checkpoints=2, plot_every=15, num_plot=4, parallel="jit"))
    config.eval = ml_collections.ConfigDict(dict(templates=("a handwritten digit {name}", "the number {digit}"),
                                                 recall_ks=(1, 5)))
    config.train.update(train)
    return config


@pytest.fixture(scope="module", autouse=True)
def compilation_cache():
    with in_process_compilation_cache():
        yield


def _params(workdir, ema=False):
    return checkpoints.load_params(workdir, ema=ema)


def _metrics(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def test_loss_decreases_resumes_exactly_and_the_workdir_is_self_contained(tmp_path):
    dataset = tiny_dataset()
    workdir = tmp_path / "full"
    clip_trainer.train(tiny_config(), workdir, dataset=dataset)
    lines = _metrics(workdir)
    assert [l["step"] for l in lines] == list(range(5, 35, 5))
    assert {"loss", "accuracy", "logit_scale", "grad_norm", "lr", "steps_per_sec"} <= set(lines[0])
    assert lines[-1]["loss"] < 0.7 * lines[0]["loss"], [l["loss"] for l in lines]
    for name in ("config.json", "eval.json", "tokenizer/vocab.json", "tokenizer/merges.txt", "loss.png",
                 "similarity.png", "similarity/step_0000015.png", "similarity/step_0000030.png"):
        assert (workdir / name).is_file(), name

    # Stopped at 15 (a checkpoint), then the same command again: the same parameters as without a stop.
    clip_trainer.train(tiny_config(num_steps=15), tmp_path / "split", dataset=dataset)
    clip_trainer.train(tiny_config(), tmp_path / "split", dataset=dataset)
    for ema in (False, True):
        jax.tree.map(np.testing.assert_array_equal, _params(tmp_path / "split", ema), _params(workdir, ema))
    assert [l["step"] for l in _metrics(tmp_path / "split")] == [l["step"] for l in lines]

    record = json.loads((workdir / "eval.json").read_text())
    assert record["step"] == 30 and record["num_images"] == 16
    for key in ("zero_shot_accuracy", "zero_shot_accuracy_first_template", "text_to_image_recall@1",
                "text_to_image_recall@5"):
        assert 0.0 <= record[key] <= 1.0
    assert record["text_to_image_recall@5"] >= record["text_to_image_recall@1"]
    assert record == json.loads((tmp_path / "split" / "eval.json").read_text())

    # The text side, as the text-to-image pipeline will load it, equals the full model's text tower.
    text_model, text_params, tokenizer = load_clip_text(workdir)
    model, params, tokenizer2, config = load_clip_model(workdir)
    assert config.model.text.vocab_size == tokenizer.vocab_size and tokenizer.context_length == 12
    ids = tokenizer(["a handwritten digit two", "the number 3, bottom right"])
    out = text_model.apply({"params": text_params}, ids)
    assert out.last_hidden_state.shape == (2, 12, 16) and out.embeds.shape == (2, 8)
    expected = model.apply({"params": params}, ids, method=type(model).encode_text)
    np.testing.assert_allclose(out.embeds, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(tokenizer2(["x"]), tokenizer(["x"]))


def test_non_finite_loss_stops_before_saving(tmp_path):
    dataset = tiny_dataset()
    dataset.images[:] = np.nan
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        clip_trainer.train(tiny_config(), tmp_path, dataset=dataset)
    assert checkpoints.latest_step(tmp_path) is None


def test_bad_configs(tmp_path):
    dataset = tiny_dataset()
    with pytest.raises(ValueError, match="patch_size=3 does not divide the image size 8"):
        config = tiny_config()
        config.model.vision.patch_size = 3
        clip_trainer.train(config, tmp_path / "a", dataset=dataset)
    with pytest.raises(ValueError, match="train.parallel='pmap'.*use 'jit'"):
        clip_trainer.train(tiny_config(parallel="pmap"), tmp_path / "b", dataset=dataset)
    with pytest.raises(ValueError, match=r"asks for \[N, 16, 16, 1\]"):
        config = tiny_config()
        config.data.image_size = 16
        clip_trainer.train(config, tmp_path / "c", dataset=dataset)
    with pytest.raises(FileNotFoundError, match="no tokenizer/ folder"):
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "config.json").write_text(tiny_config().to_json())
        load_clip_text(tmp_path / "d")


# ------------------------------------------------------------------------------------------------
# Metrics, by hand
# ------------------------------------------------------------------------------------------------


def test_zero_shot_accuracy_by_hand():
    classes = np.eye(4)                                          # class c's embedding: axis c
    labels = np.array([0, 1, 2, 3, 3])
    aligned = 5.0 * classes[labels] + 0.1                        # scaled, shifted a little: same argmax
    assert clip_trainer.zero_shot_accuracy(aligned, classes, labels) == 1.0
    assert clip_trainer.zero_shot_accuracy(aligned, classes, np.array([0, 1, 2, 0, 0])) == 0.6
    # Prompt ensembling: the mean of each class's normalised prompt embeddings, renormalised.
    prompts = np.array([[1.0, 0.0], [3.0, 3.0], [0.0, 2.0], [0.0, -1.0]])  # class-major, 2 templates each
    expected = np.array([[1 + 1 / np.sqrt(2), 1 / np.sqrt(2)], [0.0, 0.0]])
    expected[0] /= np.linalg.norm(expected[0])
    got = clip_trainer.class_embeddings(prompts, 2)
    np.testing.assert_allclose(got[0], expected[0])
    assert clip_trainer.class_prompts(("a {name}", "the {digit}"), ("zero", "one")) == [
        "a zero", "the 0", "a one", "the 1"]


def test_recall_at_k_by_hand():
    targets = np.eye(4)
    # query 0 → target 0 first; query 1 ranks its match 2nd; query 2 3rd; query 3 last (4th).
    queries = np.array([[1.0, 0.1, 0.0, 0.0],
                        [0.9, 0.5, 0.0, 0.0],
                        [0.9, 0.8, 0.5, 0.0],
                        [0.9, 0.8, 0.7, 0.1]])
    assert clip_trainer.recall_at_k(queries, targets, (1, 2, 3, 4)) == {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}
    tied = np.array([[1.0, 1.0, 0.0, 0.0]] * 4)                  # ties count against the match
    assert clip_trainer.recall_at_k(tied, targets, (1, 2)) == {1: 0.0, 2: 0.5}


def test_cli_train_tokenizer(tmp_path, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(tiny_dataset().captions) + "\n\n")
    assert cli.main(["train-tokenizer", "--captions", str(captions), "--out", str(tmp_path / "tok"),
                     "--vocab-size", "600"]) == 0
    assert "64 captions ->" in capsys.readouterr().out
    assert (tmp_path / "tok" / "merges.txt").is_file()
    with pytest.raises(SystemExit) as err:
        cli.main(["train-tokenizer", "--captions", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t2")])
    assert err.value.code == 2
    assert "neither 'mnist_bundled' nor a text file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        cli.main(["train-clip", "--config", "experiments/clip_mnist.py", "--workdir", str(tmp_path / "w"),
                  "train.nope=1"])
    assert err.value.code == 2 and "unknown config key 'train.nope'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# 8 simulated devices: the sharded step equals the single-device step
# ------------------------------------------------------------------------------------------------

SHARDED = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from test_clip_training import tiny_config, tiny_dataset
    from ddpm_jax import parallel, tokenizer
    from ddpm_jax.training import clip as clip_trainer, loop
    from ddpm_jax.workdir import clip_config
    assert jax.device_count() == 8, jax.devices()
    dataset = tiny_dataset()
    tok = tokenizer.train_tokenizer(dataset.captions, {folder!r}, vocab_size=600)
    tok = tokenizer.load_tokenizer({folder!r}, context_length=12)
    config = clip_trainer.resolve_config(tiny_config(), tok)
    model = clip_trainer.CLIPModel(clip_config(config))
    # Plain SGD: Adam divides by sqrt(v), which turns the ~1e-9 float noise in gradients that are exactly
    # zero in exact arithmetic (the attention key biases: softmax ignores a constant per row) into
    # lr-sized steps of either sign; with SGD the comparison sees the step's gradients themselves.
    import optax
    tx = optax.sgd(0.5)
    ids = tok(dataset.captions)
    results = {{}}
    for name, devices in (("single", jax.devices()[:1]), ("sharded", jax.devices())):
        mesh = parallel.make_mesh(devices)
        state = jax.device_put(clip_trainer.create_train_state(model, tx, jax.random.key(0)),
                               parallel.replicated_sharding(mesh))
        step = loop.compile_step(clip_trainer.make_train_step(model, config), mesh)
        for s in range(2):
            batch = {{"images": parallel.shard_batch(dataset.images[16 * s: 16 * s + 16], mesh),
                      "input_ids": parallel.shard_batch(ids[16 * s: 16 * s + 16], mesh)}}
            state, metrics = step(state, batch, jax.random.key(0))
        results[name] = (jax.tree.map(np.asarray, jax.device_get(state.params)), float(metrics["loss"]))
    single, sharded = results["single"][0], results["sharded"][0]
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)))
    initial = clip_trainer.create_train_state(model, tx, jax.random.key(0)).params
    changed = max(float(np.max(np.abs(a - np.asarray(b)))) for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(initial)))
    json.dump({{"diff": diff, "changed": changed, "losses": [results["single"][1], results["sharded"][1]]}},
              open({out!r}, "w"))
""")


def test_sharded_step_equals_single_device_step(tmp_path):
    out = tmp_path / "result.json"
    script = SHARDED.format(tests=os.path.dirname(os.path.abspath(__file__)), folder=str(tmp_path / "tok"),
                            out=str(out))
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["changed"] > 1e-3                               # two steps did move the parameters
    assert result["diff"] <= 1e-5, result                         # 8 devices == 1 device
    assert abs(result["losses"][0] - result["losses"][1]) <= 1e-5
