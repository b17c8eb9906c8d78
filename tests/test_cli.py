"""Tests for the config system (ddpm_jax.config), the experiment files and the ``ddpm-jax`` CLI.

The CLI tests run ``ddpm_jax.cli.main`` in-process. Training is faked with monkeypatch, and so is the
model for sampling (an ε-predictor returning zeros), so the real samplers, checkpoint lookup, file
writing and error handling are exercised in seconds.
"""

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from _cli import run_cli
from ddpm_jax import diffusion_model
from ddpm_jax.pipelines import generate
from ddpm_jax.training import diffusion as diffusion_trainer
from ddpm_jax.workdir import load_diffusion_model
from ddpm_jax import config as config_lib
from ddpm_jax import checkpoints
from ddpm_jax.models.unet import UNetConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
MNIST = str(ROOT / "experiments" / "mnist.py")
CIFAR = str(ROOT / "experiments" / "ddpm_cifar10.py")




# ---- config: loading and overrides ----------------------------------------------------------


def test_experiment_configs_build_their_models_and_cifar10_has_the_papers_numbers():
    for path in (MNIST, CIFAR):
        config = config_lib.load_config(path)
        assert set(config) == {"data", "model", "diffusion", "train", "sample"}
        unet = UNetConfig(**config.model.to_dict())
        assert unet.sample_size == config.data.image_size and unet.in_channels == config.data.channels
    c = config_lib.load_config(CIFAR)
    assert UNetConfig(**c.model.to_dict()) == UNetConfig.ddpm_cifar10()
    assert (c.data.name, c.data.image_size, c.data.random_flip) == ("tfds:cifar10", 32, True)
    assert (c.diffusion.schedule, c.diffusion.num_timesteps) == ("linear", 1000)
    t = c.train
    assert (t.batch_size, t.lr, t.warmup_steps, t.num_steps, t.ema_decay, t.grad_clip) == (
        128, 2e-4, 5000, 800_000, 0.9999, 1.0)
    assert c.model.dropout == 0.1


def test_overrides_parse_to_the_fields_types():
    c = config_lib.load_config(MNIST)
    config_lib.apply_overrides(c, [
        "train.num_steps=100", "train.lr=1", "model.dropout=0.1", "model.block_out_channels=(16, 32)",
        "data.name=tfds:fashion_mnist", "data.data_dir=/data/tfds", "data.random_flip=true",
    ])
    assert c.train.num_steps == 100
    assert c.train.lr == 1.0 and isinstance(c.train.lr, float)
    assert c.model.block_out_channels == (16, 32)
    assert c.data.name == "tfds:fashion_mnist" and c.data.data_dir == "/data/tfds"
    assert c.data.random_flip is True


@pytest.mark.parametrize("override, message", [
    ("train.num_step=5", "unknown config key 'train.num_step'; did you mean train.num_steps"),
    ("num_steps=5", "did you mean train.num_steps"),
    ("train=5", "is a group"),
    ("train.num_steps=1.5", "'train.num_steps' expects an int, got '1.5'"),
    ("train.lr=fast", "'train.lr' expects a float, got 'fast'"),
    ("model.block_out_channels=(32, 'x')", "expects a tuple of int"),
    ("data.random_flip=1", "expects a bool"),
    ("train.num_steps", "not of the form"),
])
def test_bad_overrides_raise_one_line_errors(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        config_lib.apply_overrides(config_lib.load_config(MNIST), [override])
    assert "\n" not in str(info.value)


def test_workdir_config_round_trip_restores_tuples(tmp_path):
    c = config_lib.load_config(MNIST)
    config_lib.save_config(c, tmp_path / config_lib.CONFIG_FILENAME)
    back = config_lib.load_workdir_config(tmp_path)
    assert back.model.block_out_channels == c.model.block_out_channels
    assert back.to_dict() == c.to_dict()


# ---- train ----------------------------------------------------------------------------------


def test_train_applies_overrides_and_calls_training(monkeypatch, tmp_path, capsys):
    seen = {}
    monkeypatch.setattr(diffusion_trainer, "train", lambda config, workdir, images=None: seen.update(c=config, w=workdir))
    status, out, _ = run_cli(["train", "--config", MNIST, "--workdir", str(tmp_path), "train.num_steps=7"], capsys)
    assert status == 0 and seen["w"] == str(tmp_path) and seen["c"].train.num_steps == 7
    assert "ddpm-jax sample --workdir" in out


@pytest.mark.parametrize("args, message", [
    (["train.num_step=1"], "unknown config key 'train.num_step'; did you mean train.num_steps, "),
    (["model.dropout=lots"], "'model.dropout' expects a float, got 'lots'"),
    (["data.name=tfds:mnist", "data.data_dir={tmp}"], "is not prepared in"),
    (["data.name=folder:{tmp}"], "contains no images"),
])
def test_train_bad_input_exits_2_with_one_line(args, message, tmp_path, capsys):
    args = [a.format(tmp=tmp_path) for a in args]
    status, _, err = run_cli(["train", "--config", MNIST, "--workdir", str(tmp_path / "w"), *args], capsys)
    assert status == 2
    assert err.startswith("ddpm-jax: error: ") and message in err and err.count("\n") == 1
    assert "Traceback" not in err


def test_train_missing_config_file_and_non_finite_loss(monkeypatch, tmp_path, capsys):
    status, _, err = run_cli(["train", "--config", str(tmp_path / "no.py"), "--workdir", str(tmp_path)], capsys)
    assert status == 2 and "does not exist" in err

    def diverge(config, workdir, images=None):
        raise FloatingPointError("loss is nan at step 3 (...); stopping")

    monkeypatch.setattr(diffusion_trainer, "train", diverge)
    status, _, err = run_cli(["train", "--config", MNIST, "--workdir", str(tmp_path)], capsys)
    assert status == 1 and err == "ddpm-jax: error: loss is nan at step 3 (...); stopping\n"


# ---- sample ---------------------------------------------------------------------------------


@pytest.fixture
def trained_workdir(tmp_path, monkeypatch):
    """A workdir with a small config.json, and a fake model (ε̂ = 0) behind the checkpoint."""
    c = config_lib.apply_overrides(config_lib.load_config(MNIST), [
        "data.image_size=8", "model.sample_size=8", "diffusion.num_timesteps=40", "sample.steps=4"])
    config_lib.save_config(c, tmp_path / config_lib.CONFIG_FILENAME)
    monkeypatch.setattr(checkpoints, "load_params", lambda workdir, ema=True, step=None: {})
    monkeypatch.setattr(diffusion_model.DiffusionModel, "unconditional_eps_fn",
                        lambda self, params=None: lambda x_t, t: 0.0 * x_t)
    return tmp_path


def test_sample_writes_grid_npz_and_trajectory(trained_workdir, capsys):
    out = trained_workdir / "s.png"
    status, stdout, _ = run_cli(["sample", "--workdir", str(trained_workdir), "--num", "5", "--out", str(out),
                                 "--npz", "--trajectory", "--batch-size", "4"], capsys)
    assert status == 0
    assert stdout.split() == [str(out), str(out.with_suffix(".npz")), str(trained_workdir / "s_trajectory.png")]
    arrays = np.load(out.with_suffix(".npz"))
    assert arrays["images"].shape == (5, 8, 8, 1) and arrays["images"].dtype == np.uint8
    assert arrays["trajectory"].shape == (5, 4, 8, 8, 1)  # x_T + 4 DDIM steps, first chunk of 4
    with Image.open(out) as im:
        assert im.mode == "L"


def test_sample_is_deterministic_in_the_seed(trained_workdir):
    model = load_diffusion_model(str(trained_workdir))
    a, _ = generate.sample_images(model, 3, seed=1)
    b, _ = generate.sample_images(model, 3, seed=1)
    c, _ = generate.sample_images(model, 3, seed=2, sampler="ddpm")
    np.testing.assert_array_equal(a, b)
    assert a.shape == c.shape == (3, 8, 8, 1) and not np.array_equal(a, c)


def test_sample_images_traces_eta_and_checks_it(trained_workdir):
    """DDIM's η is an argument of the compiled chunk sampler: every η shares one program, and it is used."""
    model = load_diffusion_model(str(trained_workdir))
    eta0, _ = generate.sample_images(model, 3, seed=1, sampler="ddim", eta=0.0)
    programs = len(model.compiled)
    eta1, _ = generate.sample_images(model, 3, seed=1, sampler="ddim", eta=1.0)
    assert len(model.compiled) == programs and not np.array_equal(eta0, eta1)
    np.testing.assert_array_equal(generate.sample_images(model, 3, seed=1, sampler="ddim", eta=0.0)[0], eta0)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\] \(0 = DDIM, 1 = DDPM-like\), got 1.5"):
        generate.sample_images(model, 3, sampler="ddim", eta=1.5)


def test_sample_npz_only_when_out_is_npz(trained_workdir, capsys):
    status, stdout, _ = run_cli(["sample", "--workdir", str(trained_workdir), "--num", "2",
                                 "--out", str(trained_workdir / "x.npz")], capsys)
    assert status == 0 and stdout.split() == [str(trained_workdir / "x.npz")]


def test_sample_missing_workdir_or_checkpoint_exits_2(tmp_path, capsys):
    status, _, err = run_cli(["sample", "--workdir", str(tmp_path / "nope")], capsys)
    assert status == 2 and "does not exist" in err and err.count("\n") == 1
    config_lib.save_config(config_lib.load_config(MNIST), tmp_path / config_lib.CONFIG_FILENAME)
    status, _, err = run_cli(["sample", "--workdir", str(tmp_path)], capsys)
    assert status == 2 and "no checkpoint" in err and err.count("\n") == 1


# ---- demo -----------------------------------------------------------------------------------


def test_demo_writes_and_prints_every_figure(trained_workdir, monkeypatch, capsys):
    def fake_train(config, workdir, images=None):
        assert images.shape == (8, 8, 8, 1)
        config_lib.save_config(config, pathlib.Path(workdir) / config_lib.CONFIG_FILENAME)
        (pathlib.Path(workdir) / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))

    monkeypatch.setattr(diffusion_trainer, "train", fake_train)
    workdir = trained_workdir / "demo"
    status, out, _ = run_cli(["demo", "--workdir", str(workdir), "data.image_size=8", "model.sample_size=8",
                              "data.num_examples=8", "diffusion.num_timesteps=40", "sample.steps=2"], capsys)
    assert status == 0
    for name in ("forward_process.png", "samples.png", "samples_trajectory.png", "loss.png"):
        assert (workdir / name).is_file() and str(workdir / name) in out
