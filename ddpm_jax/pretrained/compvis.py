"""Single-file Stable Diffusion v1 checkpoints (CompVis / LDM layout) → our params.

The original Stable Diffusion release (``sd-v1-4.ckpt``, ``v1-5-pruned-emaonly.safetensors``, and
most community fine-tunes) is ONE state dict of LDM's ``LatentDiffusion`` module, in which the three
networks sit under three prefixes and carry the names of the CompVis code:

==================================  ============================  ==================================
CompVis key                          diffusers key                 ours (``flax_path``)
==================================  ============================  ==================================
model.diffusion_model.input_blocks.1.0.in_layers.2   down_blocks.0.resnets.0.conv1     down_blocks_0/resnets_0/conv1
model.diffusion_model.input_blocks.1.1.proj_in       down_blocks.0.attentions.0.proj_in  …
model.diffusion_model.input_blocks.3.0.op            down_blocks.0.downsamplers.0.conv
model.diffusion_model.output_blocks.2.1.conv         up_blocks.0.upsamplers.0.conv
first_stage_model.encoder.down.0.block.1.nin_shortcut  encoder.down_blocks.0.resnets.1.conv_shortcut
first_stage_model.decoder.up.3.block.0.conv1         decoder.up_blocks.0.resnets.0.conv1   (levels reversed)
first_stage_model.decoder.mid.attn_1.q               decoder.mid_block.attentions.0.to_q  (a 1×1 conv)
cond_stage_model.transformer.text_model.encoder…     encoder…  (transformers' CLIPTextModel)
==================================  ============================  ==================================

So loading is: rename each CompVis key to its diffusers key (the tables below, built from the
configs), then the same ``convert.convert_state_dict`` as for a diffusers folder. The configs are
not in the file: Stable Diffusion v1's are implied (``UNetConfig.stable_diffusion_v1()``,
``AutoencoderKLConfig.sd_v1()``, CLIP ViT-L/14's text tower), or given. LDM's schedule buffers
(``betas``, ``alphas_cumprod``, …) are ignored; ``model_ema.*`` holds the EMA copy of the U-Net
(in the "full" checkpoints; ``use_ema=True`` picks it). Any other key is reported as unexpected.

The file is a ``.safetensors`` (safetensors' NumPy loader) or a ``.ckpt``/``.pt``/``.pth``/``.bin``
torch pickle (``torch_pickle``, no torch), read by ``state_dict.read_state_dict``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.models.clip import CLIPTextConfig, CLIPTextTransformer
from ddpm_jax.models.unet import DOWN_BLOCK_ATTENTION, UP_BLOCK_ATTENTION, UNet, UNetConfig
from ddpm_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from ddpm_jax.pretrained.convert import Params, convert_state_dict, param_shapes
from ddpm_jax.pretrained.diffusers import (
    autoencoder_kl_config_from_diffusers,
    unet_config_from_diffusers,
    unet_key,
    vae_state_dict,
)
from ddpm_jax.pretrained.state_dict import read_config_json, read_state_dict
from ddpm_jax.pretrained.transformers_clip import clip_key, example_ids, text_config_from_transformers

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
EMA_PREFIX = "model_ema."
# LatentDiffusion's registered buffers: the DDPM schedule and the learned-logvar table.
LDM_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
    "model_ema.decay", "model_ema.num_updates",
})

# Inside a ResNet block (openaimodel.ResBlock → diffusers ResnetBlock2D).
_UNET_RESNET = {"in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "emb_layers.1.": "time_emb_proj.",
                "out_layers.0.": "norm2.", "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut."}
# Inside the VAE (taming's ResnetBlock and AttnBlock).
_VAE_INNER = {"nin_shortcut.": "conv_shortcut.", "norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.",
              "v.": "to_v.", "proj_out.": "to_out.0."}


def unet_prefixes(config: UNetConfig) -> dict[str, str]:
    """CompVis block prefix → diffusers block prefix for a U-Net with this config.

    openaimodel.UNetModel keeps flat lists: ``input_blocks`` = [conv_in, then per level
    ``layers_per_block`` × (ResNet[, transformer]) and a downsampler], ``output_blocks`` = per level
    ``layers_per_block + 1`` × (ResNet[, transformer][, upsampler after the last]).
    """
    n, levels = config.layers_per_block, config.num_levels
    table = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
             "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out.",
             "middle_block.0.": "mid_block.resnets.0.", "middle_block.1.": "mid_block.attentions.0.",
             "middle_block.2.": "mid_block.resnets.1."}
    for i in range(levels):
        for j in range(n):
            k = 1 + i * (n + 1) + j
            table[f"input_blocks.{k}.0."] = f"down_blocks.{i}.resnets.{j}."
            if DOWN_BLOCK_ATTENTION[config.down_block_types[i]]:
                table[f"input_blocks.{k}.1."] = f"down_blocks.{i}.attentions.{j}."
        if i < levels - 1:
            table[f"input_blocks.{1 + i * (n + 1) + n}.0.op."] = f"down_blocks.{i}.downsamplers.0.conv."
        attention = UP_BLOCK_ATTENTION[config.up_block_types[i]]
        for j in range(n + 1):
            k = i * (n + 1) + j
            table[f"output_blocks.{k}.0."] = f"up_blocks.{i}.resnets.{j}."
            if attention:
                table[f"output_blocks.{k}.1."] = f"up_blocks.{i}.attentions.{j}."
        if i < levels - 1:  # the upsampler follows the last block's ResNet (and transformer)
            table[f"output_blocks.{i * (n + 1) + n}.{2 if attention else 1}.conv."] = f"up_blocks.{i}.upsamplers.0.conv."
    return table


def vae_prefixes(config: AutoencoderKLConfig) -> dict[str, str]:
    """CompVis (taming) block prefix → diffusers block prefix; the decoder's levels are numbered from the
    lowest resolution in taming (``up.{L−1}`` is the first decoder level), from the top in diffusers."""
    levels, n = config.num_levels, config.layers_per_block
    table = {}
    for part in ("encoder", "decoder"):
        table |= {f"{part}.mid.block_1.": f"{part}.mid_block.resnets.0.",
                  f"{part}.mid.attn_1.": f"{part}.mid_block.attentions.0.",
                  f"{part}.mid.block_2.": f"{part}.mid_block.resnets.1.",
                  f"{part}.norm_out.": f"{part}.conv_norm_out."}
    for i in range(levels):
        for j in range(n):
            table[f"encoder.down.{i}.block.{j}."] = f"encoder.down_blocks.{i}.resnets.{j}."
        table[f"encoder.down.{i}.downsample.conv."] = f"encoder.down_blocks.{i}.downsamplers.0.conv."
        for j in range(n + 1):
            table[f"decoder.up.{levels - 1 - i}.block.{j}."] = f"decoder.up_blocks.{i}.resnets.{j}."
        table[f"decoder.up.{levels - 1 - i}.upsample.conv."] = f"decoder.up_blocks.{i}.upsamplers.0.conv."
    return table


def _rename(key: str, prefixes: Mapping[str, str], inner: Mapping[str, str], inner_after: str) -> str:
    """Replace the longest matching block prefix, then (inside blocks whose new name contains
    ``inner_after``) the CompVis layer name by diffusers'. Keys without a match are returned unchanged."""
    for old in sorted(prefixes, key=len, reverse=True):
        if key.startswith(old):
            new_prefix, rest = prefixes[old], key[len(old):]
            if inner_after in new_prefix:
                for a, b in inner.items():
                    if rest.startswith(a):
                        rest = b + rest[len(a):]
                        break
            return new_prefix + rest
    return key


def split_compvis(state: Mapping[str, np.ndarray], use_ema: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """A CompVis state dict → {"unet", "vae", "text_encoder", "unexpected"}, each keyed by the names
    under its prefix (CompVis names, prefix removed). With ``use_ema`` the U-Net's weights are read
    from ``model_ema.<key without dots>`` (LDM's EMA copy), as diffusers' converter does."""
    parts: dict[str, dict[str, np.ndarray]] = {"unet": {}, "vae": {}, "text_encoder": {}, "unexpected": {}}
    if use_ema and not any(k.startswith(EMA_PREFIX) and k not in LDM_BUFFERS for k in state):
        raise ValueError("use_ema=True but the checkpoint has no model_ema.* weights (an EMA-only file: "
                         "its model.diffusion_model.* weights are already the EMA ones; use use_ema=False)")
    for key, value in state.items():
        if key.startswith(UNET_PREFIX):
            if use_ema:
                flat = EMA_PREFIX + "".join(key.split(".")[1:])  # model_ema.diffusion_modelinput_blocks00weight
                if flat not in state:
                    raise ValueError(f"use_ema=True but the checkpoint has no {flat} for {key}")
                value = state[flat]
            parts["unet"][key[len(UNET_PREFIX):]] = value
        elif key.startswith(VAE_PREFIX):
            parts["vae"][key[len(VAE_PREFIX):]] = value
        elif key.startswith(TEXT_PREFIX):
            name = key[len(TEXT_PREFIX):].removeprefix("text_model.")  # transformers v4 keeps "text_model."
            if not name.endswith("position_ids"):
                parts["text_encoder"][name] = value
        elif key not in LDM_BUFFERS and not key.startswith(EMA_PREFIX):
            parts["unexpected"][key] = value
    for name in ("unet", "vae", "text_encoder"):
        if not parts[name]:
            prefix = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIX}[name]
            raise ValueError(f"not a Stable Diffusion v1 CompVis checkpoint: no {prefix}* keys (its first keys: "
                             f"{', '.join(list(state)[:5])})")
    return parts


def compvis_to_diffusers(parts: Mapping[str, Mapping[str, np.ndarray]], unet_config: UNetConfig,
                         vae_config: AutoencoderKLConfig) -> dict[str, dict[str, np.ndarray]]:
    """The U-Net's and VAE's CompVis names → diffusers names (the text encoder's already are transformers')."""
    unet_table, vae_table = unet_prefixes(unet_config), vae_prefixes(vae_config)
    unet = {_rename(k, unet_table, _UNET_RESNET, ".resnets."): v for k, v in parts["unet"].items()}
    vae = {_rename(k, vae_table, _VAE_INNER, ""): v for k, v in parts["vae"].items()}
    return {"unet": unet, "vae": vae_state_dict(vae), "text_encoder": dict(parts["text_encoder"])}


@dataclasses.dataclass(frozen=True)
class CompVisModels:
    """The three networks of a CompVis checkpoint and their params."""

    unet: UNet
    vae: AutoencoderKL
    text_encoder: CLIPTextTransformer
    params: dict[str, Params]  # {"unet": …, "vae": …, "text_encoder": …}


def _targets(unet: UNet, vae: AutoencoderKL, text: CLIPTextTransformer) -> dict[str, Params]:
    size = vae.config.downsampling_factor
    image = jax.ShapeDtypeStruct((1, size, size, vae.config.in_channels), jnp.float32)
    return {"unet": param_shapes(unet, *unet.config.input_specs()), "vae": param_shapes(vae, image),
            "text_encoder": param_shapes(text, example_ids(text.config))}


def load_compvis(path: str | Path, unet_config: UNetConfig | None = None, vae_config: AutoencoderKLConfig | None = None,
                 text_config: CLIPTextConfig | None = None, use_ema: bool = False) -> CompVisModels:
    """Load a single-file SD v1 checkpoint (.safetensors, or a .ckpt/.pt/.pth/.bin torch pickle); the configs
    default to Stable Diffusion v1's.

    Raises a ValueError listing, per network, every key missing from the file, unexpected in it or
    mis-shaped (``convert_state_dict``), plus any key outside the three networks' prefixes.
    """
    unet = UNet(unet_config or UNetConfig.stable_diffusion_v1())
    vae = AutoencoderKL(vae_config or AutoencoderKLConfig.sd_v1())
    text = CLIPTextTransformer(text_config or CLIPTextConfig())
    parts = split_compvis(read_state_dict(path), use_ema=use_ema)
    renamed = compvis_to_diffusers(parts, unet.config, vae.config)
    targets = _targets(unet, vae, text)
    params, errors = {}, []
    if parts["unexpected"]:
        errors.append(f"unexpected top-level keys ({len(parts['unexpected'])}): {', '.join(sorted(parts['unexpected']))}")
    renames = {"unet": unet_key, "vae": unet_key, "text_encoder": clip_key}
    for name, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text_encoder", TEXT_PREFIX)):
        try:
            params[name] = convert_state_dict(renamed[name], targets[name], rename=renames[name])
        except ValueError as err:
            errors.append(f"{prefix}* ({name}): {err}")
    if errors:
        raise ValueError(f"{path} does not match Stable Diffusion v1's networks:\n" + "\n".join(errors))
    return CompVisModels(unet, vae, text, params)


def load_single_file(path: str | Path, config_folder: str | Path | None = None, use_ema: bool = False) -> CompVisModels:
    """A single-file SD v1 checkpoint with the configs of a diffusers Stable Diffusion folder, if given.

    ``config_folder``'s ``unet/config.json`` (UNet2DConditionModel), ``vae/config.json`` (AutoencoderKL)
    and ``text_encoder/config.json`` (transformers CLIPTextConfig) give the three networks' shapes (for
    a fine-tune of another size); without it, Stable Diffusion v1's configs are implied. The weights
    are read from ``path`` only (:func:`load_compvis`).
    """
    unet_config = vae_config = text_config = None
    if config_folder is not None:
        folder = Path(config_folder)
        unet_config = unet_config_from_diffusers(read_config_json(folder / "unet"))
        vae_config = autoencoder_kl_config_from_diffusers(read_config_json(folder / "vae"))
        text_config = text_config_from_transformers(read_config_json(folder / "text_encoder"))
    return load_compvis(path, unet_config, vae_config, text_config, use_ema=use_ema)


__all__ = ["CompVisModels", "compvis_to_diffusers", "load_compvis", "load_single_file", "split_compvis",
           "unet_prefixes", "vae_prefixes"]
