"""Load pretrained PyTorch (diffusers) weights into our Flax modules, with nothing but NumPy.

A diffusers model folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors``. We
read the tensors with ``safetensors.numpy`` (no torch at run time), then convert the flat PyTorch
state dict into our nested params in two steps:

1. names: ``down_blocks.0.resnets.1.conv1.weight`` → ``("down_blocks_0", "resnets_1", "conv1", "kernel")``
   (our modules are named like diffusers' with ``.N`` written ``_N``; PyTorch's ``weight`` is a
   Flax ``kernel`` (Dense, Conv), ``scale`` (GroupNorm, LayerNorm) or ``embedding`` (Embed));
2. layouts: conv weights are OIHW in PyTorch and HWIO in Flax; linear weights are [out, in] in
   PyTorch and [in, out] in Flax.

``convert_state_dict`` does both for any model given a key-renaming function, so the VAE and
CLIP loaders reuse it. Every missing, unexpected or mis-shaped key is reported in one ValueError.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddpm_jax.models.unet import UNet, UNetConfig

Params = dict[str, Any]

# --------------------------------------------------------------------------------------------
# Generic: a PyTorch state dict → Flax params
# --------------------------------------------------------------------------------------------


def flax_path(torch_key: str) -> tuple[str, ...]:
    """``"down_blocks.0.resnets.1.conv1.weight"`` → ``("down_blocks_0", "resnets_1", "conv1", "weight")``."""
    path: list[str] = []
    for part in torch_key.split("."):
        if part.isdigit() and path:
            path[-1] += f"_{part}"  # a PyTorch ModuleList index becomes a name suffix
        else:
            path.append(part)
    return tuple(path)


def _to_flax_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)  # conv: [O, I, kh, kw] → [kh, kw, I, O]
    if leaf == "kernel" and array.ndim == 2:
        return array.T  # linear: [out, in] → [in, out]
    return array


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    target: Params,
    rename: Callable[[str], str] = lambda key: key,
) -> Params:
    """Convert a flat PyTorch state dict into Flax params shaped like ``target``.

    Args:
      state_dict: PyTorch names → NumPy arrays (e.g. ``safetensors.numpy.load_file(...)``).
      target: the model's params, or their shapes (``jax.eval_shape(module.init, ...)["params"]``).
      rename: maps a checkpoint key to the PyTorch key our module naming mirrors (e.g. an old
        attention name to its current diffusers name); applied before ``flax_path``.
    Returns:
      nested params with target's structure, as float32 (target's dtype) jax arrays.
    Raises:
      ValueError listing every key missing from the checkpoint, unexpected in it, or mis-shaped.
    """
    wanted = traverse_util.flatten_dict(target)  # {("down_blocks_0", ..., "kernel"): ShapeDtypeStruct}
    params, unexpected, misshaped = {}, [], {}  # misshaped: Flax path → message
    for key, array in state_dict.items():
        *parent, leaf = flax_path(rename(key))
        parent = tuple(parent)
        if leaf == "weight":  # which kind of layer decides the Flax name
            leaf = next((n for n in ("kernel", "scale", "embedding") if parent + (n,) in wanted), "weight")
        path = parent + (leaf,)
        if path not in wanted:
            unexpected.append(key)
            continue
        value = _to_flax_layout(np.asarray(array), leaf)
        if value.shape != tuple(wanted[path].shape):
            misshaped[path] = (
                f"{key}: checkpoint {tuple(array.shape)} -> {value.shape}, model {'/'.join(path)} expects "
                f"{tuple(wanted[path].shape)}"
            )
            continue
        params[path] = jnp.asarray(value, dtype=wanted[path].dtype)
    missing = ["/".join(path) for path in wanted if path not in params and path not in misshaped]
    if missing or unexpected or misshaped:
        lines = ["checkpoint does not match the model:"]
        if missing:
            lines.append(f"  missing from the checkpoint ({len(missing)}): {', '.join(sorted(missing))}")
        if unexpected:
            lines.append(f"  unexpected in the checkpoint ({len(unexpected)}): {', '.join(sorted(unexpected))}")
        if misshaped:
            lines.append(f"  wrong shape ({len(misshaped)}): {'; '.join(sorted(misshaped.values()))}")
        raise ValueError("\n".join(lines))
    return traverse_util.unflatten_dict(params)


def read_config_json(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict; FileNotFoundError naming the folder when it is missing."""
    config_file = Path(folder) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"no config.json in {folder}")
    return json.loads(config_file.read_text())


def read_state_dict(folder: Path, stem: str = "diffusion_pytorch_model", variant: str | None = None
                    ) -> dict[str, np.ndarray]:
    """Read ``{stem}[.{variant}].safetensors`` with NumPy; fall back to ``.bin`` (read by ``torch_pickle``,
    no torch). ``variant`` is diffusers' file variant, e.g. "fp16" (``…fp16.safetensors``) or "non_ema"."""
    folder = Path(folder)
    if variant:
        stem = f"{stem}.{variant}"
    safetensors_file, bin_file = folder / f"{stem}.safetensors", folder / f"{stem}.bin"
    if safetensors_file.exists():
        from safetensors.numpy import load_file

        return load_file(safetensors_file)
    if bin_file.exists():
        from ddpm_jax import torch_pickle

        return torch_pickle.load_state_dict(bin_file)
    raise FileNotFoundError(f"no {stem}.safetensors (or .bin) in {folder}")


# --------------------------------------------------------------------------------------------
# The DDPM U-Net (diffusers UNet2DModel)
# --------------------------------------------------------------------------------------------

# UNet2DModel's defaults, for keys that an older config.json leaves out.
_UNET2D_DEFAULTS = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1.0,
    "downsample_padding": 1,
    "dropout": 0.0,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "add_attention": True,
    "time_embedding_dim": None,
    "num_class_embeds": None,
}

# Options of UNet2DModel that this U-Net implements only with these values.
_UNET2D_REQUIRED = {
    "center_input_sample": (False,),
    "time_embedding_type": ("positional",),
    "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default",),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "mid_block_type": ("UNetMidBlock2D",),
    "class_embed_type": (None,),
}

# UNet2DConditionModel's defaults (Stable Diffusion 1.x's values, but cross_attention_dim 1280).
# Its "attention_head_dim" is, despite the name, the NUMBER of heads (diffusers issue #2011):
# it becomes our num_attention_heads.
_UNET2D_CONDITION_DEFAULTS = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "use_linear_projection": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "time_embedding_dim": None,
    "projection_class_embeddings_input_dim": None,
}

# Options of UNet2DConditionModel that this U-Net implements only with these values (the defaults;
# "upcast_attention" is irrelevant: our attention softmax always runs in float32).
_UNET2D_CONDITION_REQUIRED = {
    "center_input_sample": (False,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "act_fn": ("silu", "swish"),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embed_type": (None, "projection"),
    "addition_embed_type": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}
_CONDITION_BLOCK_TYPES = {"DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"}


def _check_required(diffusers_config: Mapping[str, Any], required: Mapping[str, tuple]) -> None:
    for key, allowed in required.items():
        value = diffusers_config.get(key, allowed[0])
        value = tuple(value) if isinstance(value, list) else value
        if isinstance(value, tuple) and key == "only_cross_attention":
            value = value[0] if len(set(value)) == 1 else value  # a per-level list of one value
        if value not in allowed:
            raise ValueError(f"config.json sets {key}={diffusers_config[key]!r}, not implemented (supported: {allowed})")


def unet_config_from_diffusers(diffusers_config: Mapping[str, Any]) -> UNetConfig:
    """A diffusers UNet2DModel or UNet2DConditionModel ``config.json`` (as a dict) → ``UNetConfig``."""
    class_name = diffusers_config.get("_class_name")
    if class_name == "UNet2DConditionModel":
        return _unet2d_condition_config(diffusers_config)
    if class_name != "UNet2DModel":
        raise ValueError(
            f"load_unet reads diffusers UNet2DModel or UNet2DConditionModel folders, but config.json has "
            f"_class_name={class_name!r}"
        )
    _check_required(diffusers_config, _UNET2D_REQUIRED)
    if diffusers_config.get("attn_norm_num_groups") not in (None, diffusers_config.get("norm_num_groups", 32)):
        raise ValueError("config.json sets attn_norm_num_groups different from norm_num_groups: not implemented")

    fields = {key: diffusers_config.get(key, default) for key, default in _UNET2D_DEFAULTS.items()}
    if "attention_head_dim" not in diffusers_config and "attn_num_head_channels" in diffusers_config:
        fields["attention_head_dim"] = diffusers_config["attn_num_head_channels"]  # its name before diffusers 0.15
    if fields["sample_size"] is None:
        fields["sample_size"] = 2 ** (len(fields["block_out_channels"]) - 1)
    return UNetConfig(**fields)


def _unet2d_condition_config(diffusers_config: Mapping[str, Any]) -> UNetConfig:
    """A diffusers UNet2DConditionModel ``config.json`` → ``UNetConfig`` (Stable Diffusion's U-Net)."""
    _check_required(diffusers_config, _UNET2D_CONDITION_REQUIRED)
    fields = {key: diffusers_config.get(key, default) for key, default in _UNET2D_CONDITION_DEFAULTS.items()}
    for key in ("down_block_types", "up_block_types"):
        unsupported = sorted(set(fields[key]) - _CONDITION_BLOCK_TYPES)
        if unsupported:
            raise ValueError(
                f"config.json sets {key} with {unsupported}, not implemented (supported: {sorted(_CONDITION_BLOCK_TYPES)})"
            )
    for key in ("cross_attention_dim", "layers_per_block", "transformer_layers_per_block"):
        if not isinstance(fields[key], int):
            raise ValueError(f"config.json sets {key}={fields[key]!r}: only one int for all levels is implemented")
    if fields["norm_num_groups"] is None:
        raise ValueError("config.json sets norm_num_groups=None (no output GroupNorm): not implemented")
    # The naming quirk: num_attention_heads, when given, or else attention_head_dim, is the number of heads.
    heads = diffusers_config.get("num_attention_heads") or diffusers_config.get("attention_head_dim", 8)
    fields["num_attention_heads"] = tuple(heads) if isinstance(heads, (list, tuple)) else heads
    if isinstance(fields["sample_size"], (list, tuple)):
        fields["sample_size"] = tuple(fields["sample_size"])
    if fields["sample_size"] is None:
        fields["sample_size"] = 2 ** (len(fields["block_out_channels"]) - 1)
    if fields["class_embed_type"] == "projection":
        fields["num_class_embeds"] = None  # diffusers ignores it then
    return UNetConfig(**fields)


# The google/ddpm-* checkpoints use diffusers' old attention-block names.
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_ATTENTION_KEY = re.compile(r"(attentions\.\d+)\.(query|key|value|proj_attn)\.")


def _unet_key(key: str) -> str:
    """``mid_block.attentions.0.proj_attn.weight`` → ``mid_block.attentions.0.to_out.0.weight``; others unchanged."""
    return _LEGACY_ATTENTION_KEY.sub(lambda m: f"{m[1]}.{_LEGACY_ATTENTION_NAMES[m[2]]}.", key)


def load_unet(path: str | Path, variant: str | None = None) -> tuple[UNet, Params]:
    """Load a diffusers UNet2DModel or UNet2DConditionModel folder (config.json + diffusion_pytorch_model.safetensors).

    The folder's config.json ``_class_name`` decides which. Returns ``(module, params)``; run it with
    ``module.apply({"params": params}, x, t)`` (x NHWC), plus ``context`` ([B, L, cross_attention_dim],
    diffusers' ``encoder_hidden_states``) and/or ``class_labels`` for a conditional model. The
    transformer keys map one to one (``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`` →
    ``down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k``, ``ff.net.0.proj`` → ``ff/net_0/proj``).
    Both the current (``to_q``/``to_k``/``to_v``/``to_out.0``) and the legacy
    (``query``/``key``/``value``/``proj_attn``) self-attention names are accepted.
    """
    folder = Path(path)
    config = unet_config_from_diffusers(read_config_json(folder))
    module = UNet(config)
    # The smallest valid inputs: the params do not depend on the image size or the context length.
    target = jax.eval_shape(module.init, jax.random.key(0), *config.input_specs())["params"]
    params = convert_state_dict(read_state_dict(folder, variant=variant), target, rename=_unet_key)
    return module, params


# --------------------------------------------------------------------------------------------
# The LDM / Stable Diffusion VAE (diffusers AutoencoderKL)
# --------------------------------------------------------------------------------------------

from ddpm_jax.models.vae import AutoencoderKL, AutoencoderKLConfig  # noqa: E402

# AutoencoderKL's defaults, for keys that an older config.json leaves out.
_AUTOENCODER_KL_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "mid_block_add_attention": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
}

_LEGACY_OR_NEW_ATTENTION_WEIGHT = re.compile(r"attentions\.\d+\.(query|key|value|proj_attn|to_q|to_k|to_v|to_out\.0)\.weight$")


def autoencoder_kl_config_from_diffusers(diffusers_config: Mapping[str, Any]) -> AutoencoderKLConfig:
    """A diffusers AutoencoderKL ``config.json`` (as a dict) → ``AutoencoderKLConfig``."""
    class_name = diffusers_config.get("_class_name")
    if class_name != "AutoencoderKL":
        raise ValueError(
            f"load_vae reads diffusers AutoencoderKL folders, but config.json has _class_name={class_name!r}"
        )
    fields = {key: diffusers_config.get(key, default) for key, default in _AUTOENCODER_KL_DEFAULTS.items()}
    fields["block_out_channels"] = tuple(fields["block_out_channels"])
    levels = len(fields["block_out_channels"])
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = tuple(diffusers_config.get(key, (block,) * levels))
        if types != (block,) * levels:
            raise ValueError(f"config.json sets {key}={types}; only {levels} × {block!r} is implemented")
    if diffusers_config.get("act_fn", "silu") not in ("silu", "swish"):
        raise ValueError(f"config.json sets act_fn={diffusers_config['act_fn']!r}, not implemented (supported: silu)")
    for key in ("latents_mean", "latents_std"):
        if diffusers_config.get(key) is not None:
            raise ValueError(f"config.json sets {key}: per-channel latent normalisation is not implemented")
    if isinstance(fields["sample_size"], (list, tuple)):
        fields["sample_size"] = fields["sample_size"][0]
    return AutoencoderKLConfig(**fields)


def _vae_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Attention projections stored as 1×1 convs ([O, I, 1, 1], as in LDM's original code) → linear [O, I]."""
    out = {}
    for key, array in state_dict.items():
        if _LEGACY_OR_NEW_ATTENTION_WEIGHT.search(key) and array.ndim == 4 and array.shape[2:] == (1, 1):
            array = array[:, :, 0, 0]
        out[key] = array
    return out


def load_vae(path: str | Path, variant: str | None = None) -> tuple[AutoencoderKL, Params]:
    """Load a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors).

    Returns ``(module, params)``; e.g. ``module.apply({"params": params}, x, method=AutoencoderKL.encode)``
    with x NHWC in [−1, 1]. Both the current (``to_q``/``to_k``/``to_v``/``to_out.0``) and the legacy
    (``query``/``key``/``value``/``proj_attn``) attention names are accepted, as in ``load_unet``.
    """
    folder = Path(path)
    config = autoencoder_kl_config_from_diffusers(read_config_json(folder))
    module = AutoencoderKL(config)
    size = config.downsampling_factor  # the smallest valid input: params do not depend on it
    target = jax.eval_shape(
        module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
    )["params"]
    params = convert_state_dict(_vae_state_dict(read_state_dict(folder, variant=variant)), target, rename=_unet_key)
    return module, params
