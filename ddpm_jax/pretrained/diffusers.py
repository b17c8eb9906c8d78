"""diffusers model folders → our Flax modules and params (no torch, no diffusers at run time).

A diffusers model folder holds ``config.json`` and ``diffusion_pytorch_model[.variant].safetensors``
(or ``.bin``, a torch pickle), read by ``state_dict.read_state_dict`` and converted by
``convert.convert_state_dict``. What is diffusers-specific lives here:

* the config converters (``unet_config_from_diffusers`` for UNet2DModel and UNet2DConditionModel,
  ``autoencoder_kl_config_from_diffusers``), which refuse every option this library does not implement;
* the key renames: ``unet_key`` (the legacy attention names ``query``/``key``/``value``/``proj_attn``
  of the google/ddpm-* checkpoints → ``to_q``/``to_k``/``to_v``/``to_out.0``) and ``vae_state_dict``
  (attention projections stored as 1×1 convs → linear);
* the loaders ``load_unet`` and ``load_vae``;
* the google/ddpm-* DDPM folders (a UNet2DModel + a DDPMScheduler ``scheduler_config.json``):
  ``find_ddpm_folders`` and ``load_ddpm_folder``, which checks the scheduler options we implement.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import schedulers
from ddpm_jax.models.unet import UNet, UNetConfig
from ddpm_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from ddpm_jax.pretrained.convert import Params, convert_state_dict, param_shapes
from ddpm_jax.pretrained.state_dict import read_config_json, read_state_dict

# --------------------------------------------------------------------------------------------
# The DDPM U-Net (diffusers UNet2DModel)
# --------------------------------------------------------------------------------------------

# UNet2DModel's defaults, for keys that an older config.json leaves out.
UNET2D_DEFAULTS = {
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
UNET2D_REQUIRED = {
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
UNET2D_CONDITION_DEFAULTS = {
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
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
}

# Options of UNet2DConditionModel that this U-Net implements only with these values (the defaults;
# "upcast_attention" is irrelevant: our attention softmax always runs in float32).
UNET2D_CONDITION_REQUIRED = {
    "center_input_sample": (False,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "act_fn": ("silu", "swish"),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embed_type": (None, "projection"),
    "addition_embed_type": (None, "text_time"),  # "text_time": SDXL's pooled text embedding + time ids
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
    _check_required(diffusers_config, UNET2D_REQUIRED)
    if diffusers_config.get("attn_norm_num_groups") not in (None, diffusers_config.get("norm_num_groups", 32)):
        raise ValueError("config.json sets attn_norm_num_groups different from norm_num_groups: not implemented")

    fields = {key: diffusers_config.get(key, default) for key, default in UNET2D_DEFAULTS.items()}
    if "attention_head_dim" not in diffusers_config and "attn_num_head_channels" in diffusers_config:
        fields["attention_head_dim"] = diffusers_config["attn_num_head_channels"]  # its name before diffusers 0.15
    if fields["sample_size"] is None:
        fields["sample_size"] = 2 ** (len(fields["block_out_channels"]) - 1)
    return UNetConfig(**fields)


def _unet2d_condition_config(diffusers_config: Mapping[str, Any]) -> UNetConfig:
    """A diffusers UNet2DConditionModel ``config.json`` → ``UNetConfig`` (Stable Diffusion's U-Net)."""
    _check_required(diffusers_config, UNET2D_CONDITION_REQUIRED)
    fields = {key: diffusers_config.get(key, default) for key, default in UNET2D_CONDITION_DEFAULTS.items()}
    for key in ("down_block_types", "up_block_types"):
        unsupported = sorted(set(fields[key]) - _CONDITION_BLOCK_TYPES)
        if unsupported:
            raise ValueError(
                f"config.json sets {key} with {unsupported}, not implemented (supported: {sorted(_CONDITION_BLOCK_TYPES)})"
            )
    layers = fields["transformer_layers_per_block"]
    if isinstance(layers, (list, tuple)) and any(not isinstance(n, int) for n in layers):
        raise ValueError(f"config.json sets transformer_layers_per_block={layers!r}: nested per-block lists are not "
                         f"implemented (one int, or one per level)")
    fields["transformer_layers_per_block"] = tuple(layers) if isinstance(layers, (list, tuple)) else layers
    for key in ("cross_attention_dim", "layers_per_block"):
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


# The diffusers version whose config.json format the exporter writes (what its save_pretrained writes).
DIFFUSERS_FORMAT_VERSION = "0.42.1"


def unet_config_to_diffusers(config: UNetConfig) -> dict[str, Any]:
    """The inverse of :func:`unet_config_from_diffusers`: ``UNetConfig`` → the ``config.json`` diffusers'
    ``save_pretrained`` writes, a UNet2DModel for a U-Net without cross-attention, else a
    UNet2DConditionModel (whose ``attention_head_dim`` is the number of heads, the naming quirk)."""
    if config.has_cross_attention:
        return _unet2d_condition_config_to_diffusers(config)
    if config.class_embed_type is not None:
        raise ValueError(f"class_embed_type={config.class_embed_type!r} without cross-attention has no diffusers "
                         "UNet2DModel equivalent (it has num_class_embeds only)")
    out = {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_FORMAT_VERSION}
    out.update({key: getattr(config, key) for key in UNET2D_DEFAULTS})
    out.update({key: allowed[0] for key, allowed in UNET2D_REQUIRED.items()})
    out.update(attn_norm_num_groups=None, num_train_timesteps=None)
    return _json_ready(out)


def _unet2d_condition_config_to_diffusers(config: UNetConfig) -> dict[str, Any]:
    out = {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_FORMAT_VERSION}
    out.update({key: getattr(config, key) for key in UNET2D_CONDITION_DEFAULTS})
    out.update({key: allowed[0] for key, allowed in UNET2D_CONDITION_REQUIRED.items()})
    out.update(mid_block_type=config.mid_block_type, class_embed_type=config.class_embed_type,
               addition_embed_type=config.addition_embed_type,
               attention_head_dim=config.num_attention_heads, num_attention_heads=None)  # heads: see the quirk above
    return _json_ready(out)


def _json_ready(config: dict[str, Any]) -> dict[str, Any]:
    """Tuples → lists and keys sorted, as diffusers' ``to_json_string`` writes them."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in sorted(config.items())}


# The google/ddpm-* checkpoints use diffusers' old attention-block names.
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_ATTENTION_KEY = re.compile(r"(attentions\.\d+)\.(query|key|value|proj_attn)\.")


def unet_key(key: str) -> str:
    """The U-Net's (and VAE's) key rename, legacy attention names → current ones:
    ``mid_block.attentions.0.proj_attn.weight`` → ``mid_block.attentions.0.to_out.0.weight``; others unchanged."""
    return _LEGACY_ATTENTION_KEY.sub(lambda m: f"{m[1]}.{_LEGACY_ATTENTION_NAMES[m[2]]}.", key)


def load_unet(path: str | Path, variant: str | None = None) -> tuple[UNet, Params]:
    """Load a diffusers UNet2DModel or UNet2DConditionModel folder: config.json +
    ``diffusion_pytorch_model[.variant].safetensors`` (or ``.bin``, a torch pickle).

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
    target = param_shapes(module, *config.input_specs())
    params = convert_state_dict(read_state_dict(folder, variant=variant), target, rename=unet_key)
    return module, params


# --------------------------------------------------------------------------------------------
# The LDM / Stable Diffusion VAE (diffusers AutoencoderKL)
# --------------------------------------------------------------------------------------------

# AutoencoderKL's defaults, for keys that an older config.json leaves out.
AUTOENCODER_KL_DEFAULTS = {
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
    fields = {key: diffusers_config.get(key, default) for key, default in AUTOENCODER_KL_DEFAULTS.items()}
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


def autoencoder_kl_config_to_diffusers(config: AutoencoderKLConfig) -> dict[str, Any]:
    """The inverse of :func:`autoencoder_kl_config_from_diffusers`: ``AutoencoderKLConfig`` → the AutoencoderKL
    ``config.json`` diffusers' ``save_pretrained`` writes (``scaling_factor``: the one the run measured)."""
    levels = len(config.block_out_channels)
    out = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_FORMAT_VERSION}
    out.update({key: getattr(config, key) for key in AUTOENCODER_KL_DEFAULTS})
    out.update(down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
               act_fn="silu", latents_mean=None, latents_std=None, force_upcast=True)
    return _json_ready(out)


def vae_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The VAE's state-dict fix (diffusers names, or CompVis names renamed to them): attention projections
    stored as 1×1 convs ([O, I, 1, 1], as in LDM's original code) → linear [O, I]; other keys unchanged."""
    out = {}
    for key, array in state_dict.items():
        if _LEGACY_OR_NEW_ATTENTION_WEIGHT.search(key) and array.ndim == 4 and array.shape[2:] == (1, 1):
            array = array[:, :, 0, 0]
        out[key] = array
    return out


def load_vae(path: str | Path, variant: str | None = None) -> tuple[AutoencoderKL, Params]:
    """Load a diffusers AutoencoderKL folder: config.json + ``diffusion_pytorch_model[.variant].safetensors``
    (or ``.bin``, a torch pickle).

    Returns ``(module, params)``; e.g. ``module.apply({"params": params}, x, method=AutoencoderKL.encode)``
    with x NHWC in [−1, 1]. Both the current (``to_q``/``to_k``/``to_v``/``to_out.0``) and the legacy
    (``query``/``key``/``value``/``proj_attn``) attention names are accepted, as in ``load_unet``.
    """
    folder = Path(path)
    config = autoencoder_kl_config_from_diffusers(read_config_json(folder))
    module = AutoencoderKL(config)
    size = config.downsampling_factor  # the smallest valid input: params do not depend on it
    target = param_shapes(module, jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32))
    params = convert_state_dict(vae_state_dict(read_state_dict(folder, variant=variant)), target, rename=unet_key)
    return module, params


# --------------------------------------------------------------------------------------------
# google/ddpm-* folders: a UNet2DModel + a DDPMScheduler config
# --------------------------------------------------------------------------------------------

# diffusers DDPMScheduler variance_type -> ours. "fixed_small_log" is the same variance taken through a log.
DDPM_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}


def find_ddpm_folders(folder: str | os.PathLike) -> tuple[Path, Path]:
    """(U-Net folder, scheduler folder) of a google/ddpm-* style folder.

    Either everything at the root (config.json + diffusion_pytorch_model.safetensors +
    scheduler_config.json, as google/ddpm-cifar10-32 ships) or a pipeline saved by
    ``DDPMPipeline.save_pretrained`` (unet/ and scheduler/ subfolders).
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"pretrained folder {str(root)!r} does not exist")
    unet = root / "unet" if (root / "unet" / "config.json").is_file() else root
    scheduler = root / "scheduler" if (root / "scheduler" / "scheduler_config.json").is_file() else root
    if not (unet / "config.json").is_file():
        raise FileNotFoundError(f"{root} has no config.json (nor unet/config.json): not a diffusers UNet2DModel folder")
    if not (scheduler / "scheduler_config.json").is_file():
        raise FileNotFoundError(f"{root} has no scheduler_config.json (nor scheduler/scheduler_config.json); "
                                "download it with the model (e.g. google/ddpm-cifar10-32)")
    return unet, scheduler


def check_ddpm_scheduler_config(scheduler_config: Mapping[str, Any]) -> None:
    """ValueError for a DDPMScheduler option we do not implement: a learned ``variance_type`` (only
    those of ``DDPM_VARIANCES``), ``thresholding``, a ``clip_sample_range`` other than 1."""
    variance = scheduler_config.get("variance_type", "fixed_small")  # DDPMScheduler's default
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"scheduler_config.json has variance_type={variance!r}; supported: "
                         f"{', '.join(DDPM_VARIANCES)} (learned variances are not implemented)")
    if scheduler_config.get("thresholding", False):
        raise ValueError("scheduler_config.json sets thresholding=true (dynamic thresholding): not implemented")
    if float(scheduler_config.get("clip_sample_range", 1.0)) != 1.0:
        raise ValueError(f"scheduler_config.json sets clip_sample_range={scheduler_config['clip_sample_range']}; "
                         "only 1.0 (clip x̂_0 to [-1, 1]) is implemented")


# The library's schedule names → diffusers' beta_schedule (ours rescales "linear" by 1000/T; diffusers does not).
DIFFUSERS_BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear"}
# ours → diffusers' prediction_type: the inverse of the one table schedulers.PREDICTION_TYPES
DIFFUSERS_PREDICTION_TYPES = {ours: theirs for theirs, ours in schedulers.PREDICTION_TYPES.items()}


def ddpm_scheduler_config_to_diffusers(schedule: str, num_timesteps: int, *, prediction: str = "eps",
                                       variance: str = "fixed_small", clip_sample: bool = True) -> dict[str, Any]:
    """The DDPMScheduler ``scheduler_config.json`` of a model trained with ``schedules.get_schedule(schedule,
    num_timesteps)``: ``SchedulerConfig.from_config`` of it gives exactly the same β's. Our "linear" endpoints
    1e-4, 0.02 are for T = 1000 and scaled by 1000/T (Ho et al. Sec. 4; ``schedules.linear_betas``), so the
    file holds the scaled endpoints; "cosine" is diffusers' "squaredcos_cap_v2" (Nichol & Dhariwal Eq. 17)."""
    if schedule not in DIFFUSERS_BETA_SCHEDULES:
        raise ValueError(f"diffusion.schedule={schedule!r} has no diffusers beta_schedule; supported: "
                         f"{', '.join(DIFFUSERS_BETA_SCHEDULES)}")
    beta_start, beta_end = (0.0001, 0.02) if schedule != "scaled_linear" else (0.00085, 0.012)
    if schedule == "linear":
        beta_start, beta_end = 1000.0 / num_timesteps * beta_start, 1000.0 / num_timesteps * beta_end
    config = {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
              "beta_end": beta_end, "beta_schedule": DIFFUSERS_BETA_SCHEDULES[schedule], "beta_start": beta_start,
              "clip_sample": bool(clip_sample), "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995,
              "num_train_timesteps": int(num_timesteps), "prediction_type": DIFFUSERS_PREDICTION_TYPES[prediction],
              "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "steps_offset": 0, "thresholding": False,
              "timestep_spacing": "leading", "trained_betas": None, "variance_type": variance}
    check_ddpm_scheduler_config(config)
    return config


def load_ddpm_folder(folder: str | os.PathLike, variant: str | None = None) -> tuple[UNet, Params, dict[str, Any]]:
    """A google/ddpm-* folder (:func:`find_ddpm_folders`) → ``(U-Net module, params, scheduler_config)``.

    Reads the UNet2DModel (:func:`load_unet`) and the DDPMScheduler ``scheduler_config.json`` (as a
    dict, ``schedulers.read_scheduler_config``), checked by :func:`check_ddpm_scheduler_config`; its
    ``variance_type`` maps to ours through ``DDPM_VARIANCES``. The scheduler is checked before the
    weights are read.
    """
    unet_dir, scheduler_dir = find_ddpm_folders(folder)
    scheduler_config = schedulers.read_scheduler_config(scheduler_dir)
    check_ddpm_scheduler_config(scheduler_config)
    module, params = load_unet(unet_dir, variant=variant)
    return module, params, scheduler_config


__all__ = ["AUTOENCODER_KL_DEFAULTS", "DDPM_VARIANCES", "DIFFUSERS_BETA_SCHEDULES", "DIFFUSERS_FORMAT_VERSION",
           "DIFFUSERS_PREDICTION_TYPES", "autoencoder_kl_config_to_diffusers", "ddpm_scheduler_config_to_diffusers",
           "unet_config_to_diffusers", "UNET2D_CONDITION_DEFAULTS", "UNET2D_CONDITION_REQUIRED",
           "UNET2D_DEFAULTS", "UNET2D_REQUIRED", "autoencoder_kl_config_from_diffusers", "check_ddpm_scheduler_config",
           "find_ddpm_folders", "load_ddpm_folder", "load_unet", "load_vae", "unet_config_from_diffusers", "unet_key",
           "vae_state_dict"]
