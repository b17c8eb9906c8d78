"""CLIP: a text transformer, an image transformer, and the contrastive loss that ties them.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision"
(CLIP). Two encoders map a batch of N (image, caption) pairs to N image and N text embeddings in
one shared space; training makes the N matching pairs the most similar of all N² pairs (§2.3,
Figure 3). Stable Diffusion (Rombach et al. 2022) keeps only the text tower and conditions its
U-Net on the *per-token* hidden states of CLIP ViT-L/14's text transformer (77 tokens × 768).

The blocks, bottom-up:

==========================  =========================================  ==========================
ours                        transformers (``modeling_clip``)           the paper
==========================  =========================================  ==========================
CLIPMLP                     CLIPMLP                                    the Transformer's MLP
CLIPEncoderLayer            CLIPEncoderLayer                           a pre-LN Transformer block
CLIPEncoder                 CLIPEncoder                                the stack of blocks
CLIPTextTransformer         CLIPTextModel (``text_model``)             §2.4, text encoder
CLIPTextModelWithProjection CLIPTextModelWithProjection                + W_t, Figure 3
CLIPVisionTransformer       CLIPVisionModel (``vision_model``)         §2.4, ViT image encoder
CLIPModel                   CLIPModel                                  Figure 3 (both towers)
(the loss: ``objectives.clip_loss``, Figure 3's pseudocode, §2.3)
==========================  =========================================  ==========================

Parameters carry transformers' names (``embeddings/token_embedding``, ``encoder/layers_0/mlp/fc1``,
``pre_layrnorm`` — sic) so that ``ddpm_jax.pretrained.transformers_clip`` loads transformers checkpoints with a
plain key mapping. The one exception is attention, which reuses the U-Net's
``layers.Attention`` (``to_q``/``to_k``/``to_v``/``to_out_0`` for transformers'
``q_proj``/``k_proj``/``v_proj``/``out_proj``).

Images are NHWC float32 (already normalised with CLIP's mean/std when using real weights);
token ids are int32 ``[B, T]`` with T ≤ ``max_position_embeddings`` (77).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ddpm_jax.models.layers import Attention
from ddpm_jax.objectives import contrastive_logits

Array = jax.Array
Dtype = Any

# --------------------------------------------------------------------------------------------
# Configs (frozen dataclasses, field names as in transformers' CLIPTextConfig/CLIPVisionConfig)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The text transformer. Defaults are CLIP ViT-L/14's text tower (Stable Diffusion v1.x)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77  # the context length: every prompt is padded/truncated to it
    hidden_act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP, SD 2.x)
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768  # size of the joint text-image space (text_projection)
    eos_token_id: int = 49407  # "<|endoftext|>"; the value 2 selects the legacy pooling (see below)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The image transformer (a ViT, Dosovitskiy et al. 2021). Defaults are CLIP ViT-L/14's."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Both towers and the joint space. ``logit_scale_init_value = log(1/0.07)`` (§2.5)."""

    text: CLIPTextConfig = CLIPTextConfig()
    vision: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 768
    logit_scale_init_value: float = math.log(1 / 0.07)  # 2.6592…


# --------------------------------------------------------------------------------------------
# Outputs (pytrees, so a jitted apply can return them)
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class CLIPEncoderOutput:
    """What a CLIP tower returns.

    ``hidden_states`` has ``num_hidden_layers + 1`` entries, as in transformers: the encoder's input
    (the embeddings; for the vision tower after ``pre_layrnorm``) and each block's output. Hence
    ``hidden_states[-2]`` is the penultimate layer used by "clip skip" (before any final LayerNorm).
    """

    last_hidden_state: Array  # [B, T, D]; text: after final_layer_norm; vision: last block's output
    hidden_states: tuple[Array, ...]  # num_hidden_layers + 1 arrays [B, T, D]
    pooled: Array  # [B, D]; text: at the end-of-text token; vision: post_layernorm(class token)
    embeds: Array | None = None  # [B, projection_dim], the projected pooled output (WithProjection)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


def quick_gelu(x: Array) -> Array:
    """OpenAI CLIP's activation, a sigmoid approximation of GELU: ``x · σ(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # the exact (erf) GELU, PyTorch's default
}


def _layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
    # use_fast_variance=False computes E[(x − μ)²] like PyTorch, not E[x²] − μ² (less cancellation)
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class CLIPMLP(nn.Module):
    """``fc2(act(fc1(x)))``: hidden_size → intermediate_size → hidden_size."""

    hidden_size: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        # x: [B, T, D] → [B, T, D]
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} not implemented (supported: {sorted(ACTIVATIONS)})")
        h = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)  # [B, T, D_mlp]
        h = ACTIVATIONS[self.hidden_act](h)
        return nn.Dense(self.hidden_size, dtype=self.dtype, name="fc2")(h)  # [B, T, D]


class CLIPEncoderLayer(nn.Module):
    """One pre-LayerNorm Transformer block (Radford et al. 2019, GPT-2 §2.3; CLIP §2.4):

        x = x + SelfAttention(LayerNorm₁(x))        (causal in the text tower)
        x = x + MLP(LayerNorm₂(x))
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        # x: [B, T, D] → [B, T, D]; mask: boolean, broadcastable to [B, heads, T, T]
        attention = Attention(
            query_dim=self.hidden_size,
            num_heads=self.num_attention_heads,
            head_dim=self.hidden_size // self.num_attention_heads,
            use_bias=True,
            dtype=self.dtype,
            name="self_attn",
        )
        x = x + attention(_layer_norm(self.layer_norm_eps, self.dtype, "layer_norm1")(x), mask=mask)
        mlp = CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, self.dtype, name="mlp")
        return x + mlp(_layer_norm(self.layer_norm_eps, self.dtype, "layer_norm2")(x))


class CLIPEncoder(nn.Module):
    """``num_hidden_layers`` blocks; returns the input and every block's output."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> tuple[Array, ...]:
        # x: [B, T, D] → (num_hidden_layers + 1) × [B, T, D]
        c = self.config
        hidden_states = [x]
        for i in range(c.num_hidden_layers):
            layer = CLIPEncoderLayer(
                c.hidden_size,
                c.intermediate_size,
                c.num_attention_heads,
                c.hidden_act,
                c.layer_norm_eps,
                self.dtype,
                name=f"layers_{i}",
            )
            x = layer(x, mask)
            hidden_states.append(x)
        return tuple(hidden_states)


# --------------------------------------------------------------------------------------------
# The text tower
# --------------------------------------------------------------------------------------------


class CLIPTextEmbeddings(nn.Module):
    """Token embedding + learned absolute position embedding (no sinusoids in CLIP)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array) -> Array:
        # input_ids: [B, T] int → [B, T, D]
        c = self.config
        tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        positions = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype, name="position_embedding")
        return tokens + positions(jnp.arange(input_ids.shape[1]))[None]  # [B, T, D]


def pooled_token_index(input_ids: Array, eos_token_id: int) -> Array:
    """Which token's state is the sentence embedding: the end-of-text token (CLIP §2.4).

    OpenAI's code takes ``argmax(input_ids)``, relying on "<|endoftext|>" (49407) being the largest
    id. transformers keeps exactly that for configs whose ``eos_token_id`` is 2 (an old, wrong value
    found in many checkpoints, SD v1.x's included) and otherwise takes the *first* position equal
    to ``eos_token_id`` (the padding may also be end-of-text tokens). We replicate both.

    Args: input_ids [B, T]. Returns: int array [B].
    """
    if eos_token_id == 2:  # legacy configs
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)  # argmax returns the first True


class CLIPTextTransformer(nn.Module):
    """CLIP's text encoder (§2.4): a 12-layer, 512-wide (768 for ViT-L/14) causal Transformer.

        h₀ = token_embedding[ids] + position_embedding[0..T−1]
        h_l = Block_l(h_{l−1}),  l = 1…L          (causal self-attention: token i sees tokens ≤ i)
        last_hidden_state = LayerNorm(h_L)        (what Stable Diffusion's cross-attention reads)
        pooled = last_hidden_state[end-of-text position]

    The mask is causal, as in the paper ("masked self-attention … to preserve the ability to
    initialize with a pre-trained language model"); padding needs no extra mask since real tokens
    never see the padding after them.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array) -> CLIPEncoderOutput:
        # input_ids: [B, T] int, T ≤ max_position_embeddings
        c = self.config
        seq_len = input_ids.shape[1]
        if seq_len > c.max_position_embeddings:
            raise ValueError(f"{seq_len} tokens, but the model has {c.max_position_embeddings} positions")
        x = CLIPTextEmbeddings(c, self.dtype, name="embeddings")(input_ids)  # [B, T, D]
        causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))[None, None]  # [1, 1, T, T]
        hidden_states = CLIPEncoder(c, self.dtype, name="encoder")(x, causal)
        last = _layer_norm(c.layer_norm_eps, self.dtype, "final_layer_norm")(hidden_states[-1])  # [B, T, D]
        index = pooled_token_index(input_ids, c.eos_token_id)  # [B]
        pooled = last[jnp.arange(last.shape[0]), index]  # [B, D]
        return CLIPEncoderOutput(last_hidden_state=last, hidden_states=hidden_states, pooled=pooled)


class CLIPTextModelWithProjection(nn.Module):
    """The text tower and W_t: ``embeds = pooled · W_t`` (no bias), into the joint space."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array) -> CLIPEncoderOutput:
        out = CLIPTextTransformer(self.config, self.dtype, name="text_model")(input_ids)
        projection = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")
        return out.replace(embeds=projection(out.pooled))  # embeds: [B, projection_dim]


# --------------------------------------------------------------------------------------------
# The image tower
# --------------------------------------------------------------------------------------------


class CLIPVisionEmbeddings(nn.Module):
    """ViT input (Dosovitskiy et al. 2021, Eq. 1): non-overlapping p×p patches, each linearly embedded
    (a stride-p convolution without bias), a learned class token in front, learned positions added."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: Array) -> Array:
        # images: [B, H, W, C] with H = W = image_size → [B, 1 + num_patches, D]
        c = self.config
        if images.shape[1:3] != (c.image_size, c.image_size):
            raise ValueError(f"images are {images.shape[1]}×{images.shape[2]}, the model expects {c.image_size}²")
        p = c.patch_size
        patches = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          dtype=self.dtype, name="patch_embedding")(images)  # [B, H/p, W/p, D]
        batch = images.shape[0]
        patches = patches.reshape(batch, -1, c.hidden_size)  # [B, N, D], row-major over the grid
        class_embedding = self.param("class_embedding", nn.initializers.normal(1.0), (c.hidden_size,))
        class_token = jnp.broadcast_to(class_embedding.astype(patches.dtype), (batch, 1, c.hidden_size))
        x = jnp.concatenate([class_token, patches], axis=1)  # [B, 1 + N, D]
        positions = nn.Embed(c.num_patches + 1, c.hidden_size, dtype=self.dtype, name="position_embedding")
        return x + positions(jnp.arange(c.num_patches + 1))[None]


class CLIPVisionTransformer(nn.Module):
    """CLIP's image encoder (§2.4): a ViT with an extra LayerNorm before the Transformer.

        h₀ = pre_layrnorm(embeddings(image))       ("an additional layer normalization to the
                                                     combined patch and position embeddings")
        h_l = Block_l(h_{l−1})                     (full, non-causal self-attention)
        pooled = post_layernorm(h_L[:, 0])         (the class token)
    """

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: Array) -> CLIPEncoderOutput:
        # images: [B, H, W, C]
        c = self.config
        x = CLIPVisionEmbeddings(c, self.dtype, name="embeddings")(images)  # [B, 1 + N, D]
        x = _layer_norm(c.layer_norm_eps, self.dtype, "pre_layrnorm")(x)  # transformers' spelling
        hidden_states = CLIPEncoder(c, self.dtype, name="encoder")(x)
        pooled = _layer_norm(c.layer_norm_eps, self.dtype, "post_layernorm")(hidden_states[-1][:, 0])  # [B, D]
        return CLIPEncoderOutput(last_hidden_state=hidden_states[-1], hidden_states=hidden_states, pooled=pooled)


class CLIPVisionModelWithProjection(nn.Module):
    """The image tower and W_i: ``embeds = pooled · W_i`` (no bias), into the joint space."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: Array) -> CLIPEncoderOutput:
        out = CLIPVisionTransformer(self.config, self.dtype, name="vision_model")(images)
        projection = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype, name="visual_projection")
        return out.replace(embeds=projection(out.pooled))


# --------------------------------------------------------------------------------------------
# Both towers and the contrastive loss
# --------------------------------------------------------------------------------------------

@flax.struct.dataclass
class CLIPOutput:
    logits_per_image: Array  # [N_images, N_texts]
    logits_per_text: Array  # [N_texts, N_images]
    image_embeds: Array  # [N_images, projection_dim], unnormalised
    text_embeds: Array  # [N_texts, projection_dim], unnormalised
    text: CLIPEncoderOutput
    vision: CLIPEncoderOutput


class CLIPModel(nn.Module):
    """Both towers, the two projections and the learnable temperature (Figure 3)."""

    config: CLIPConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        self.text_model = CLIPTextTransformer(c.text, self.dtype)
        self.vision_model = CLIPVisionTransformer(c.vision, self.dtype)
        self.text_projection = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype)
        self.visual_projection = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init_value), ())

    def encode_text(self, input_ids: Array) -> Array:
        """input_ids [B, T] → text embeddings [B, projection_dim] (unnormalised)."""
        return self.text_projection(self.text_model(input_ids).pooled)

    def encode_image(self, images: Array) -> Array:
        """images [B, H, W, C] → image embeddings [B, projection_dim] (unnormalised)."""
        return self.visual_projection(self.vision_model(images).pooled)

    def __call__(self, input_ids: Array, images: Array) -> CLIPOutput:
        text = self.text_model(input_ids)
        vision = self.vision_model(images)
        text_embeds = self.text_projection(text.pooled)  # [M, E]
        image_embeds = self.visual_projection(vision.pooled)  # [N, E]
        logits_per_image = contrastive_logits(image_embeds, text_embeds, self.logit_scale)  # [N, M]
        return CLIPOutput(
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.T,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            text=text,
            vision=vision,
        )
