"""Load transformers CLIP checkpoints (text tower, vision tower, or both) into ``models.clip``.

A transformers model folder holds ``config.json`` and ``model[.variant].safetensors`` (or
``model[.variant].bin``, a torch pickle; ``variant`` e.g. "fp16", as in Stable Diffusion's
``text_encoder/model.fp16.safetensors``) — e.g. the ``text_encoder/`` folder of every Stable
Diffusion checkpoint (a ``CLIPTextModel``), or ``openai/clip-vit-large-patch14`` (a ``CLIPModel``).
Tensors are read by ``state_dict.read_state_dict`` (NumPy; no torch at run time) and converted by
``convert.convert_state_dict``, which lists every missing, unexpected or mis-shaped key in one
ValueError. Our modules use transformers' names except in attention, which is the U-Net's (``q_proj`` → ``to_q``, …, ``out_proj`` →
``to_out.0``); ``position_ids`` buffers (saved by older transformers versions) are ignored.

transformers v5 saves a bare ``CLIPTextModel`` without the ``text_model.`` prefix that older
versions (and SD checkpoints) have; both are accepted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.models.clip import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTextTransformer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    CLIPVisionTransformer,
)
from ddpm_jax.pretrained.convert import Params, convert_state_dict, param_shapes
from ddpm_jax.pretrained.state_dict import TRANSFORMERS_STEM, read_config_json, read_state_dict

# transformers' config defaults, for keys that a config.json leaves out.
_TEXT_DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
    "eos_token_id": 49407,
}
_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
    "num_channels": 3,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
}
# model_type → architecture, for config.json files without "architectures"
_MODEL_TYPES = {"clip_text_model": "CLIPTextModel", "clip_vision_model": "CLIPVisionModel", "clip": "CLIPModel"}


def text_config_from_transformers(config: Mapping[str, Any]) -> CLIPTextConfig:
    """A transformers CLIPTextConfig (as a dict) → ``CLIPTextConfig``."""
    return CLIPTextConfig(**{key: config.get(key, default) for key, default in _TEXT_DEFAULTS.items()})


def vision_config_from_transformers(config: Mapping[str, Any]) -> CLIPVisionConfig:
    """A transformers CLIPVisionConfig (as a dict) → ``CLIPVisionConfig``."""
    return CLIPVisionConfig(**{key: config.get(key, default) for key, default in _VISION_DEFAULTS.items()})


def _read_config(folder: Path, loader: str, expected: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """config.json → (architecture, config); ValueError if the architecture is not one of ``expected``."""
    config_file = folder / "config.json"
    config = read_config_json(folder)
    architectures = config.get("architectures") or [_MODEL_TYPES.get(config.get("model_type"), None)]
    found = next((a for a in architectures if a in expected), None)
    if found is None:
        raise ValueError(
            f"{loader} reads a transformers {' or '.join(expected)} folder, but {config_file} has "
            f"architectures={config.get('architectures')!r} (model_type={config.get('model_type')!r})"
        )
    return found, config


_ATTENTION_NAMES = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out.0"}
_ATTENTION_KEY = re.compile(r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.")


def clip_key(key: str) -> str:
    """CLIP's key rename: ``…self_attn.q_proj.weight`` → ``…self_attn.to_q.weight`` (our attention is the
    U-Net's); other keys unchanged."""
    return _ATTENTION_KEY.sub(lambda m: f".self_attn.{_ATTENTION_NAMES[m[1]]}.", key)


_TRANSFORMERS_ATTENTION_NAMES = {ours: theirs for theirs, ours in _ATTENTION_NAMES.items()}  # the same table, inverted
_OUR_ATTENTION_KEY = re.compile(r"\.self_attn\.(to_q|to_k|to_v|to_out\.0)\.")


def transformers_clip_key(key: str) -> str:
    """The inverse of :func:`clip_key` (for the exporter): ``…self_attn.to_q.weight`` → ``…self_attn.q_proj.weight``."""
    return _OUR_ATTENTION_KEY.sub(lambda m: f".self_attn.{_TRANSFORMERS_ATTENTION_NAMES[m[1]]}.", key)


# The transformers version whose config.json format the exporter writes.
TRANSFORMERS_FORMAT_VERSION = "5.24.0"


def clip_text_config_to_transformers(config: CLIPTextConfig, token_ids: Mapping[str, int] | None = None
                                     ) -> dict[str, Any]:
    """The inverse of :func:`text_config_from_transformers`: a CLIPTextConfig ``config.json`` dict (the text
    tower's fields; ``token_ids``: the tokenizer's ``bos_token_id`` / ``pad_token_id``)."""
    text = {key: getattr(config, key) for key in _TEXT_DEFAULTS}
    text.update(model_type="clip_text_model", attention_dropout=0.0, **(token_ids or {}))
    return text


def clip_config_to_transformers(config: CLIPConfig, token_ids: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The inverse of :func:`load_clip`'s config reading: ``CLIPConfig`` → the CLIPModel ``config.json``
    transformers' ``save_pretrained`` writes (the towers' fields, model types, the shared projection).
    ``token_ids``: the tokenizer's ``bos_token_id`` / ``pad_token_id`` (``eos_token_id`` is the config's)."""
    vision = {key: getattr(config.vision, key) for key in _VISION_DEFAULTS}
    vision.update(model_type="clip_vision_model", attention_dropout=0.0)
    return {"architectures": ["CLIPModel"], "model_type": "clip", "dtype": "float32",
            "transformers_version": TRANSFORMERS_FORMAT_VERSION, "projection_dim": config.projection_dim,
            "logit_scale_init_value": config.logit_scale_init_value,
            "text_config": clip_text_config_to_transformers(config.text, token_ids), "vision_config": vision}


def _state_dict(folder: Path, variant: str | None, strip: str | None = None) -> dict[str, np.ndarray]:
    """Read model[.variant].safetensors (or .bin), drop ``position_ids`` buffers, and strip a leading
    ``strip`` prefix."""
    state = {k: v for k, v in read_state_dict(folder, TRANSFORMERS_STEM, variant).items()
             if not k.endswith("position_ids")}
    if strip is not None:
        state = {k.removeprefix(strip): v for k, v in state.items()}
    return state


def example_ids(config: CLIPTextConfig) -> jax.ShapeDtypeStruct:
    """The smallest input of a text tower for :func:`convert.param_shapes`: [1, max_position_embeddings] int32."""
    return jax.ShapeDtypeStruct((1, config.max_position_embeddings), jnp.int32)


def _example_images(config: CLIPVisionConfig) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.num_channels), jnp.float32)


def _load_tower(folder: Path, variant: str | None, loader: str, bare: str, config_fn, bare_module, projected_module,
                prefix: str, example_fn) -> tuple[Any, Params]:
    """One tower (text or vision): ``bare`` (e.g. CLIPTextModel) or ``bare + "WithProjection"``.

    transformers v5 saves a bare tower's keys without its ``prefix`` (``text_model.``); v4 and the
    projection models keep it, so it is stripped for the bare architecture only.
    """
    architecture, config_dict = _read_config(folder, loader, (bare, bare + "WithProjection"))
    config = config_fn(config_dict)
    if architecture == bare:
        module, state = bare_module(config), _state_dict(folder, variant, strip=prefix)
    else:
        module, state = projected_module(config), _state_dict(folder, variant)
    return module, convert_state_dict(state, param_shapes(module, example_fn(config)), rename=clip_key)


def load_clip_text(path: str | Path, variant: str | None = None
                   ) -> tuple[CLIPTextTransformer | CLIPTextModelWithProjection, Params]:
    """Load a transformers ``CLIPTextModel`` or ``CLIPTextModelWithProjection`` folder: config.json +
    ``model[.variant].safetensors`` (or ``.bin``); ``variant`` e.g. "fp16" reads ``model.fp16.safetensors``.

    Returns ``(module, params)``: a ``CLIPTextTransformer`` for a CLIPTextModel (e.g. Stable
    Diffusion's ``text_encoder/``), a ``CLIPTextModelWithProjection`` otherwise. Run it with
    ``module.apply({"params": params}, input_ids)`` → ``CLIPEncoderOutput``.
    """
    return _load_tower(Path(path), variant, "load_clip_text", "CLIPTextModel", text_config_from_transformers,
                       CLIPTextTransformer, CLIPTextModelWithProjection, "text_model.", example_ids)


def load_clip_vision(path: str | Path, variant: str | None = None
                     ) -> tuple[CLIPVisionTransformer | CLIPVisionModelWithProjection, Params]:
    """Load a transformers ``CLIPVisionModel`` or ``CLIPVisionModelWithProjection`` folder: config.json +
    ``model[.variant].safetensors`` (or ``.bin``).

    Returns ``(module, params)``; run it with ``module.apply({"params": params}, images)``, images
    NHWC ``[B, image_size, image_size, 3]`` (transformers takes NCHW: transpose with (0, 2, 3, 1)).
    """
    return _load_tower(Path(path), variant, "load_clip_vision", "CLIPVisionModel", vision_config_from_transformers,
                       CLIPVisionTransformer, CLIPVisionModelWithProjection, "vision_model.", _example_images)


def load_clip(path: str | Path, variant: str | None = None) -> tuple[CLIPModel, Params]:
    """Load a full transformers ``CLIPModel`` folder (both towers, projections, logit_scale): config.json +
    ``model[.variant].safetensors`` (or ``.bin``).

    Returns ``(module, params)``; ``module.apply({"params": params}, input_ids, images)`` →
    ``CLIPOutput`` (``logits_per_image`` etc.); ``method=CLIPModel.encode_text`` /
    ``encode_image`` embed one side only.
    """
    folder = Path(path)
    _, config_dict = _read_config(folder, "load_clip", ("CLIPModel",))
    config = CLIPConfig(
        text=text_config_from_transformers(config_dict.get("text_config") or {}),
        vision=vision_config_from_transformers(config_dict.get("vision_config") or {}),
        projection_dim=config_dict.get("projection_dim", 512),
        logit_scale_init_value=config_dict.get("logit_scale_init_value", 2.6592),
    )
    module = CLIPModel(config)
    target = param_shapes(module, example_ids(config.text), _example_images(config.vision))
    return module, convert_state_dict(_state_dict(folder, variant), target, rename=clip_key)


__all__ = ["TRANSFORMERS_FORMAT_VERSION", "clip_config_to_transformers", "clip_text_config_to_transformers", "clip_key",
           "transformers_clip_key", "example_ids", "load_clip", "load_clip_text", "load_clip_vision",
           "text_config_from_transformers", "vision_config_from_transformers"]
