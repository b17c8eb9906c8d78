"""Single-file Stable Diffusion checkpoints (SD v1, SD 2.x, SDXL base and refiner) → our params.

The original releases (``sd-v1-4.ckpt``, ``v1-5-pruned-emaonly.safetensors``, ``v2-1_768-ema-pruned.safetensors``,
``sd_xl_base_1.0.safetensors``, ``sd_xl_refiner_1.0.safetensors``, and most community fine-tunes) are ONE state dict of the training code's model,
in which the networks sit under prefixes and carry the names of that code (:data:`LAYOUTS`):

* CompVis ldm (SD v1): ``model.diffusion_model.*`` (openaimodel.UNetModel), ``first_stage_model.*`` (taming's
  autoencoder), ``cond_stage_model.transformer.*`` (FrozenCLIPEmbedder: a transformers CLIPTextModel);
* Stability's stablediffusion (SD 2.x, the same ldm code): the text encoder is FrozenOpenCLIPEmbedder,
  ``cond_stage_model.model.*`` in OpenCLIP's names (``transformer.resblocks.i.attn.in_proj_weight``, q, k, v fused);
* Stability's sgm (generative-models, SDXL base): GeneralConditioner's ``conditioner.embedders.0.transformer.*``
  (CLIP ViT-L, transformers' names) and ``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG, with its
  ``text_projection``); the U-Net's added-conditioning MLP is ``label_emb.0.{0,2}``;
* sgm's SDXL refiner: one embedder with weights, ``conditioner.embedders.0.model.*`` (the same OpenCLIP ViT-bigG; the
  size, crop and aesthetic-score embedders have none), the refiner's U-Net (five time ids: 1280 + 5·256 = 2560).

The U-Net's and VAE's names are the same in all four:

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
model.diffusion_model.label_emb.0.0                  add_embedding.linear_1  (SDXL)
cond_stage_model.transformer.text_model.encoder…     encoder…  (transformers' CLIPTextModel)
cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight   encoder.layers.0.self_attn.{q,k,v}_proj (split)
conditioner.embedders.1.model.text_projection        text_projection.weight  (transposed)
==================================  ============================  ==================================

So loading is: tell the layout from the keys (:func:`detect_layout`), rename each CompVis key to its diffusers
key (the tables below, built from the configs) and each OpenCLIP key to its transformers key
(:data:`OPENCLIP_NAMES`), then the same ``convert.convert_state_dict`` as for a diffusers folder. The configs
are not in the file: the released model's of the layout are implied (:data:`IMPLIED_CONFIGS`), or given.
LDM's schedule buffers (``betas``, ``alphas_cumprod``, …) are ignored; ``model_ema.*`` holds the EMA copy of the U-Net
(in the "full" checkpoints; ``use_ema=True`` picks it). Any other key is reported as unexpected.

The file is a ``.safetensors`` (safetensors' NumPy loader) or a ``.ckpt``/``.pt``/``.pth``/``.bin``
torch pickle (``torch_pickle``, no torch), read by ``state_dict.read_state_dict``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.models.clip import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTextTransformer
from ddpm_jax.models.unet import DOWN_BLOCK_ATTENTION, UP_BLOCK_ATTENTION, UNet, UNetConfig
from ddpm_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from ddpm_jax.pretrained.convert import Params, StateDictMismatch, convert_state_dict, param_shapes
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
EMA_PREFIX = "model_ema."
# LatentDiffusion's registered buffers: the DDPM schedule and the learned-logvar table (and sgm's σ table).
LDM_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
    "model_ema.decay", "model_ema.num_updates",
    "denoiser.sigmas",  # sgm's DiffusionEngine: its discrete denoiser's σ table (SDXL)
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
    if config.addition_embed_type == "text_time" or config.class_embed_type == "projection":  # sgm's label_emb MLP
        embedding = "add_embedding" if config.addition_embed_type == "text_time" else "class_embedding"
        table |= {"label_emb.0.0.": f"{embedding}.linear_1.", "label_emb.0.2.": f"{embedding}.linear_2."}
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


# ------------------------------------------------------------------------------------------------
# The layouts: where the text encoders sit, and in which names
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TextEncoderEntry:
    """One text encoder of a single-file layout: its diffusers component, its prefix in the file, and the
    names under it: "transformers" (a transformers CLIPTextModel inside ldm's / sgm's FrozenCLIPEmbedder:
    ``text_model.encoder.layers.0.self_attn.q_proj.weight``) or "openclip" (OpenCLIP's text transformer inside
    FrozenOpenCLIPEmbedder(2): ``transformer.resblocks.0.attn.in_proj_weight``, :data:`OPENCLIP_NAMES`)."""

    component: str
    prefix: str
    names: str


@dataclasses.dataclass(frozen=True)
class Layout:
    """A single-file layout: the U-Net under ``model.diffusion_model.``, the VAE under ``first_stage_model.``,
    and its text encoders; told apart by the text encoders' prefixes (:func:`detect_layout`)."""

    title: str
    text_encoders: tuple[TextEncoderEntry, ...]


LAYOUTS = {
    # CompVis ldm (github.com/CompVis/stable-diffusion): FrozenCLIPEmbedder, CLIP ViT-L/14
    "sd_v1": Layout("Stable Diffusion v1 (CompVis ldm)",
                    (TextEncoderEntry("text_encoder", "cond_stage_model.transformer.", "transformers"),)),
    # Stability's stablediffusion (SD 2.x, the ldm code): FrozenOpenCLIPEmbedder, OpenCLIP ViT-H/14
    "sd_v2": Layout("Stable Diffusion 2.x (Stability's stablediffusion, ldm layout)",
                    (TextEncoderEntry("text_encoder", "cond_stage_model.model.", "openclip"),)),
    # Stability's sgm (github.com/Stability-AI/generative-models): GeneralConditioner's embedders,
    # CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (with its projection)
    "sdxl": Layout("SDXL base (Stability's sgm / generative-models)",
                   (TextEncoderEntry("text_encoder", "conditioner.embedders.0.transformer.", "transformers"),
                    TextEncoderEntry("text_encoder_2", "conditioner.embedders.1.model.", "openclip"))),
    # sgm's SDXL refiner: OpenCLIP ViT-bigG alone (diffusers' text_encoder_2), then three embedders without weights
    # (original size, crop, aesthetic score)
    "sdxl_refiner": Layout("SDXL refiner (Stability's sgm / generative-models)",
                           (TextEncoderEntry("text_encoder_2", "conditioner.embedders.0.model.", "openclip"),)),
}

# The released models' configs, as the diffusers / transformers config.json dicts of their folders (read by
# the same converters as a config folder's): stable-diffusion-v1-5, stable-diffusion-2-1, stable-diffusion-xl-base-1.0,
# stable-diffusion-xl-refiner-1.0 (its U-Net from these: 2,259,526,660 parameters, ours and diffusers' alike).
_VAE_SD = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
           "sample_size": 512, "scaling_factor": 0.18215}
_OPENCLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                  "hidden_act": "gelu", "projection_dim": 1280}  # SDXL's text_encoder_2 (base and refiner)
IMPLIED_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "sd_v1": {"unet": {"_class_name": "UNet2DConditionModel", "sample_size": 64, "cross_attention_dim": 768,
                       "attention_head_dim": 8},
              "vae": _VAE_SD, "text_encoder": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                               "num_attention_heads": 12, "projection_dim": 768}},
    "sd_v2": {"unet": {"_class_name": "UNet2DConditionModel", "sample_size": 96, "cross_attention_dim": 1024,
                       "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True},
              "vae": _VAE_SD, "text_encoder": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                                               "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512}},
    "sdxl": {"unet": {"_class_name": "UNet2DConditionModel", "sample_size": 128, "block_out_channels": [320, 640, 1280],
                      "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                      "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                      "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
                      "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
                      "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816},
             "vae": _VAE_SD | {"sample_size": 1024, "scaling_factor": 0.13025},
             "text_encoder": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                              "num_attention_heads": 12, "projection_dim": 768},
             "text_encoder_2": _OPENCLIP_BIGG},
    "sdxl_refiner": {"unet": {"_class_name": "UNet2DConditionModel", "sample_size": 128,
                              "block_out_channels": [384, 768, 1536, 1536],
                              "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                   "DownBlock2D"],
                              "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                              "transformer_layers_per_block": 4, "attention_head_dim": [6, 12, 24, 24],
                              "cross_attention_dim": 1280, "use_linear_projection": True,
                              "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                              "projection_class_embeddings_input_dim": 2560},
                     "vae": _VAE_SD | {"sample_size": 1024, "scaling_factor": 0.13025},
                     "text_encoder_2": _OPENCLIP_BIGG},
}

# OpenCLIP's text transformer (open_clip/transformer.py) → transformers' CLIPTextModel names, without
# ``text_model.``: the one table, each pair replaced once, in order (blocks, then the layers inside a block).
OPENCLIP_NAMES = (
    ("transformer.resblocks.", "encoder.layers."), ("token_embedding.", "embeddings.token_embedding."),
    ("positional_embedding", "embeddings.position_embedding.weight"), ("ln_final.", "final_layer_norm."),
    (".ln_1.", ".layer_norm1."), (".ln_2.", ".layer_norm2."), (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2."),
    (".attn.out_proj.", ".self_attn.out_proj."), (".attn.in_proj_", ".self_attn.in_proj_"),
)
OPENCLIP_UNUSED = frozenset({"logit_scale"})  # CLIP's contrastive temperature: no part of the text tower
OPENCLIP_PAD_TOKEN = "!"  # OpenCLIP pads prompts with token 0, "!" in CLIP's vocabulary (SD 2.x, SDXL's tokenizer_2)


def detect_layout(state: Mapping[str, np.ndarray], path: str | Path = "the checkpoint") -> str:
    """The :data:`LAYOUTS` name whose U-Net, VAE and text-encoder prefixes all have keys in ``state``; else a
    one-line ValueError naming the file's first keys, their count and the known layouts' prefixes."""
    keys = list(state)
    for name, layout in LAYOUTS.items():
        prefixes = (UNET_PREFIX, VAE_PREFIX) + tuple(e.prefix for e in layout.text_encoders)
        if all(any(k.startswith(p) for k in keys) for p in prefixes):
            return name
    known = "; ".join(f"{layout.title}: " + " + ".join(p + "*" for p in (UNET_PREFIX, VAE_PREFIX) + tuple(
        e.prefix for e in layout.text_encoders)) for layout in LAYOUTS.values())
    raise ValueError(f"{path}: its {len(keys)} keys ({', '.join(keys[:3])}{', …' if len(keys) > 3 else ''}) match no "
                     f"known single-file layout ({known})")


def network_prefixes(layout: str) -> dict[str, str]:
    """{"unet": "model.diffusion_model.", "vae": "first_stage_model.", each text encoder's component: its prefix}."""
    return {"unet": UNET_PREFIX, "vae": VAE_PREFIX} | {e.component: e.prefix for e in LAYOUTS[layout].text_encoders}


def split_single_file(state: Mapping[str, np.ndarray], layout: str, use_ema: bool = False
                      ) -> dict[str, dict[str, np.ndarray]]:
    """A single-file state dict → {"unet", "vae", each text encoder's component, "unexpected"}, each keyed by
    the names under its prefix (prefix removed; ``position_ids`` buffers dropped). With ``use_ema`` the
    U-Net's weights are read from ``model_ema.<key without dots>`` (LDM's EMA copy), as diffusers' converter does."""
    prefixes = network_prefixes(layout)
    parts: dict[str, dict[str, np.ndarray]] = {name: {} for name in (*prefixes, "unexpected")}
    if use_ema and not any(k.startswith(EMA_PREFIX) and k not in LDM_BUFFERS for k in state):
        raise ValueError("use_ema=True but the checkpoint has no model_ema.* weights (an EMA-only file: "
                         "its model.diffusion_model.* weights are already the EMA ones; use use_ema=False)")
    for key, value in state.items():
        name = next((n for n, prefix in prefixes.items() if key.startswith(prefix)), None)
        if name is None:
            if key not in LDM_BUFFERS and not key.startswith(EMA_PREFIX):
                parts["unexpected"][key] = value
            continue
        if name == "unet" and use_ema:
            flat = EMA_PREFIX + "".join(key.split(".")[1:])  # model_ema.diffusion_modelinput_blocks00weight
            if flat not in state:
                raise ValueError(f"use_ema=True but the checkpoint has no {flat} for {key}")
            value = state[flat]
        if not key.endswith("position_ids"):
            parts[name][key[len(prefixes[name]):]] = value
    return parts


def openclip_to_transformers(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """OpenCLIP text-tower names → transformers' (without ``text_model.``): :data:`OPENCLIP_NAMES`, plus the two
    layout changes: ``attn.in_proj_weight`` [3W, W] (nn.MultiheadAttention's q; k; v stacked) → ``q_proj``,
    ``k_proj``, ``v_proj`` [W, W] each, and ``text_projection`` [W, P] (applied as x @ P) → a Linear's
    ``text_projection.weight`` [P, W]. ``logit_scale`` is dropped (:data:`OPENCLIP_UNUSED`)."""
    out = {}
    for key, value in state.items():
        if key in OPENCLIP_UNUSED:
            continue
        if key == "text_projection":
            out["text_projection.weight"] = np.asarray(value).T
            continue
        for old, new in OPENCLIP_NAMES:
            key = key.replace(old, new)
        stem, fused, leaf = key.rpartition(".in_proj_")  # "encoder.layers.0.self_attn", ".in_proj_", "weight"
        if fused:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(np.asarray(value), 3, axis=0)):
                out[f"{stem}.{name}.{leaf}"] = part
        else:
            out[key] = value
    return out


_LAYER_INDEX = re.compile(r"^encoder\.layers\.(\d+)\.")


def text_encoder_state(names: Mapping[str, np.ndarray], entry: TextEncoderEntry, config: CLIPTextConfig,
                       projected: bool) -> dict[str, np.ndarray]:
    """One text encoder's names in the file → the transformers names its module (:func:`_load_tower`'s) reads:
    ``text_model.…`` + ``text_projection.weight`` for a CLIPTextModelWithProjection, bare ``encoder.…`` for a
    CLIPTextModel. For a bare OpenCLIP tower (SD 2.x) the projection and the blocks past ``num_hidden_layers``
    are dropped: FrozenOpenCLIPEmbedder(layer="penultimate") never runs its last block (so diffusers'
    text_encoder has 23 of ViT-H's 24)."""
    state = openclip_to_transformers(names) if entry.names == "openclip" else dict(names)
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    if projected:
        return {k if k.startswith("text_projection.") else "text_model." + k: v for k, v in state.items()}
    if entry.names == "openclip":
        state = {k: v for k, v in state.items() if not k.startswith("text_projection.") and not (
            (m := _LAYER_INDEX.match(k)) and int(m[1]) >= config.num_hidden_layers)}
    return state


def compvis_to_diffusers(parts: Mapping[str, Mapping[str, np.ndarray]], unet_config: UNetConfig,
                         vae_config: AutoencoderKLConfig) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str]]:
    """The U-Net's and VAE's CompVis names → diffusers names; returns them and {diffusers name: CompVis name}."""
    unet_table, vae_table = unet_prefixes(unet_config), vae_prefixes(vae_config)
    origin = {}
    unet, vae = {}, {}
    for key, value in parts["unet"].items():
        new = _rename(key, unet_table, _UNET_RESNET, ".resnets.")
        unet[new], origin["unet", new] = value, UNET_PREFIX + key
    for key, value in parts["vae"].items():
        new = _rename(key, vae_table, _VAE_INNER, "")
        vae[new], origin["vae", new] = value, VAE_PREFIX + key
    return {"unet": unet, "vae": vae_state_dict(vae)}, origin


@dataclasses.dataclass(frozen=True)
class CompVisModels:
    """The networks of a single-file checkpoint and their params ({"unet", "vae", "text_encoder"} + SDXL's
    "text_encoder_2"; the SDXL refiner: no "text_encoder"); ``layout`` is its :data:`LAYOUTS` name."""

    layout: str
    unet: UNet
    vae: AutoencoderKL
    text_encoder: CLIPTextTransformer | None
    params: dict[str, Params]
    text_encoder_2: CLIPTextModelWithProjection | None = None


def _few(names: Sequence[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", …" if len(names) > n else "")


def load_compvis(path: str | Path, configs: Mapping[str, Mapping[str, Any]] | None = None,
                 use_ema: bool = False) -> CompVisModels:
    """Load a single-file checkpoint (.safetensors, or a .ckpt/.pt/.pth/.bin torch pickle) of any of
    :data:`LAYOUTS`, told from its keys.

    ``configs``: {"unet", "vae", and the layout's text encoders: "text_encoder", "text_encoder_2"} as config.json dicts (diffusers' and
    transformers'); default the released model's (:data:`IMPLIED_CONFIGS`). Raises ONE one-line ValueError
    naming, per network, a few of the keys missing from the file (our param paths), unexpected in it or
    mis-shaped, with their counts, plus any key outside the networks' prefixes.
    """
    state = read_state_dict(path)
    layout = detect_layout(state, path)
    configs = configs or IMPLIED_CONFIGS[layout]
    absent = [e.component for e in LAYOUTS[layout].text_encoders if e.component not in configs]
    if absent:
        raise ValueError(f"{path} is a {LAYOUTS[layout].title} checkpoint, but its configs have no {', '.join(absent)} "
                         f"(a config folder must be a diffusers folder of the same kind)")
    unet = UNet(unet_config_from_diffusers(configs["unet"]))
    vae = AutoencoderKL(autoencoder_kl_config_from_diffusers(configs["vae"]))
    texts = {e.component: (CLIPTextModelWithProjection if e.component == "text_encoder_2" else CLIPTextTransformer)(
        text_config_from_transformers(configs[e.component])) for e in LAYOUTS[layout].text_encoders}
    parts = split_single_file(state, layout, use_ema=use_ema)
    renamed, origin = compvis_to_diffusers(parts, unet.config, vae.config)
    size = vae.config.downsampling_factor
    targets = {"unet": param_shapes(unet, *unet.config.input_specs()),
               "vae": param_shapes(vae, jax.ShapeDtypeStruct((1, size, size, vae.config.in_channels), jnp.float32))}
    for entry in LAYOUTS[layout].text_encoders:
        module = texts[entry.component]
        projected = isinstance(module, CLIPTextModelWithProjection)
        renamed[entry.component] = text_encoder_state(parts[entry.component], entry, module.config, projected)
        targets[entry.component] = param_shapes(module, example_ids(module.config))
    prefixes = network_prefixes(layout)
    params, errors = {}, []
    if parts["unexpected"]:
        errors.append(f"{len(parts['unexpected'])} unexpected keys outside the networks ({_few(sorted(parts['unexpected']))})")
    for name, target in targets.items():
        try:
            params[name] = convert_state_dict(renamed[name], target, rename=clip_key if "text" in name else unet_key)
        except StateDictMismatch as err:
            unexpected = sorted(origin.get((name, k), prefixes[name] + k) for k in err.unexpected)
            found = [f"{len(keys)} {what} ({_few(keys)})" for what, keys in (
                ("missing", err.missing), ("unexpected", unexpected), ("mis-shaped", err.misshaped)) if keys]
            errors.append(f"{prefixes[name]}* ({name}): {', '.join(found)}")
    if errors:
        raise ValueError(f"{path} does not match the {LAYOUTS[layout].title} networks: {'; '.join(errors)}")
    return CompVisModels(layout, unet, vae, texts.get("text_encoder"), params, texts.get("text_encoder_2"))


def load_single_file(path: str | Path, config_folder: str | Path | None = None, use_ema: bool = False) -> CompVisModels:
    """A single-file checkpoint with the configs of a diffusers folder of the same kind, if given.

    ``config_folder``'s ``unet/``, ``vae/``, ``text_encoder/`` (and SDXL's ``text_encoder_2/``; a refiner folder has
    no ``text_encoder/``) config.json
    give the networks' shapes (for a fine-tune of another size); without it, the released model's configs of
    the layout the keys show are implied (:data:`IMPLIED_CONFIGS`). The weights are read from ``path`` only.
    """
    configs = None
    if config_folder is not None:
        folder = Path(config_folder)
        configs = {name: read_config_json(folder / name) for name in ("unet", "vae", "text_encoder", "text_encoder_2")
                   if (folder / name).is_dir()}
    return load_compvis(path, configs, use_ema=use_ema)

__all__ = ["IMPLIED_CONFIGS", "LAYOUTS", "OPENCLIP_NAMES", "OPENCLIP_PAD_TOKEN", "OPENCLIP_UNUSED", "CompVisModels",
           "Layout", "TextEncoderEntry", "compvis_to_diffusers", "detect_layout", "load_compvis", "load_single_file",
           "network_prefixes", "openclip_to_transformers", "split_single_file", "text_encoder_state", "unet_prefixes",
           "vae_prefixes"]
