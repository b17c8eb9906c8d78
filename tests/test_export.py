"""`ddpm-jax export` (pretrained/export.py): each exported folder loads back here into the same parameters,
loads in diffusers / transformers with no missing or unexpected key, and computes what we compute.

The workdirs are real ones written through ``checkpoints.Checkpointer`` (config.json + an orbax
checkpoint with raw and EMA parameters), from random parameters with every leaf perturbed (so that no
zero- or one-initialised norm or bias can hide a mapping bug), instead of a few training steps.
"""

from __future__ import annotations

import json
from typing import Any

import functools
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import struct, traverse_util

from _cli import run_cli
from _training_fixtures import in_process_compilation_cache, tiny_config
from ddpm_jax import checkpoints, cli
from ddpm_jax import config as config_lib
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.models.clip import CLIPModel
from ddpm_jax.models.unet import UNet, UNetConfig
from ddpm_jax.models.vae import AutoencoderKL
from ddpm_jax.pretrained.convert import export_state_dict, random_params, torch_key
from ddpm_jax.pretrained.diffusers import load_ddpm_folder, load_unet, load_vae
from ddpm_jax.pretrained.export import export_run, save_unet
from ddpm_jax.pretrained.transformers_clip import load_clip
from ddpm_jax.pipelines.generate import generate, load_pretrained_ddpm
from ddpm_jax.pipelines.stable_diffusion import StableDiffusion
from ddpm_jax.tokenizer import load_tokenizer, train_tokenizer

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

NUM_CLASSES = 3
ATOL = 1e-4
RAW_PARAMS: dict[str, Any] = {}  # workdir → its raw (non-EMA) params


@pytest.fixture(scope="module", autouse=True)
def compilation_cache():
    """The workdir and its export sample the same program: compiled once, then a cache hit."""
    with in_process_compilation_cache():
        yield


def _apply(module, *args, method=None, **kwargs):
    """``module.apply`` compiled as one program (on 2 busy cores much faster than op by op)."""
    return jax.jit(functools.partial(module.apply, method=method))(*args, **kwargs)


@struct.dataclass
class SavedState:
    """What a trainer's TrainState saves (step, params, EMA params), for Checkpointer.save."""

    step: Any
    params: Any
    ema_params: Any


def _write_workdir(path, config: ml_collections.ConfigDict, *example_inputs) -> Any:
    """A workdir holding ``config`` and one checkpoint (raw ≠ EMA params); returns the EMA params (the raw
    ones go to ``RAW_PARAMS[str(path)]``, for the ``--raw`` test)."""
    config_lib.save_config(config, path / config_lib.CONFIG_FILENAME)
    module = _module(config, path)
    raw, ema = (random_params(module, *example_inputs, seed=seed, spread=0.2) for seed in (1, 2))
    ckpt = checkpoints.Checkpointer(path, save_every=1)
    ckpt.save(SavedState(step=np.int32(1), params=raw, ema_params=ema), force=True)
    ckpt.close()
    RAW_PARAMS[str(path)] = raw
    return ema


def _module(config, path):
    """The module ``workdir.load_run`` will build for ``config`` (an AutoencoderKL run also gets its eval.json)."""
    kind = workdir_lib.run_kind(config)
    if kind == "diffusion":
        return UNet(workdir_lib.unet_config(config))
    if kind == "autoencoder_kl":
        (path / workdir_lib.EVAL_FILENAME).write_text(json.dumps({"scaling_factor": 0.7}))
        return AutoencoderKL(workdir_lib.autoencoder_kl_config(config))
    return CLIPModel(workdir_lib.clip_config(config))


def _assert_same_params(got, expected):
    got, expected = traverse_util.flatten_dict(got), traverse_util.flatten_dict(expected)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(expected[key]), err_msg="/".join(key))


def _diffusion_config(class_conditional: bool) -> ml_collections.ConfigDict:
    """The unconditional run: two levels (down/upsampling), multi-head attention, cosine β's, v-prediction,
    fixed_large; the class-conditional one (sampled and compared with diffusers, so kept cheap to compile):
    one level with attention, linear β's rescaled by 1000/T."""
    config = tiny_config()
    config.model.update(add_attention=True, attention_head_dim=4)
    config.diffusion.num_timesteps = 40
    config.sample.steps = 3
    if class_conditional:
        config.model.update(down_block_types=("AttnDownBlock2D",), up_block_types=("AttnUpBlock2D",),
                            num_class_embeds=NUM_CLASSES + 1)
        config.condition = ml_collections.ConfigDict(dict(kind="class", num_classes=NUM_CLASSES, p_uncond=0.2))
    else:
        config.model.update(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                            up_block_types=("AttnUpBlock2D", "UpBlock2D"))
        config.diffusion.update(schedule="cosine", prediction="v", variance="fixed_large")
    return config


def _pixel_export(tmp_path_factory, conditional: bool) -> tuple[Any, Any, Any, bool]:
    """(workdir, exported folder, EMA params, class-conditional?) of a tiny pixel DDPM."""
    root = tmp_path_factory.mktemp("class" if conditional else "unconditional")
    work, out = root / "run", root / "export"
    work.mkdir()
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    labels = jnp.zeros((1,), jnp.int32) if conditional else None
    ema = _write_workdir(work, _diffusion_config(conditional), x, t, None, labels)
    assert cli.main(["export", "--workdir", str(work), "--out", str(out)]) == 0
    return work, out, ema, conditional


@pytest.fixture(scope="module")
def unconditional_export(tmp_path_factory):
    return _pixel_export(tmp_path_factory, conditional=False)


@pytest.fixture(scope="module")
def class_export(tmp_path_factory):
    return _pixel_export(tmp_path_factory, conditional=True)


@pytest.mark.parametrize("run", ["unconditional_export", "class_export"])
def test_pixel_ddpm_export_round_trips_and_loads_in_diffusers(run, request):
    """ours → export → our loader: identical params, and the same DiffusionModel as the workdir's (schedule,
    prediction, variance, clipping, condition and ∅), so any sampler gives the same samples; diffusers loads
    the folder with no missing, unexpected or mis-shaped key and the same ᾱ's."""
    work, out, ema, conditional = request.getfixturevalue(run)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
    _, params, _ = load_ddpm_folder(out)
    _assert_same_params(params, ema)
    trained, pretrained = workdir_lib.load_diffusion_model(work), load_pretrained_ddpm(out)
    for name in ("x0_shape", "prediction", "variance", "clip_denoised", "kind"):
        assert getattr(pretrained, name) == getattr(trained, name), name
    assert pretrained.unet.config == trained.unet.config
    for name in ("betas", "alphas_cumprod", "posterior_variance"):
        np.testing.assert_array_equal(getattr(pretrained.schedule, name), getattr(trained.schedule, name))
    assert pretrained.null_condition.keys() == trained.null_condition.keys()
    for key, value in trained.null_condition.items():
        np.testing.assert_array_equal(pretrained.null_condition[key], value)

    unet, info = diffusers.UNet2DModel.from_pretrained(out / "unet", output_loading_info=True)
    assert not any(info.values()), info
    assert unet.config.num_class_embeds == (NUM_CLASSES + 1 if conditional else None)
    pipeline = diffusers.DDPMPipeline.from_pretrained(out)                       # the folder as a whole
    assert isinstance(pipeline.unet, diffusers.UNet2DModel)
    scheduler = pipeline.scheduler
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), np.asarray(trained.schedule.alphas_cumprod),
                               rtol=1e-5, atol=1e-9)  # diffusers: float32 cumprod
    assert scheduler.config.prediction_type == ("epsilon" if conditional else "v_prediction")


def test_class_conditional_export_computes_what_diffusers_computes(class_export):
    """One forward comparison, on the cheaper model (for the other, its exact round trip, diffusers' key check and
    the loader's parity in test_pretrained_unet imply it)."""
    _, out, _, _ = class_export
    module, params, _ = load_ddpm_folder(out)
    unet = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)            # NCHW
    t, labels = np.array([3, 37]), np.array([2, NUM_CLASSES])           # a class and ∅
    with torch.no_grad():
        expected = unet(torch.from_numpy(x), torch.from_numpy(t), class_labels=torch.from_numpy(labels)).sample.numpy()
    got = _apply(module, {"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                 class_labels=jnp.asarray(labels))
    assert np.abs(expected).mean() > 0.1
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, rtol=0, atol=ATOL)


def test_sample_pretrained_export_reproduces_the_workdir(class_export, tmp_path, capsys):
    """``ddpm-jax sample --pretrained <export>`` = ``sample --workdir`` for the same seed and solver settings
    (a folder keeps no sampler defaults, so they are given; guided, per label)."""
    work, out, _, _ = class_export
    common = ["--num", "2", "--sampler", "ddim", "--steps", "2", "--eta", "0", "--seed", "5",
              "--labels", "0,2", "--guidance", "2.0"]
    images = []
    for source, name in ((["--workdir", str(work)], "w.npz"), (["--pretrained", str(out)], "p.npz")):
        status, _, err = run_cli(["sample", *source, *common, "--out", str(tmp_path / name)], capsys)
        assert status == 0, err
        images.append(np.load(tmp_path / name)["images"])
    np.testing.assert_array_equal(images[0], images[1])


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory):
    """(workdir, EMA params) of a tiny AutoencoderKL run (1 channel, 2 latent channels, f = 2; s = 0.7)."""
    config = ml_collections.ConfigDict(dict(
        data=dict(name="test_array", image_size=8, channels=1),
        model=dict(kind="autoencoder_kl", in_channels=1, out_channels=1, block_out_channels=(8, 16),
                   layers_per_block=1, latent_channels=2, norm_num_groups=4, sample_size=8)))
    work = tmp_path_factory.mktemp("autoencoder")
    return work, _write_workdir(work, config, jnp.zeros((1, 8, 8, 1)))


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """(workdir, EMA params, tokenizer) of a tiny CLIP run (its own BPE, 8 tokens of context)."""
    work = tmp_path_factory.mktemp("clip")
    captions = ["a digit one", "a digit two", "the number three"]
    train_tokenizer(captions, work / workdir_lib.TOKENIZER_DIR, vocab_size=520)
    tokenizer = load_tokenizer(work / workdir_lib.TOKENIZER_DIR, context_length=8)
    config = ml_collections.ConfigDict(dict(
        data=dict(name="captioned_digits", image_size=8, channels=1),
        tokenizer=dict(context_length=8),
        model=dict(projection_dim=8, logit_scale_init_value=2.6592,
                   text=dict(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=8, eos_token_id=tokenizer.eos_token_id),
                   vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=8, patch_size=4, num_channels=1))))
    ids = jnp.zeros((1, 8), jnp.int32)
    return work, _write_workdir(work, config, ids, jnp.zeros((1, 8, 8, 1))), tokenizer


def test_autoencoder_kl_export(autoencoder_run, tmp_path):
    work, ema = autoencoder_run
    out = tmp_path / "export"
    export_run(work, out)
    module, params = load_vae(out)
    _assert_same_params(params, ema)
    assert module.config.scaling_factor == 0.7                        # the run's measured scaling factor

    vae, info = diffusers.AutoencoderKL.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert vae.config.scaling_factor == 0.7
    x = np.random.default_rng(1).uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(x)).latent_dist
        decoded = vae.decode(posterior.mean).sample.numpy()
    encode_decode = lambda vae, x: (lambda q: (q, vae.decode(q.mean)))(vae.encode(x))  # one compiled program
    ours, ours_decoded = _apply(module, {"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), method=encode_decode)
    np.testing.assert_allclose(np.asarray(ours.mean).transpose(0, 3, 1, 2), posterior.mean.numpy(), atol=ATOL)
    np.testing.assert_allclose(np.asarray(ours.logvar).transpose(0, 3, 1, 2), posterior.logvar.numpy(), atol=ATOL)
    np.testing.assert_allclose(np.asarray(ours_decoded).transpose(0, 3, 1, 2), decoded, atol=ATOL)


def test_clip_export(clip_run, tmp_path):
    work, ema, tokenizer = clip_run
    out = tmp_path / "export"
    ids = tokenizer(["a digit two", "three"]).astype(np.int32)                  # [2, 8]
    images = np.random.default_rng(2).normal(size=(2, 1, 8, 8)).astype(np.float32)
    export_run(work, out)
    module, params = load_clip(out)
    _assert_same_params(params, ema)

    reference, info = transformers.CLIPModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(ids).long(), pixel_values=torch.from_numpy(images))
    got = _apply(module, {"params": params}, jnp.asarray(ids), jnp.asarray(images.transpose(0, 2, 3, 1)))
    unit = lambda e: np.asarray(e) / np.linalg.norm(np.asarray(e), axis=-1, keepdims=True)  # transformers normalises
    for name in ("text_embeds", "image_embeds"):
        np.testing.assert_allclose(unit(getattr(got, name)), getattr(expected, name).numpy(), atol=ATOL)
    np.testing.assert_allclose(np.asarray(got.logits_per_image), expected.logits_per_image.numpy(), atol=ATOL)
    hf_ids = transformers.CLIPTokenizer.from_pretrained(out)(["a digit two"], padding="max_length", max_length=8)
    np.testing.assert_array_equal(np.asarray(hf_ids["input_ids"]), ids[:1])


def test_torch_key_inverts_flax_path():
    assert torch_key(("down_blocks_0", "resnets_1", "conv1", "kernel")) == "down_blocks.0.resnets.1.conv1.weight"
    assert torch_key(("time_embedding", "linear_1", "kernel")) == "time_embedding.linear_1.weight"
    assert torch_key(("mid_block", "attentions_0", "to_out_0", "bias")) == "mid_block.attentions.0.to_out.0.bias"
    state = export_state_dict({"conv": {"kernel": np.zeros((3, 3, 2, 5))}, "fc": {"kernel": np.zeros((2, 7))}})
    assert state["conv.weight"].shape == (5, 2, 3, 3) and state["fc.weight"].shape == (7, 2)


def test_export_raw_parameters(unconditional_export, tmp_path, capsys):
    work = unconditional_export[0]
    status, out_text, err = run_cli(["export", "--workdir", str(work), "--out", str(tmp_path / "raw"), "--raw"], capsys)
    assert status == 0, err
    assert "diffusion_pytorch_model.safetensors" in out_text                    # the files written are printed
    _assert_same_params(load_ddpm_folder(tmp_path / "raw")[1], RAW_PARAMS[str(work)])


def test_export_errors_are_one_line(unconditional_export, tmp_path, capsys):
    work = unconditional_export[0]
    status, _, err = run_cli(["export", "--workdir", str(work), "--out", str(work)], capsys)
    assert status == 2 and err.startswith("ddpm-jax: error: --out") and err.count("\n") == 1
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    status, _, err = run_cli(["export", "--workdir", str(work), "--out", str(tmp_path / "busy")], capsys)
    assert status == 2 and "not an export" in err
    status, _, err = run_cli(["export", "--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys)
    assert status == 2 and "does not exist" in err


@pytest.mark.parametrize("change, message", [
    (dict(latent=dict(autoencoder="runs/ae")), "is a latent diffusion run"),
    (dict(condition=dict(kind="text", clip_workdir="runs/clip")), "is a pixel text-conditional diffusion run"),
])
def test_runs_without_an_export_are_refused(unconditional_export, tmp_path, capsys, change, message):
    """The same checkpoint under a latent (not text) / pixel text-conditional config: refused with one line,
    nothing written."""
    work = unconditional_export[0]
    copy = tmp_path / "run"
    shutil.copytree(work, copy)
    config = config_lib.load_workdir_config(copy)
    config.update(ml_collections.ConfigDict(change))
    config_lib.save_config(config, copy / config_lib.CONFIG_FILENAME)
    status, _, err = run_cli(["export", "--workdir", str(copy), "--out", str(tmp_path / "out")], capsys)
    assert status == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_stable_diffusion_unet_config_inverse(tmp_path):
    """The UNet2DConditionModel direction of ``save_unet`` (the text-to-image export's U-Net): cross-attention
    levels, linear projections, a projection class embedding (``class_embedding.linear_1``: a literal ``_1``)."""
    config = UNetConfig(
        sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=12, num_attention_heads=2, norm_num_groups=4,
        use_linear_projection=True, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, norm_eps=1e-5,
        class_embed_type="projection", projection_class_embeddings_input_dim=6)
    module = UNet(config)
    params = random_params(module, *config.input_specs(), seed=3, spread=0.2)
    save_unet(tmp_path, module, params)
    loaded, loaded_params = load_unet(tmp_path)
    assert loaded.config == config
    _assert_same_params(loaded_params, params)
    unet, info = diffusers.UNet2DConditionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert unet.config.attention_head_dim == 2 and unet.config.cross_attention_dim == 12   # heads: the naming quirk


@pytest.fixture(scope="module")
def text_to_image_export(autoencoder_run, clip_run, tmp_path_factory):
    """(workdir, export, U-Net EMA params) of a latent text-to-image run on the two runs above."""
    ae_work, clip_work = autoencoder_run[0], clip_run[0]
    config = tiny_config()
    config.data.update(image_size=8, channels=1)
    config.model.update(sample_size=4, in_channels=2, out_channels=2, add_attention=True,
                        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=16, num_attention_heads=2,
                        flip_sin_to_cos=True, freq_shift=0)
    config.diffusion.update(schedule="scaled_linear", num_timesteps=40)
    config.latent = ml_collections.ConfigDict(dict(autoencoder=str(ae_work)))
    config.condition = ml_collections.ConfigDict(dict(kind="text", clip_workdir=str(clip_work), layer=-1, p_uncond=0.1))
    root = tmp_path_factory.mktemp("ldm")
    work, out = root / "run", root / "export"
    work.mkdir()
    unet_ema = _write_workdir(work, config, jnp.zeros((1, 4, 4, 2)), jnp.zeros((1,), jnp.int32),
                              jnp.zeros((1, 8, 16)))
    assert cli.main(["export", "--workdir", str(work), "--out", str(out)]) == 0
    return work, out, unet_ema


def test_text_to_image_export_is_a_stable_diffusion_folder(text_to_image_export, autoencoder_run, clip_run):
    """A latent text-to-image run (its U-Net attends to the CLIP run's text states, on the AutoencoderKL run's
    latents) → a StableDiffusionPipeline folder: diffusers loads it whole, each component with no missing or
    unexpected key, and our StableDiffusion.from_pretrained reads back exactly the three runs' EMA params."""
    (_, out, unet_ema), (_, ae_ema), (_, clip_ema, tokenizer) = text_to_image_export, autoencoder_run, clip_run

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out)
    assert pipe.vae.config.scaling_factor == 0.7 and pipe.tokenizer.model_max_length == 8
    assert not pipe.scheduler.config.clip_sample                                # latents have no [-1, 1] range
    for cls, name in ((diffusers.UNet2DConditionModel, "unet"), (transformers.CLIPTextModel, "text_encoder")):
        _, info = cls.from_pretrained(out / name, output_loading_info=True)
        assert not any(info.values()), (name, info)
    ids = tokenizer(["a digit two"])
    np.testing.assert_array_equal(pipe.tokenizer(["a digit two"], padding="max_length", max_length=8)["input_ids"], ids)

    sd = StableDiffusion.from_pretrained(out)
    _assert_same_params(sd.params["unet"], unet_ema)
    _assert_same_params(sd.params["vae"], ae_ema)
    _assert_same_params(sd.params["text_encoder"], clip_ema["text_model"])

    # diffusers' pipeline components compute what ours compute: τ(y) and ε_θ(z_t, t, τ(y))
    with torch.no_grad():
        states = pipe.text_encoder(torch.from_numpy(np.asarray(ids, np.int64))).last_hidden_state.numpy()   # [1, 8, 16]
    np.testing.assert_allclose(np.asarray(sd.encode_prompt(["a digit two"])), states, rtol=0, atol=ATOL)
    rng = np.random.default_rng(1)
    z, t = rng.standard_normal((1, 2, 4, 4)).astype(np.float32), np.array([17])     # NCHW latents
    with torch.no_grad():
        expected = pipe.unet(torch.from_numpy(z), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(states)).sample.numpy()
    got = _apply(sd.unet, {"params": sd.params["unet"]}, jnp.asarray(z.transpose(0, 2, 3, 1)), jnp.asarray(t),
                 context=jnp.asarray(states))
    assert np.abs(expected).mean() > 0.1
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, rtol=0, atol=ATOL)


def test_stable_diffusion_of_the_export_generates_what_txt2img_workdir_generates(text_to_image_export, tmp_path):
    """``StableDiffusion.from_workdir(workdir, folder).txt2img`` (the run exported, then ``from_pretrained``: what
    notebook 07 does with runs/ldm_text_mnist; one compiled program: τ(y), the guided DDIM chain, D)
    = what ``txt2img --workdir`` samples (``generate`` on the workdir's DiffusionModel), same z_T and settings.
    ``generate`` draws the batch's z_T from split(key(seed))[0]; Stable Diffusion draws image b's from seed + b
    (``image_keys``), so the test hands the pipeline generate's z_T (DDIM with η = 0 draws nothing else)."""
    work, out, _ = text_to_image_export
    prompts = ["a digit two", "three"]
    ours = generate(workdir_lib.load_diffusion_model(work), prompts=prompts, guidance_scale=2.0, steps=2, seed=3,
                    sampler="ddim", eta=0.0)["images"]
    sd = StableDiffusion.from_workdir(work, tmp_path / "sd", scheduler="ddim")
    assert sd.scheduler.name == "ddim" and sd.source == str(tmp_path / "sd")
    z_T = jax.random.normal(jax.random.split(jax.random.key(3))[0], sd.latent_shape(2, 8, 8), jnp.float32)
    theirs = np.asarray(sd.txt2img(prompts, guidance_scale=2.0, num_steps=2, height=8, width=8, seed=3,
                                   latents=z_T)["images"])
    assert ours.shape == (2, 8, 8, 1) and ours.std() > 0.05
    assert np.abs(ours[0] - ours[1]).mean() > 1e-3                              # the prompt matters
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5)
    # img2img takes images with the VAE's channels (1 here, as the digit model's): notebook 07's Sections 7 and 9
    edit = np.asarray(sd.img2img(theirs[:1], prompts[:1], strength=0.5, num_steps=2, seed=0)["images"])
    assert edit.shape == (1, 8, 8, 1) and np.isfinite(edit).all()
    with pytest.raises(ValueError, match=r"images must be \[B, H, W, 1\] in \[-1, 1\] with B = 1"):
        sd.img2img(np.zeros((1, 8, 8, 3), np.float32), prompts[:1], strength=0.5, num_steps=2)


def test_from_workdir_refuses_a_run_that_is_not_text_to_image(unconditional_export, tmp_path):
    """A pixel DDPM exports as a DDPMPipeline: ``StableDiffusion.from_workdir`` says so in one line."""
    with pytest.raises(ValueError, match=r"exports as a DDPMPipeline, not a StableDiffusionPipeline.*ldm_text_mnist"):
        StableDiffusion.from_workdir(unconditional_export[0], tmp_path / "sd")


def test_stage_workdir_finds_a_first_stage_beside_the_run(tmp_path, monkeypatch):
    """A run's config names its first stages relative to where it was trained ("runs/autoencoder_kl_mnist" from the
    repository); read from another folder (a notebook's), the stage of that name beside the run is used."""
    runs = tmp_path / "runs"
    (runs / "ldm").mkdir(parents=True)
    (runs / "ae").mkdir()
    monkeypatch.chdir(runs)                                    # "runs/ae" does not exist from here
    assert workdir_lib.stage_workdir(runs / "ldm", "runs/ae") == runs / "ae"
    monkeypatch.chdir(tmp_path)                                # as written, when it exists
    assert workdir_lib.stage_workdir(runs / "ldm", "runs/ae") == pathlib.Path("runs/ae")
    assert workdir_lib.stage_workdir(runs / "ldm", "runs/missing") == pathlib.Path("runs/missing")
