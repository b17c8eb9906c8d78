"""A diffusion model as generation sees it: the denoiser ε_θ, its schedule and conventions, its first stages.

Whatever produced it — ``ddpm-jax train`` (a workdir, read by ``workdir.load_diffusion_model``) or a
diffusers DDPM folder such as google/ddpm-cifar10-32 (``pipelines.generate.load_pretrained_ddpm``) — a
model that samples is the same thing, :class:`DiffusionModel`:

    x_T ──► sampler (any of samplers.SAMPLERS) calling ε_θ(x_t, t[, c]) ──► x_0 ──► decode (latent models)

- ``unet``, ``params``: the network ε_θ (models/unet.py) and its weights;
- ``schedule``, ``prediction`` (ε, x₀ or v), ``variance`` (σ_t² of Algorithm 2), ``clip_denoised``
  (x̂₀ clipped to [−1, 1] in pixel space, not for latents): how its output is read;
- ``kind`` "none" | "class" | "text" and ``null_condition`` ∅ (classifier-free guidance's unconditional
  branch, what conditioning dropout trained in);
- the frozen first stages of latent / text-conditional diffusion (Rombach et al. 2022): the autoencoder
  E, D (:class:`LatentCodec`, z = s·E(x)) and the text encoder τ(y) (:class:`TextEncoder`);
- the sampler defaults it was configured with (``sampler``, ``steps``, ``eta``, ``guidance_scale``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import guidance
from ddpm_jax.diffusion import EpsFn
from ddpm_jax.models.unet import UNet
from ddpm_jax.models.vae import AutoencoderKL
from ddpm_jax.schedules import Schedule

PyTree = Any
CONDITION_KINDS = ("none", "class", "text")


# ================================================================================================
# The text encoder τ(y): tokenizer + CLIP text transformer
# ================================================================================================

@dataclasses.dataclass
class TextEncoder:
    """prompts → per-token states [B, L, D] for cross-attention (``layer`` -1: last, -2: "clip skip"), and with
    ``encode`` also the pooled sentence embedding [B, D_pool] (SDXL's second condition)."""

    tokenizer: Any                      # ddpm_jax.tokenizer.Tokenizer
    model: Any                          # a CLIP text tower (CLIPTextModel / CLIPTextModelWithProjection)
    params: PyTree
    layer: int = -1

    def __post_init__(self):
        if self.layer not in (-1, -2):
            raise ValueError(f"text encoder layer must be -1 (last) or -2 (penultimate), got {self.layer}")
        self.encode_ids = jax.jit(self.states_and_pooled)

    def states_and_pooled(self, params: PyTree, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """τ(y): token ids [B, L] → (hidden states [B, L, D] of the chosen layer, pooled [B, D_pool]: the
        end-of-text state, projected by W_t for a CLIPTextModelWithProjection, its ``embeds``)."""
        out = self.model.apply({"params": params}, input_ids)
        states = out.last_hidden_state if self.layer == -1 else out.hidden_states[-2]   # [B, L, D]
        return states, out.pooled if out.embeds is None else out.embeds                 # [B, D_pool]

    def states(self, params: PyTree, input_ids: jax.Array) -> jax.Array:
        """τ(y): token ids [B, L] → hidden states [B, L, D] of the chosen layer."""
        return self.states_and_pooled(params, input_ids)[0]

    def token_ids(self, prompts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.tokenizer.tokenize(list(prompts)))                      # [B, L] int

    def encode(self, prompts: Sequence[str], batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """prompts → (states [B, L, D], pooled [B, D_pool]) (``states_and_pooled``), in batches."""
        ids = self.token_ids(prompts)
        parts = [self.encode_ids(self.params, jnp.asarray(ids[i:i + batch_size])) for i in range(0, len(ids), batch_size)]
        return tuple(np.concatenate([np.asarray(part[k]) for part in parts]) for k in (0, 1))

    def __call__(self, prompts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        return self.encode(prompts, batch_size)[0]                                     # [B, L, D]


# ================================================================================================
# The autoencoder E, D of latent diffusion
# ================================================================================================

@dataclasses.dataclass
class LatentCodec:
    """x [B, H, W, C] ↔ z = s · E(x) [B, H/f, W/f, c] with a frozen AutoencoderKL (s: scaling_factor)."""

    model: AutoencoderKL
    params: PyTree

    def __post_init__(self):
        self.encode_fn = jax.jit(lambda p, x: self.model.apply({"params": p}, x, method=AutoencoderKL.encode_latents))
        self.decode_fn = jax.jit(lambda p, z: self.model.apply({"params": p}, z, method=AutoencoderKL.decode_latents))

    def encode(self, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
        """Images in [-1, 1] → scaled latents (the mode of q(z|x)), in batches."""
        return np.concatenate([np.asarray(self.encode_fn(self.params, jnp.asarray(images[i:i + batch_size])))
                               for i in range(0, len(images), batch_size)])

    def decode(self, latents: jax.Array) -> jax.Array:
        """Scaled latents → images (clipped to [-1, 1])."""
        return jnp.clip(self.decode_fn(self.params, latents), -1.0, 1.0)

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)


# ================================================================================================
# The model
# ================================================================================================

def condition_kind(config: ml_collections.ConfigDict) -> str:
    """``config.condition.kind`` of a diffusion config: "none" (default), "class" or "text"."""
    kind = config.get("condition", {}).get("kind", "none")
    if kind not in CONDITION_KINDS:
        raise ValueError(f"condition.kind must be 'none', 'class' or 'text', got {kind!r}")
    return kind


@dataclasses.dataclass
class DiffusionModel:
    """A trained diffusion model with everything sampling and evaluation need (see the module docstring)."""

    unet: UNet
    params: PyTree
    schedule: Schedule
    x0_shape: tuple[int, int, int]                 # (h, w, c) of what is diffused: pixels or latents
    prediction: str = "eps"
    variance: str = "fixed_small"
    clip_denoised: bool = True
    sampler: str = "ddim"                          # the defaults of `sample` / `eval`
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 1.0
    kind: str = "none"                             # "none" | "class" | "text"
    null_condition: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # ∅, one example's worth
    codec: LatentCodec | None = None
    text_encoder: TextEncoder | None = None
    config: ml_collections.ConfigDict | None = None  # the workdir's config (None for a diffusers folder)
    description: str = ""
    # programs compiled for this model (pipelines/generate.py), keyed by what they were traced for; a fresh
    # dict for every model (also after dataclasses.replace), gone with the model
    compiled: dict[tuple, Any] = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def image_size(self) -> int:
        return int(self.x0_shape[0])

    @property
    def channels(self) -> int:
        return int(self.x0_shape[2])

    @property
    def data_config(self) -> ml_collections.ConfigDict | None:
        """The training data's ``config.data`` (workdirs), else None."""
        return None if self.config is None else self.config.data

    def unconditional_eps_fn(self, params: PyTree | None = None) -> EpsFn:
        """ε_θ(x_t, t) with ``params`` (default the model's; eval mode, no dropout); a conditional model
        gets its null condition ∅ (one example's worth, broadcast over B): guidance's unconditional branch."""
        params = self.params if params is None else params
        null = guidance.model_condition({k: jnp.asarray(v)[None] for k, v in self.null_condition.items()})
        return lambda x_t, t: self.unet.apply({"params": params}, x_t, t, train=False, **null)

    @property
    def eps_fn(self) -> EpsFn:
        """:meth:`unconditional_eps_fn` with the model's own parameters."""
        return self.unconditional_eps_fn()

    def decode(self, x0: jax.Array) -> jax.Array:
        """x_0 → images: the latent decoder D for a latent model, the identity in pixel space."""
        return x0 if self.codec is None else self.codec.decode(x0)

    def condition_for(self, prompts: Sequence[str] | None = None, labels: Sequence[int] | None = None
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(cond, uncond) for prompts (text model) or labels (class model), each [B, ...]; ({}, {}) otherwise."""
        if self.kind == "text":
            if not prompts:
                raise ValueError("this is a text-conditional model: give at least one prompt")
            cond = {"context": self.text_encoder(list(prompts))}
        elif self.kind == "class":
            if labels is None or not len(labels):
                raise ValueError("this is a class-conditional model: give class labels")
            cond = {"label": np.asarray(labels, np.int32)}
        else:
            return {}, {}
        uncond = {k: np.broadcast_to(self.null_condition[k], v.shape).copy() for k, v in cond.items()}
        return cond, uncond
