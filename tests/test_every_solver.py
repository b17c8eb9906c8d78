"""Every model can use every solver: the nine names of ``samplers.SAMPLERS`` through the CLI and the pipelines.

- an unconditional workdir (``ddpm-jax sample --workdir … --sampler X``),
- a class-conditional workdir trained for two steps (``--labels`` with guidance),
- a latent, text-conditional model (frozen AutoencoderKL + CLIP text tower, random weights) through
  ``pipelines.generate.generate``,
- a diffusers DDPM folder (``ddpm-jax sample --pretrained … --sampler X``).

Each run is checked for its shape, finiteness and determinism in the seed; that the solvers give different
samples shows the name really selects the solver. The solvers' numbers are checked against diffusers in
tests/test_schedulers.py; here it is the wiring.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _cli import run_cli
from _training_fixtures import tiny_config, tiny_images
from ddpm_jax import cli, samplers
from ddpm_jax import tokenizer as tok_lib
from ddpm_jax.diffusion_model import LatentCodec, TextEncoder
from ddpm_jax.models.clip import CLIPTextConfig, CLIPTextModelWithProjection
from ddpm_jax.models.unet import UNet, UNetConfig
from ddpm_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from ddpm_jax.pipelines import generate, training_data
from ddpm_jax.training import diffusion as diffusion_trainer
from ddpm_jax.workdir import diffusion_model_from_config

pytestmark = pytest.mark.fast_compile  # compile-bound: tiny programs, a few calls each (tests/conftest.py)

SOLVERS = ("ddpm", "ddim", "pndm", "euler", "euler_ancestral", "dpmsolver++", "sde-dpmsolver++", "heun", "unipc")
STEPS = 3
STOCHASTIC = ("ddpm", "euler_ancestral", "sde-dpmsolver++")  # the solvers that draw fresh noise z at every step


def test_the_nine_names():
    assert tuple(samplers.SAMPLERS) == SOLVERS
    assert "dpmsolver++_karras" in samplers.SAMPLER_NAMES and "heun_karras" in samplers.SAMPLER_NAMES


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """An unconditional and a class-conditional tiny workdir, two training steps each."""
    root = tmp_path_factory.mktemp("solvers")
    plain = tiny_config(num_steps=2, ckpt_every=2)
    diffusion_trainer.train(plain, root / "plain", images=tiny_images())
    labelled = tiny_config(num_steps=2, ckpt_every=2)
    labelled.model.num_class_embeds = 3
    labelled.condition = {"kind": "class", "num_classes": 2, "p_uncond": 0.2}
    data = training_data.DiffusionData({"x0": tiny_images(), "label": np.arange(8, dtype=np.int32) % 2},
                                       null_condition={"label": np.asarray(2, np.int32)},
                                       grid_condition={"label": np.arange(4, dtype=np.int32) % 2})
    diffusion_trainer.train(labelled, root / "class", data=data)
    return root


def sample_npz(capsys, args, out):
    status, stdout, stderr = run_cli(["sample", *args, "--num", "2", "--steps", str(STEPS), "--seed", "3",
                                      "--out", str(out)], capsys)
    assert status == 0, stderr
    return np.load(out)["images"]


@pytest.mark.parametrize("kind", ["plain", "class"])
def test_each_solver_samples_a_workdir_through_the_cli(workdirs, capsys, kind):
    extra = ["--labels", "0,1", "--guidance", "2"] if kind == "class" else []
    images = {}
    for name in SOLVERS:
        args = ["--workdir", str(workdirs / kind), "--sampler", name, *extra]
        images[name] = sample_npz(capsys, args, workdirs / f"{kind}_{name}.npz")
        assert images[name].shape == (2, 8, 8, 1) and images[name].dtype == np.uint8
        if name in STOCHASTIC:  # a deterministic solver's output is a function of the seeded x_T alone, so the
            # seed's determinism is shown by the solvers that also draw noise at every step
            again = sample_npz(capsys, args, workdirs / f"{kind}_{name}_again.npz")
            np.testing.assert_array_equal(images[name], again)
    # 8-bit grids of a two-step model saturate at 0/255, so two solvers can write the same bytes; that every
    # solver gives its own numbers is checked on float latents below
    assert len({images[name].tobytes() for name in SOLVERS}) > 1


def test_an_unknown_solver_is_one_line(workdirs, capsys):
    status, _, stderr = run_cli(["sample", "--workdir", str(workdirs / "plain"), "--sampler", "lms"], capsys)
    assert status == 2 and "invalid choice: 'lms'" in stderr
    for name in ("dpmsolver++_karras", "sde-dpmsolver++_karras", "heun_karras"):  # Karras variants are names too
        assert cli.build_parser().parse_args(["sample", "--workdir", "w", "--sampler", name]).sampler == name


@pytest.fixture(scope="module")
def text_latent_model(tmp_path_factory):
    """A latent text-to-image model with random weights: AutoencoderKL f = 4, a one-layer CLIP text tower."""
    folder = tmp_path_factory.mktemp("tok")
    tok_lib.train_tokenizer(["a thick seven", "a slanted two", "the number one"] * 5, folder, vocab_size=530)
    tokenizer = tok_lib.load_tokenizer(folder, context_length=8)
    text_cfg = CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=8, intermediate_size=16,
                              num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8, projection_dim=8,
                              eos_token_id=tokenizer.eos_token_id)
    clip = CLIPTextModelWithProjection(text_cfg)
    encoder = TextEncoder(tokenizer, clip, clip.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    ae = AutoencoderKL(dataclasses.replace(AutoencoderKLConfig.mnist_f4(), block_out_channels=(4, 4, 4),
                                           norm_num_groups=2, latent_channels=2))
    ae_params = jax.jit(ae.init)(jax.random.key(1), jnp.zeros((1, 32, 32, 1)))["params"]
    config = tiny_config()
    config.model.update(in_channels=2, out_channels=2, down_block_types=("CrossAttnDownBlock2D",),
                        up_block_types=("CrossAttnUpBlock2D",), mid_block_type="UNetMidBlock2DCrossAttn",
                        cross_attention_dim=8, num_attention_heads=2)
    config.condition = {"kind": "text"}
    config.latent = {"autoencoder": "unused: the codec is given"}
    config.sample = {"sampler": "ddim", "steps": STEPS, "eta": 0.0, "guidance": 2.0}
    unet = UNet(UNetConfig(**config.model.to_dict()))
    params = jax.jit(unet.init)(jax.random.key(2), jnp.zeros((1, 8, 8, 2)), jnp.zeros((1,), jnp.int32),
                                jnp.zeros((1, 8, 8)))["params"]
    return diffusion_model_from_config(config, unet, params, codec=LatentCodec(ae, ae_params), text_encoder=encoder,
                                       null_condition={"context": encoder([""])[0]})


def test_each_solver_generates_from_a_latent_text_model(text_latent_model):
    model = text_latent_model
    assert model.kind == "text" and not model.clip_denoised   # latents are not clipped to [-1, 1]
    images = {}
    for name in SOLVERS:
        out = generate.generate(model, prompts=["a thick seven", "a slanted two"], sampler=name, steps=STEPS, seed=1,
                                return_latents=True)
        assert out["images"].shape == (2, 32, 32, 1) and out["x0"].shape == (2, 8, 8, 2)
        assert np.all(np.isfinite(out["images"])) and np.all(np.abs(out["images"]) <= 1.0)
        calls = generate.model_calls(model, name, STEPS)
        assert out["model_inputs"].shape[0] == out["timesteps"].shape[0] == calls
        assert out["trajectory"].shape[0] == calls + 1
        images[name] = out["x0"]
    assert len({v.tobytes() for v in images.values()}) == len(SOLVERS)


def test_each_solver_samples_a_pretrained_ddpm_folder(tmp_path, capsys):
    from test_eval_cli import _save_ddpm_folder

    _save_ddpm_folder(tmp_path / "ddpm", layout="pipeline")
    images = {name: sample_npz(capsys, ["--pretrained", str(tmp_path / "ddpm"), "--sampler", name],
                               tmp_path / f"{name}.npz") for name in SOLVERS}
    assert all(v.shape == (2, 8, 8, 3) for v in images.values())
    assert len({v.tobytes() for v in images.values()}) > 1
