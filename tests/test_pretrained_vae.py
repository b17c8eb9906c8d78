"""load_vae: our AutoencoderKL with diffusers' weights computes what diffusers' AutoencoderKL computes.

Each test builds a small random diffusers model (every weight, norm and bias perturbed, so that no
zero- or one-initialised parameter can hide a mapping bug), saves it with save_pretrained (one of
them re-saved with the legacy attention names query/key/value/proj_attn), loads it with load_vae and
compares the encoder's moments and the decoder's output on the same inputs (NCHW ↔ NHWC).
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ddpm_jax.models.vae import AutoencoderKL  # noqa: E402
from ddpm_jax.pretrained.diffusers import load_vae  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"
TOL = 1e-4

# Two small configurations: f=2 with one ResNet per level and 8 groups, saved with the current
# attention names; f=4 with two ResNets per level, 16 groups and a 1-channel image, saved with the
# legacy names (query/key/value/proj_attn) of the first diffusers SD VAE conversions and with the
# attention projections stored as 1×1 convs [O, I, 1, 1].
CONFIGS = {
    "f2-new-names": dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        in_channels=3,
        out_channels=3,
    ),
    "f4-legacy-names": dict(
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        latent_channels=3,
        norm_num_groups=16,
        in_channels=1,
        out_channels=2,
        scaling_factor=0.5,
    ),
}
LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _save_random_diffusers_vae(folder, config, seed=0, legacy_names=False):
    torch.manual_seed(seed)
    levels = len(config["block_out_channels"])
    model = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        sample_size=16,
        **config,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            # Conv/linear weights: noise on their own scale; norms and biases: N(0, 0.1²) on top.
            p.add_(torch.randn_like(p) * (p.std() if p.ndim > 1 else 0.1))
    model.save_pretrained(folder, safe_serialization=True)
    if legacy_names:
        state = load_file(folder / WEIGHTS)
        renamed = {}
        for key, value in state.items():
            for new, old in LEGACY.items():
                key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
            if ".attentions.0." in key and key.endswith(".weight") and value.ndim == 2:
                value = value[:, :, None, None]  # stored as 1×1 convs, as in LDM's original checkpoints
            renamed[key] = value
        assert any(".proj_attn." in k for k in renamed) and not any(".to_q." in k for k in renamed)
        save_file(renamed, folder / WEIGHTS)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_vae_matches_diffusers(tmp_path, name):
    config = CONFIGS[name]
    torch_model = _save_random_diffusers_vae(tmp_path, config, legacy_names="legacy" in name)
    module, params = load_vae(tmp_path)
    assert module.config.downsampling_factor == 2 ** (len(config["block_out_channels"]) - 1)
    assert module.config.scaling_factor == config.get("scaling_factor", 0.18215)

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(2, config["in_channels"], 16, 16)).astype(np.float32)  # NCHW
    with torch.no_grad():
        dist = torch_model.encode(torch.from_numpy(x)).latent_dist
        z = dist.mean + 0.5 * torch.randn_like(dist.mean)  # a latent that is not exactly the mean
        decoded = torch_model.decode(z).sample
    ours = module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), method=AutoencoderKL.encode)
    to_nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(ours.mean), to_nhwc(dist.mean), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(ours.logvar), to_nhwc(dist.logvar), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(ours.kl()), dist.kl().numpy(), rtol=1e-4)
    our_decoded = module.apply({"params": params}, jnp.asarray(to_nhwc(z)), method=AutoencoderKL.decode)
    assert np.abs(to_nhwc(decoded)).max() > 0.1  # not trivially small
    assert np.abs(np.asarray(our_decoded) - to_nhwc(decoded)).max() <= TOL


def test_vae_scaling_factor_round_trip(tmp_path):
    """encode_latents/decode_latents apply scaling_factor in one place: latents = s·mode, decode(latents/s) = decode(mode)."""
    config = CONFIGS["f4-legacy-names"]
    _save_random_diffusers_vae(tmp_path, config)
    module, params = load_vae(tmp_path)
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, size=(1, 16, 16, 1)), jnp.float32)
    apply = lambda method, *a: module.apply({"params": params}, *a, method=method)
    mode = apply(AutoencoderKL.encode, x).mode()
    latents = apply(AutoencoderKL.encode_latents, x)
    np.testing.assert_allclose(latents, 0.5 * mode, rtol=1e-6)
    np.testing.assert_allclose(apply(AutoencoderKL.decode_latents, latents), apply(AutoencoderKL.decode, mode), atol=1e-5)


def test_load_vae_rejects_other_model_type(tmp_path):
    diffusers.UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(ValueError, match="AutoencoderKL.*_class_name='UNet2DModel'"):
        load_vae(tmp_path)


def test_load_vae_lists_missing_and_misshaped_keys(tmp_path):
    _save_random_diffusers_vae(tmp_path, CONFIGS["f2-new-names"])
    state = load_file(tmp_path / WEIGHTS)
    del state["decoder.mid_block.attentions.0.to_k.weight"]
    state["encoder.conv_in.bias"] = np.zeros(5, np.float32)
    save_file(state, tmp_path / WEIGHTS)
    with pytest.raises(ValueError) as err:
        load_vae(tmp_path)
    message = str(err.value)
    assert "missing from the checkpoint (1): decoder/mid_block/attentions_0/to_k/kernel" in message
    assert "wrong shape (1)" in message and "encoder.conv_in.bias" in message


def test_load_vae_rejects_unsupported_block_types(tmp_path):
    _save_random_diffusers_vae(tmp_path, CONFIGS["f2-new-names"])
    config = json.loads((tmp_path / "config.json").read_text())
    config["down_block_types"] = ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="down_block_types"):
        load_vae(tmp_path)
