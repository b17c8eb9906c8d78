"""load_unet: our U-Net with diffusers' weights computes what diffusers' UNet2DModel computes.

Each test builds a small random diffusers model (every weight, norm and bias perturbed, so that
no zero- or one-initialised parameter can hide a mapping bug), saves it with save_pretrained,
loads it with load_unet and compares the outputs on the same inputs (NCHW ↔ NHWC).
"""

import dataclasses
import inspect
import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ddpm_jax.models.unet import UNetConfig  # noqa: E402
from ddpm_jax.pretrained.diffusers import (  # noqa: E402
    UNET2D_DEFAULTS,
    find_ddpm_folders,
    load_ddpm_folder,
    load_unet,
    unet_config_from_diffusers,
)

WEIGHTS = "diffusion_pytorch_model.safetensors"

# Small configurations covering: attention at some levels or none, multi-head vs one head,
# 2 and 3 levels, 1 and 2 ResNets per level, GroupNorm 8/16/32, both timestep-embedding
# conventions, both downsample paddings, a mid-block scale factor and a non-square input.
CONFIGS = {
    "attn-multihead-sd-embedding": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
    ),
    "ddpm-like-3-levels": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
        norm_eps=1e-6,
        attention_head_dim=None,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
    ),
    "no-attention": dict(
        in_channels=1,
        out_channels=2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False,
        norm_num_groups=32,
        mid_block_scale_factor=2**0.5,
        time_embedding_dim=96,
        flip_sin_to_cos=True,
        freq_shift=1,
    ),
}
INPUT_HW = {"no-attention": (16, 32)}  # the others use 16×16


def _save_random_diffusers_unet(folder, config, seed=0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(sample_size=16, **config).eval()
    with torch.no_grad():
        for p in model.parameters():
            # Conv/linear weights: noise on their own scale; norms and biases: N(0, 0.1²) on top.
            p.add_(torch.randn_like(p) * (p.std() if p.ndim > 1 else 0.1))
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _assert_same_outputs(model, folder, in_channels, hw=(16, 16)):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, in_channels, *hw)).astype(np.float32)  # NCHW
    t = np.array([3, 917])
    with torch.no_grad():
        expected = model(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()

    module, params = load_unet(folder)
    got = module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t))
    got = np.asarray(got).transpose(0, 3, 1, 2)  # NHWC → NCHW
    assert got.shape == expected.shape
    assert np.abs(expected).mean() > 0.1  # a meaningful comparison, not of two near-zero arrays
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(tmp_path, name):
    config = CONFIGS[name]
    model = _save_random_diffusers_unet(tmp_path, config)
    _assert_same_outputs(model, tmp_path, config.get("in_channels", 3), INPUT_HW.get(name, (16, 16)))


def test_class_conditional_unet2d_matches_diffusers(tmp_path):
    """UNet2DModel(num_class_embeds=…): a learned class embedding added to the timestep embedding."""
    config = dict(CONFIGS["attn-multihead-sd-embedding"], num_class_embeds=4)
    model = _save_random_diffusers_unet(tmp_path, config)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    t, labels = np.array([3, 917]), np.array([3, 0])
    with torch.no_grad():
        expected = model(torch.from_numpy(x), torch.from_numpy(t), class_labels=torch.from_numpy(labels)).sample.numpy()
    module, params = load_unet(tmp_path)
    assert module.config.num_class_embeds == 4
    apply = lambda labels: np.asarray(
        module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), class_labels=labels)
    ).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(apply(jnp.asarray(labels)), expected, rtol=0, atol=1e-4)
    assert np.abs(apply(jnp.asarray(labels[::-1])) - expected).mean() > 1e-2  # the label matters


def test_legacy_attention_names(tmp_path):
    """The google/ddpm-* checkpoints name the attention projections query/key/value/proj_attn."""
    config = CONFIGS["ddpm-like-3-levels"]
    model = _save_random_diffusers_unet(tmp_path, config, seed=1)
    state = load_file(tmp_path / WEIGHTS)
    legacy = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    renamed = {}
    for key, value in state.items():
        for new, old in legacy.items():
            key = key.replace(new, old)
        renamed[key] = value
    assert any(".proj_attn." in key for key in renamed)
    save_file(renamed, tmp_path / WEIGHTS)
    _assert_same_outputs(model, tmp_path, 3)


def test_mismatched_checkpoint_lists_every_bad_key(tmp_path):
    config = CONFIGS["attn-multihead-sd-embedding"]
    _save_random_diffusers_unet(tmp_path, config)
    state = load_file(tmp_path / WEIGHTS)
    del state["mid_block.resnets.0.conv1.bias"]
    state["mid_block.extra.weight"] = np.zeros(3, np.float32)
    state["conv_in.weight"] = np.zeros((32, 3, 5, 5), np.float32)
    save_file(state, tmp_path / WEIGHTS)
    with pytest.raises(ValueError) as info:
        load_unet(tmp_path)
    message = str(info.value)
    assert "missing from the checkpoint (1): mid_block/resnets_0/conv1/bias" in message
    assert "unexpected in the checkpoint (1): mid_block.extra.weight" in message
    assert "wrong shape (1): conv_in.weight: checkpoint (32, 3, 5, 5)" in message


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="UNet2DModel or UNet2DConditionModel folders, but config.json has _class_name='UNet1DModel'"):
        unet_config_from_diffusers({"_class_name": "UNet1DModel"})
    with pytest.raises(ValueError, match="class_embed_type='timestep', not implemented"):
        unet_config_from_diffusers({"_class_name": "UNet2DModel", "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="time_embedding_type='fourier'"):
        unet_config_from_diffusers({"_class_name": "UNet2DModel", "time_embedding_type": "fourier"})
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="_class_name='AutoencoderKL'"):
        load_unet(tmp_path)


def test_defaults_are_diffusers_defaults():
    """Keys an old config.json leaves out take UNet2DModel's own default values."""
    signature = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    for key, value in UNET2D_DEFAULTS.items():
        assert signature[key].default == value, key


def test_ddpm_cifar10_config_json():
    """google/ddpm-cifar10-32's config.json describes UNetConfig.ddpm_cifar10() (inference: no dropout)."""
    config = {
        "_class_name": "UNet2DModel",
        "act_fn": "silu",
        "attention_head_dim": None,
        "block_out_channels": [128, 256, 256, 256],
        "center_input_sample": False,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "in_channels": 3,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-06,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 32,
        "time_embedding_type": "positional",
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    }
    assert unet_config_from_diffusers(config) == dataclasses.replace(UNetConfig.ddpm_cifar10(), dropout=0.0)


# ---- google/ddpm-* folders: UNet2DModel + DDPMScheduler config (load_ddpm_folder) ------------------------


@pytest.mark.parametrize("layout", ["root", "pipeline"])
def test_load_ddpm_folder_reads_both_layouts(tmp_path, layout):
    """google/ddpm-cifar10-32 keeps everything at the root; DDPMPipeline.save_pretrained writes unet/ + scheduler/."""
    config = CONFIGS["attn-multihead-sd-embedding"]
    unet_dir = tmp_path if layout == "root" else tmp_path / "unet"
    scheduler_dir = tmp_path if layout == "root" else tmp_path / "scheduler"
    model = _save_random_diffusers_unet(unet_dir, config)
    diffusers.DDPMScheduler(num_train_timesteps=20, variance_type="fixed_small_log").save_pretrained(scheduler_dir)
    assert find_ddpm_folders(tmp_path) == (unet_dir, scheduler_dir)
    module, params, scheduler_config = load_ddpm_folder(tmp_path)
    assert scheduler_config["num_train_timesteps"] == 20 and scheduler_config["variance_type"] == "fixed_small_log"
    _, expected = load_unet(unet_dir)
    assert module.config == unet_config_from_diffusers(model.config)
    np.testing.assert_array_equal(params["conv_in"]["kernel"], expected["conv_in"]["kernel"])


@pytest.mark.parametrize("change, error, message", [
    ({"variance_type": "learned_range"}, ValueError, "variance_type='learned_range'; supported: fixed_small"),
    ({"thresholding": True}, ValueError, "thresholding=true"),
    ({"clip_sample_range": 2.0}, ValueError, r"clip_sample_range=2.0; only 1.0"),
    (None, FileNotFoundError, "has no scheduler_config.json"),
])
def test_load_ddpm_folder_names_what_it_cannot_load(tmp_path, change, error, message):
    """The scheduler is checked before any weights are read: a config.json alone is enough here."""
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    if change is not None:
        (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler", **change}))
    with pytest.raises(error, match=message):
        load_ddpm_folder(tmp_path)


def test_load_ddpm_folder_missing_folder_or_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_ddpm_folder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"has no config.json \(nor unet/config.json\)"):
        load_ddpm_folder(tmp_path)
