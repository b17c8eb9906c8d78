"""The diffusion U-Net ε_θ(x_t, t) of Ho et al. 2020 (Appendix B), parameterised like diffusers' UNet2DModel.

Architecture (for ``UNetConfig.ddpm_cifar10()``: 32×32 input, ch = 128, ch_mult = (1, 2, 2, 2)):

    temb = MLP(sinusoidal(t))                                    [B, 512]
    h = conv_in(x)                                               [B, 32, 32, 128]
    down_blocks_0 .. 3: 2 × ResnetBlock (+ attention at 16×16), then a stride-2 conv
                       (none after the last level)               [B, 4, 4, 256]
    mid_block: ResnetBlock → SpatialSelfAttention → ResnetBlock  [B, 4, 4, 256]
    up_blocks_0 .. 3: 3 × (concat skip → ResnetBlock (+ attention)), then nearest ×2 + conv
                       (none after the last level)               [B, 32, 32, 128]
    eps_hat = conv_out(SiLU(GroupNorm(h)))                       [B, 32, 32, 3]

Every activation after conv_in and after each ResNet (+attention) and downsampling layer of the
down path is kept, and the up path consumes them in reverse order: that is why each up level has
``layers_per_block + 1`` ResNet blocks.

Parameter names follow diffusers with ``.N`` written ``_N`` (``down_blocks.0.resnets.1.conv1`` ↔
``down_blocks_0/resnets_1/conv1``), so ``ddpm_jax.pretrained.diffusers.load_unet`` is a key mapping.

Which blocks a level holds is the diffusers block type (``"AttnDownBlock2D"``, …); the tables
``DOWN_BLOCK_ATTENTION``/``UP_BLOCK_ATTENTION``/``MID_BLOCK_ATTENTION`` say what attention each type
adds after its ResNet blocks: none, "self" (``SpatialSelfAttention``) or "cross" (``Transformer2D``).

Stable Diffusion's U-Net (Rombach et al. 2022, §3.3; diffusers' UNet2DConditionModel) is the same
module with "cross" levels (``CrossAttnDownBlock2D``/``CrossAttnUpBlock2D``/``UNetMidBlock2DCrossAttn``):
after each ResNet block a spatial transformer lets every pixel attend to a context sequence
[B, L, cross_attention_dim] (e.g. CLIP text embeddings, Eq. 3 of Rombach et al.). A class
condition is added to the timestep embedding: ``num_class_embeds`` gives a learned table
(class labels [B]), ``class_embed_type="projection"`` a two-layer MLP of a vector [B, D].

SDXL (Podell et al. 2023) adds a second vector condition, ``addition_embed_type="text_time"``: the pooled
text embedding and the "time ids" (image sizes and crop), embedded and added to the timestep embedding too.

Call: ``UNet(config).apply({"params": params}, x_t, t, context=None, class_labels=None, text_embeds=None,
time_ids=None, train=False)``.
``apply_with_attention_maps`` also returns every cross-attention's probabilities [B, heads, H·W, L].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddpm_jax.models.layers import (
    Conv3x3,
    Downsample,
    GroupNorm,
    ResnetBlock,
    SpatialSelfAttention,
    TimestepMLP,
    Transformer2D,
    Upsample,
    timestep_embedding,
)

Array = jax.Array

# Block type (diffusers' name) → the attention that follows each of its ResNet blocks.
DOWN_BLOCK_ATTENTION: dict[str, str | None] = {
    "DownBlock2D": None,
    "AttnDownBlock2D": "self",
    "CrossAttnDownBlock2D": "cross",
}
UP_BLOCK_ATTENTION: dict[str, str | None] = {"UpBlock2D": None, "AttnUpBlock2D": "self", "CrossAttnUpBlock2D": "cross"}
# Mid block type → its attention between the two ResNet blocks ("self" only if add_attention).
MID_BLOCK_ATTENTION: dict[str, str] = {"UNetMidBlock2D": "self", "UNetMidBlock2DCrossAttn": "cross"}
CLASS_EMBED_TYPES = (None, "projection")
ADDITION_EMBED_TYPES = (None, "text_time")  # "text_time": SDXL's pooled text embedding + "time ids"
# Rematerialisation (gradient checkpointing, Chen et al. 2016) of each ResNet / attention block under
# ``jax.checkpoint``: the backward pass recomputes a block's inside from its input instead of keeping it.
#   "none"    keep every activation (fastest; the most memory)
#   "blocks"  keep only each block's input, recompute everything inside (policy nothing_saveable): about
#             one more forward pass per step (measured 1.19× the step time, CIFAR-10 U-Net, batch 16). Measured (benchmarks/bench_memory.py, XLA's buffer assignment
#             with the barriers kept): temp memory of the training step 0.23× (CIFAR-10, batch 128),
#             0.42× (256², batch 8), 0.29× (SD v1.5, batch 2). The alternative policy that also keeps matmul
#             outputs (dots_with_no_batch_dims_saveable) saved less in all three (0.28×, 0.42×, 0.31×).
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "blocks": jax.checkpoint_policies.nothing_saveable,
}


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of the U-Net; field names and meanings are those of diffusers' UNet2DModel
    and UNet2DConditionModel.

    The defaults are the DDPM CIFAR-10 model (see ``ddpm_cifar10``) without dropout;
    ``stable_diffusion_v1`` is SD 1.x's conditional U-Net.

    Heads: ``attention_head_dim`` is the channels per head of the "self" attention blocks
    (UNet2DModel's meaning), ``num_attention_heads`` the number of heads of the "cross" levels'
    transformers. diffusers' UNet2DConditionModel config calls the latter ``attention_head_dim``
    (a naming bug kept for compatibility: SD 1.x's "attention_head_dim": 8 means 8 heads of
    320/8 = 40 channels); ``ddpm_jax.pretrained.diffusers.load_unet`` translates it.
    """

    sample_size: int | tuple[int, int] = 32  # training resolution; any multiple of 2^(levels-1) works
    in_channels: int = 3
    out_channels: int = 3
    # One entry per resolution level: output channels (ch · ch_mult in the DDPM code).
    block_out_channels: tuple[int, ...] = (128, 256, 256, 256)
    layers_per_block: int = 2  # ResNet blocks per down level (the up levels have one more)
    # One block type per level; the up path is listed from the lowest resolution up.
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    add_attention: bool = True  # self-attention in the mid block
    attention_head_dim: int | None = None  # channels per head; None = one head over all channels
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    dropout: float = 0.0
    flip_sin_to_cos: bool = False  # timestep embedding: cos first (SD) or sin first (DDPM)
    freq_shift: int = 1  # timestep embedding: downscale_freq_shift (1 in DDPM, 0 in SD)
    time_embedding_dim: int | None = None  # None = 4 · block_out_channels[0]
    downsample_padding: int = 0  # 0: pad bottom/right only (TF "SAME", DDPM); 1: pad all sides
    mid_block_scale_factor: float = 1.0  # the mid block's ResNet (and self-attention) outputs are divided by this
    # --- cross-attention (Stable Diffusion) ---
    mid_block_type: str = "UNetMidBlock2D"  # or "UNetMidBlock2DCrossAttn" (ResNet → Transformer2D → ResNet)
    cross_attention_dim: int | None = None  # feature size D_ctx of the context (768: CLIP ViT-L/14 text)
    num_attention_heads: int | tuple[int, ...] = 8  # heads of the transformers, one value or one per level
    transformer_layers_per_block: int | tuple[int, ...] = 1  # BasicTransformerBlocks per Transformer2D, one or per level
    use_linear_projection: bool = False  # Transformer2D proj_in/out: Dense (SD 2.x) or 1×1 conv (SD 1.x)
    # --- class conditioning (added to the timestep embedding) ---
    num_class_embeds: int | None = None  # a table of this many class embeddings; class_labels int [B]
    class_embed_type: str | None = None  # None, or "projection": MLP of a vector class_labels [B, D_proj]
    # D_proj for class_embed_type="projection"; for addition_embed_type="text_time" the add_embedding's input
    # width D_pooled + N·addition_time_embed_dim (SDXL base: 1280 + 6·256 = 2816)
    projection_class_embeddings_input_dim: int | None = None
    # --- added conditioning (SDXL's micro-conditioning, Podell et al. 2023 §2.2; also added to the timestep embedding) ---
    addition_embed_type: str | None = None  # None, or "text_time": text_embeds [B, D_pooled] + time_ids [B, N]
    addition_time_embed_dim: int | None = None  # width of each time id's sinusoidal embedding (256 in SDXL)
    dtype: Any = jnp.float32  # computation dtype; parameters are always float32
    # --- memory ---
    remat: str = "none"  # REMAT_POLICIES: "blocks" recomputes each ResNet/attention block in the backward pass

    def __post_init__(self):
        # JSON gives lists; keep the config hashable.
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.num_attention_heads, (list, tuple)):
            object.__setattr__(self, "num_attention_heads", tuple(self.num_attention_heads))
        if isinstance(self.transformer_layers_per_block, (list, tuple)):
            object.__setattr__(self, "transformer_layers_per_block", tuple(self.transformer_layers_per_block))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        self._validate()

    def _validate(self):
        levels = len(self.block_out_channels)
        if not (len(self.down_block_types) == len(self.up_block_types) == levels):
            raise ValueError(
                f"block_out_channels, down_block_types and up_block_types need one entry per level, got "
                f"{len(self.block_out_channels)}, {len(self.down_block_types)} and {len(self.up_block_types)}"
            )
        for types, known in ((self.down_block_types, DOWN_BLOCK_ATTENTION), (self.up_block_types, UP_BLOCK_ATTENTION)):
            for block_type in types:
                if block_type not in known:
                    raise ValueError(f"unsupported block type {block_type!r}; supported: {sorted(known)}")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels {self.block_out_channels} must be divisible by norm_num_groups="
                f"{self.norm_num_groups} (not: {bad})"
            )
        if self.attention_head_dim is not None:
            bad = [c for c in self.block_out_channels if c % self.attention_head_dim]
            if bad:
                raise ValueError(
                    f"block_out_channels {self.block_out_channels} must be divisible by attention_head_dim="
                    f"{self.attention_head_dim} (not: {bad})"
                )
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"downsample_padding must be 0 or 1, got {self.downsample_padding}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r} "
                             "(model.remat='blocks' recomputes each block in the backward pass to save memory)")
        self._validate_conditioning()

    def _validate_conditioning(self):
        if self.mid_block_type not in MID_BLOCK_ATTENTION:
            raise ValueError(f"unsupported mid_block_type {self.mid_block_type!r}; supported: {sorted(MID_BLOCK_ATTENTION)}")
        heads = self.num_attention_heads
        if isinstance(heads, tuple) and len(heads) != self.num_levels:
            raise ValueError(f"num_attention_heads needs one entry per level ({self.num_levels}) or one int, got {heads}")
        if self.has_cross_attention:
            if not isinstance(self.cross_attention_dim, int) or self.cross_attention_dim < 1:
                raise ValueError(
                    f"cross-attention blocks need cross_attention_dim (the context's feature size), got "
                    f"{self.cross_attention_dim!r}"
                )
            bad = [(c, h) for c, h in zip(self.block_out_channels, self.level_heads) if c % h]
            if bad:
                raise ValueError(
                    f"block_out_channels {self.block_out_channels} must be divisible by num_attention_heads="
                    f"{heads} (not: {bad})"
                )
        layers = self.transformer_layers_per_block
        if isinstance(layers, tuple) and len(layers) != self.num_levels:
            raise ValueError(f"transformer_layers_per_block needs one entry per level ({self.num_levels}) or one int, "
                             f"got {layers}")
        if min(self.level_transformer_layers) < 1:
            raise ValueError(f"transformer_layers_per_block must be >= 1, got {layers}")
        if self.class_embed_type not in CLASS_EMBED_TYPES:
            raise ValueError(f"unsupported class_embed_type {self.class_embed_type!r}; supported: {CLASS_EMBED_TYPES}")
        if self.class_embed_type == "projection":
            if not self.projection_class_embeddings_input_dim:
                raise ValueError('class_embed_type="projection" needs projection_class_embeddings_input_dim')
            if self.num_class_embeds is not None:
                raise ValueError('set either num_class_embeds or class_embed_type="projection", not both')
        if self.num_class_embeds is not None and self.num_class_embeds < 1:
            raise ValueError(f"num_class_embeds must be >= 1 (or None), got {self.num_class_embeds}")
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(f"unsupported addition_embed_type {self.addition_embed_type!r}; supported: {ADDITION_EMBED_TYPES}")
        if self.addition_embed_type == "text_time" and not (self.addition_time_embed_dim and
                                                            self.projection_class_embeddings_input_dim):
            raise ValueError('addition_embed_type="text_time" needs addition_time_embed_dim (256 in SDXL) and '
                             'projection_class_embeddings_input_dim (D_pooled + N·addition_time_embed_dim)')

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def has_cross_attention(self) -> bool:
        """True when some block attends to a context (which the call then requires)."""
        kinds = [DOWN_BLOCK_ATTENTION[b] for b in self.down_block_types] + [UP_BLOCK_ATTENTION[b] for b in self.up_block_types]
        return "cross" in kinds or MID_BLOCK_ATTENTION[self.mid_block_type] == "cross"

    @property
    def class_conditioning(self) -> str | None:
        """None, "labels" (num_class_embeds: integer class_labels [B]) or "projection" (vectors [B, D])."""
        if self.class_embed_type == "projection":
            return "projection"
        return "labels" if self.num_class_embeds is not None else None

    @property
    def level_heads(self) -> tuple[int, ...]:
        """Transformer heads of each down level (the up path uses them reversed, the mid block the last)."""
        heads = self.num_attention_heads
        return heads if isinstance(heads, tuple) else (heads,) * self.num_levels

    @property
    def level_transformer_layers(self) -> tuple[int, ...]:
        """BasicTransformerBlocks of each down level (as ``level_heads``: up path reversed, mid block the last;
        SDXL: (1, 2, 10))."""
        layers = self.transformer_layers_per_block
        return layers if isinstance(layers, tuple) else (layers,) * self.num_levels

    def input_specs(self, batch: int = 1, context_length: int = 1, num_time_ids: int = 6) -> tuple[Any, ...]:
        """Shapes ``(x, t, context, class_labels, text_embeds, time_ids)`` of a smallest valid call (None:
        input not used); ``num_time_ids`` N of the added conditioning (6 in SDXL base: original size, crop
        top-left, target size), text_embeds then [B, projection_class_embeddings_input_dim − N·addition_time_embed_dim].

        For ``jax.eval_shape(UNet(config).init, key, *config.input_specs())``: the params do not
        depend on the image size, the context length nor on how the add_embedding's input splits into text and ids.
        """
        size = 2 ** (self.num_levels - 1)
        x = jax.ShapeDtypeStruct((batch, size, size, self.in_channels), jnp.float32)
        t = jax.ShapeDtypeStruct((batch,), jnp.int32)
        context = None
        if self.has_cross_attention:
            context = jax.ShapeDtypeStruct((batch, context_length, self.cross_attention_dim), jnp.float32)
        labels = {
            None: None,
            "labels": jax.ShapeDtypeStruct((batch,), jnp.int32),
            "projection": jax.ShapeDtypeStruct((batch, self.projection_class_embeddings_input_dim), jnp.float32),
        }[self.class_conditioning]
        text_embeds = time_ids = None
        if self.addition_embed_type == "text_time":
            pooled = self.projection_class_embeddings_input_dim - num_time_ids * self.addition_time_embed_dim
            if pooled < 1:
                raise ValueError(f"{num_time_ids} time ids × {self.addition_time_embed_dim} leave no room for the pooled "
                                 f"text embedding in projection_class_embeddings_input_dim="
                                 f"{self.projection_class_embeddings_input_dim}; pass fewer num_time_ids")
            text_embeds = jax.ShapeDtypeStruct((batch, pooled), jnp.float32)
            time_ids = jax.ShapeDtypeStruct((batch, num_time_ids), jnp.float32)
        return x, t, context, labels, text_embeds, time_ids

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @classmethod
    def ddpm_cifar10(cls) -> UNetConfig:
        """Ho et al.'s CIFAR-10 model (35.7M parameters), laid out like google/ddpm-cifar10-32."""
        return cls(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(128, 256, 256, 256),  # ch = 128, ch_mult = (1, 2, 2, 2)
            layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),  # attention at 16×16
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            add_attention=True,
            attention_head_dim=None,
            norm_num_groups=32,
            norm_eps=1e-6,
            dropout=0.1,
            flip_sin_to_cos=False,
            freq_shift=1,
            downsample_padding=0,
        )

    @classmethod
    def stable_diffusion_v1(cls) -> UNetConfig:
        """Stable Diffusion 1.x's U-Net (CompVis/stable-diffusion-v1-4 "unet", 859.5M parameters):
        64×64×4 latents, cross-attention to CLIP ViT-L/14 text states [B, 77, 768]."""
        return cls(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            cross_attention_dim=768,
            num_attention_heads=8,
            norm_num_groups=32,
            norm_eps=1e-5,
            flip_sin_to_cos=True,
            freq_shift=0,
            downsample_padding=1,
        )


    @classmethod
    def sdxl_base(cls) -> UNetConfig:
        """Stable Diffusion XL base's U-Net (Podell et al. 2023, Sec. 2.1; stabilityai/stable-diffusion-xl-base-1.0
        "unet", 2,567,463,684 parameters): 128×128×4 latents, 3 levels (320, 640, 1280) with no attention at the
        first, transformer depths (1, 2, 10) (mid block 10) and 64 channels per head, cross-attention to the two
        text encoders' concatenated states [B, 77, 2048], and the added "text_time" conditioning: pooled text
        embedding [B, 1280] + 6 size/crop ids, each embedded in 256 sinusoidal channels (1280 + 6·256 = 2816)."""
        return dataclasses.replace(  # SD v1's U-Net, with what SDXL changed
            cls.stable_diffusion_v1(),
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=2048,
            num_attention_heads=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )

# --------------------------------------------------------------------------------------------
# Checking the condition inputs
# --------------------------------------------------------------------------------------------


def _is_concrete(a: Any) -> bool:
    return not isinstance(a, jax.core.Tracer)


def check_condition(
    config: UNetConfig, context: Array | None = None, class_labels: Array | None = None,
    text_embeds: Array | None = None, time_ids: Array | None = None, batch: int | None = None,
) -> None:
    """Raise a one-line ValueError when the condition inputs do not fit ``config``.

    Shapes are always checked (they are static). Class-label VALUES are checked only on concrete
    arrays, i.e. outside ``jax.jit``: call this before jitting (``guidance.unet_guided_eps_fn``
    does). Inside jit an out-of-range label gives a NaN embedding (hence NaN outputs) instead.

    Args:
      context: [B, L, cross_attention_dim] (B may be 1: shared by the batch), or None.
      class_labels: integers, scalar or [B], in [0, num_class_embeds); or, with
        class_embed_type="projection", vectors [B, projection_class_embeddings_input_dim].
      text_embeds, time_ids: SDXL's added conditioning (addition_embed_type="text_time"): the pooled text
        embedding [B, D_pooled] and the time ids [B, N], D_pooled + N·addition_time_embed_dim =
        projection_class_embeddings_input_dim.
      batch: the image batch size, when known.
    """
    batch_ok = lambda n: batch is None or n in (1, batch)  # noqa: E731
    _check_context(config, context, batch, batch_ok)
    _check_class_labels(config, class_labels, batch, batch_ok)
    _check_added_condition(config, text_embeds, time_ids, batch_ok)


def _check_context(config: UNetConfig, context: Array | None, batch: int | None, batch_ok: Any) -> None:
    if not config.has_cross_attention:
        if context is not None:
            raise ValueError("context was given but this U-Net has no cross-attention blocks (cross_attention_dim=None)")
        return
    if context is None:
        raise ValueError(
            f"this U-Net has cross-attention (cross_attention_dim={config.cross_attention_dim}): pass "
            f"context=[B, L, {config.cross_attention_dim}] (e.g. text-encoder hidden states)"
        )
    shape = tuple(jnp.shape(context))
    if len(shape) != 3:
        raise ValueError(f"context must be [B, L, D_ctx], got shape {shape}")
    if shape[-1] != config.cross_attention_dim:
        raise ValueError(
            f"context has last dimension {shape[-1]} but the U-Net's cross_attention_dim is "
            f"{config.cross_attention_dim} (context shape {shape})"
        )
    if not batch_ok(shape[0]):
        raise ValueError(f"context batch {shape[0]} must be 1 or the image batch {batch} (context shape {shape})")


def _check_class_labels(config: UNetConfig, class_labels: Array | None, batch: int | None, batch_ok: Any) -> None:
    kind = config.class_conditioning
    if kind is None:
        if class_labels is not None:
            raise ValueError("class_labels were given but this U-Net is not class-conditional (num_class_embeds=None)")
        return
    if class_labels is None:
        expected = (
            f"integers [B] in [0, {config.num_class_embeds})"
            if kind == "labels"
            else f"vectors [B, {config.projection_class_embeddings_input_dim}]"
        )
        raise ValueError(f"this U-Net is class-conditional ({kind}): pass class_labels, {expected}")
    shape = tuple(jnp.shape(class_labels))
    if kind == "projection":
        if len(shape) != 2 or shape[-1] != config.projection_class_embeddings_input_dim or not batch_ok(shape[0]):
            raise ValueError(
                f"class_labels must be [B, {config.projection_class_embeddings_input_dim}] vectors "
                f"(class_embed_type='projection'), got shape {shape}"
            )
        return
    if len(shape) > 1 or (len(shape) == 1 and not batch_ok(shape[0])):
        raise ValueError(f"class_labels must be a scalar or have shape [B] = [{batch}], got shape {shape}")
    if not jnp.issubdtype(jnp.result_type(class_labels), jnp.integer):
        raise ValueError(f"class_labels must be integers, got dtype {jnp.result_type(class_labels)}")
    if _is_concrete(class_labels):
        values = np.asarray(class_labels)
        if values.size and (values.min() < 0 or values.max() >= config.num_class_embeds):
            raise ValueError(
                f"class_labels must be in [0, {config.num_class_embeds}) (num_class_embeds), got values from "
                f"{values.min()} to {values.max()}"
            )


def _check_added_condition(config: UNetConfig, text_embeds: Array | None, time_ids: Array | None,
                           batch_ok: Any) -> None:
    if config.addition_embed_type is None:
        if text_embeds is not None or time_ids is not None:
            raise ValueError("text_embeds/time_ids were given but this U-Net has no added conditioning "
                             "(addition_embed_type=None)")
        return
    d_t, width = config.addition_time_embed_dim, config.projection_class_embeddings_input_dim
    if text_embeds is None or time_ids is None:
        missing = " and ".join(n for n, a in (("text_embeds", text_embeds), ("time_ids", time_ids)) if a is None)
        raise ValueError(
            f"this U-Net has SDXL's added conditioning (addition_embed_type='text_time'): pass text_embeds=[B, D_pooled] "
            f"(the pooled text embedding) and time_ids=[B, N] (SDXL: original size, crop top-left, target size) with "
            f"D_pooled + N·{d_t} = {width}; missing: {missing}"
        )
    pooled, ids = tuple(jnp.shape(text_embeds)), tuple(jnp.shape(time_ids))
    if len(pooled) != 2 or len(ids) != 2 or pooled[0] != ids[0] or not batch_ok(pooled[0]):
        raise ValueError(f"text_embeds must be [B, D_pooled] and time_ids [B, N], one B (1 or the image batch), got "
                         f"shapes {pooled} and {ids}")
    if pooled[1] + ids[1] * d_t != width:
        raise ValueError(
            f"text_embeds [B, {pooled[1]}] and time_ids [B, {ids[1]}] give {pooled[1]} + {ids[1]}·{d_t} = "
            f"{pooled[1] + ids[1] * d_t} features, but the U-Net's add_embedding takes "
            f"projection_class_embeddings_input_dim={width}"
        )


# --------------------------------------------------------------------------------------------
# Blocks of one resolution level
# --------------------------------------------------------------------------------------------


def _remat(cls: type[nn.Module], config: UNetConfig, static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
    """``cls``, or ``cls`` under ``nn.remat`` with ``config.remat``'s policy (its parameters keep their names,
    so a checkpoint loads either way). ``static_argnums`` counts ``self`` as 0."""
    if config.remat == "none":
        return cls
    return nn.remat(cls, policy=REMAT_POLICIES[config.remat], static_argnums=static_argnums)


def _resnet(config: UNetConfig, out_channels: int, name: str, scale: float = 1.0) -> nn.Module:
    """Called as ``block(h, temb, train, dropout_keys=...)``: ``train`` positional, static under remat."""
    return _remat(ResnetBlock, config, static_argnums=(3,))(
        out_channels,
        num_groups=config.norm_num_groups,
        eps=config.norm_eps,
        dropout=config.dropout,
        output_scale_factor=scale,
        dtype=config.dtype,
        name=name,
    )


def _attention(config: UNetConfig, kind: str, channels: int, name: str, scale: float = 1.0, heads: int = 1,
               layers: int = 1) -> nn.Module:
    """The attention layer of type ``kind`` (see DOWN_BLOCK_ATTENTION) over ``channels`` features."""
    if kind == "self":
        head_dim = config.attention_head_dim or channels
        return _remat(SpatialSelfAttention, config)(
            query_dim=channels,
            num_heads=channels // head_dim,
            head_dim=head_dim,
            norm_num_groups=config.norm_num_groups,
            norm_eps=config.norm_eps,
            rescale_output_factor=scale,
            dtype=config.dtype,
            name=name,
        )
    if kind == "cross":  # not rescaled by mid_block_scale_factor, as in diffusers
        return _remat(Transformer2D, config)(
            num_heads=heads,
            head_dim=channels // heads,
            num_layers=layers,
            use_linear_projection=config.use_linear_projection,
            norm_num_groups=config.norm_num_groups,
            dtype=config.dtype,
            name=name,
        )
    raise ValueError(f"unknown attention kind {kind!r}")


def _attend(layer: nn.Module, kind: str, h: Array, context: Array | None) -> Array:
    return layer(h, context) if kind == "cross" else layer(h)


class DownBlock(nn.Module):
    """One level of the encoder: ResNet blocks (each + attention if any), then a stride-2 conv.

    Returns the output and every intermediate activation, for the skip connections.
    """

    config: UNetConfig
    out_channels: int
    attention: str | None  # None, "self" or "cross"
    add_downsample: bool
    num_heads: int = 1  # of the "cross" attention's transformer
    num_layers: int = 1  # its BasicTransformerBlocks

    @nn.compact
    def __call__(
        self, h: Array, temb: Array, context: Array | None = None, *, train: bool = False,
        dropout_keys: Array | None = None,
    ) -> tuple[Array, list[Array]]:
        # h: [B, H, W, C_in] → [B, H/2, W/2, C_out] (or [B, H, W, C_out] at the last level)
        cfg = self.config
        skips = []
        for i in range(cfg.layers_per_block):
            h = _resnet(cfg, self.out_channels, f"resnets_{i}")(h, temb, train, dropout_keys=dropout_keys)  # [B, H, W, C_out]
            if self.attention:
                layer = _attention(cfg, self.attention, self.out_channels, f"attentions_{i}", heads=self.num_heads,
                                   layers=self.num_layers)
                h = _attend(layer, self.attention, h, context)
            skips.append(h)
        if self.add_downsample:
            h = Downsample(self.out_channels, cfg.downsample_padding, cfg.dtype, name="downsamplers_0")(h)
            skips.append(h)  # [B, H/2, W/2, C_out]
        return h, skips


class MidBlock(nn.Module):
    """The bottleneck at the lowest resolution: ResNet → attention (self or cross) → ResNet."""

    config: UNetConfig

    @nn.compact
    def __call__(self, h: Array, temb: Array, context: Array | None = None, *, train: bool = False,
                 dropout_keys: Array | None = None) -> Array:
        # h: [B, h, w, C] → [B, h, w, C]
        cfg = self.config
        channels, scale = h.shape[-1], cfg.mid_block_scale_factor
        kind = MID_BLOCK_ATTENTION[cfg.mid_block_type]
        h = _resnet(cfg, channels, "resnets_0", scale)(h, temb, train, dropout_keys=dropout_keys)
        if kind == "cross" or cfg.add_attention:
            layer = _attention(cfg, kind, channels, "attentions_0", scale, heads=cfg.level_heads[-1],
                                layers=cfg.level_transformer_layers[-1])
            h = _attend(layer, kind, h, context)
        return _resnet(cfg, channels, "resnets_1", scale)(h, temb, train, dropout_keys=dropout_keys)


class UpBlock(nn.Module):
    """One level of the decoder: (concat a skip → ResNet (+ attention)) × (layers_per_block + 1), then ×2 up."""

    config: UNetConfig
    out_channels: int
    attention: str | None
    add_upsample: bool
    num_heads: int = 1
    num_layers: int = 1

    @nn.compact
    def __call__(
        self, h: Array, skips: list[Array], temb: Array, context: Array | None = None, *, train: bool = False,
        dropout_keys: Array | None = None,
    ) -> Array:
        # h: [B, H, W, C_prev], skips: the encoder activations of this level, consumed last-first
        cfg = self.config
        for i, skip in enumerate(reversed(skips)):
            h = jnp.concatenate([h, skip], axis=-1)  # [B, H, W, C_prev + C_skip]
            h = _resnet(cfg, self.out_channels, f"resnets_{i}")(h, temb, train, dropout_keys=dropout_keys)  # [B, H, W, C_out]
            if self.attention:
                layer = _attention(cfg, self.attention, self.out_channels, f"attentions_{i}", heads=self.num_heads,
                                   layers=self.num_layers)
                h = _attend(layer, self.attention, h, context)
        if self.add_upsample:
            h = Upsample(self.out_channels, cfg.dtype, name="upsamplers_0")(h)  # [B, 2H, 2W, C_out]
        return h


# --------------------------------------------------------------------------------------------
# The U-Net
# --------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """ε_θ(x_t, t[, c]): predicts the noise in x_t (Ho et al. 2020, Eq. 11-14; architecture in Appendix B),
    optionally conditioned on a context sequence and/or a class (Rombach et al. 2022, Eq. 3).

    Call ``UNet(config).apply({"params": params}, x, t, context=None, class_labels=None, train=False)``
    with x [B, H, W, in_channels] (NHWC), integer timesteps t [B] (or a scalar, used for the whole
    batch), context [B or 1, L, cross_attention_dim] when the config has cross-attention blocks, and
    class_labels (integers [B] or a scalar; vectors [B, D] for class_embed_type="projection") when it
    is class-conditional, and text_embeds [B, D_pooled] and time_ids [B, N] when it has SDXL's added conditioning
    (addition_embed_type="text_time", ``_added_embedding``). With ``train=True``, dropout is active: with ``dropout_keys`` [B] (one typed
    key per example, ``layers.ExampleDropout``) example b's masks come from its own key, otherwise they
    draw from the "dropout" rng collection. See ``check_condition`` for what is checked where.
    """

    config: UNetConfig

    def _check_inputs(self, x: Array, t: Array, context: Array | None, class_labels: Array | None,
                      text_embeds: Array | None, time_ids: Array | None) -> None:
        cfg = self.config
        if x.ndim != 4:
            raise ValueError(f"x must be [B, H, W, C] (NHWC), got shape {tuple(x.shape)}")
        if x.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"x has {x.shape[-1]} channels but config.in_channels={cfg.in_channels} "
                f"(x must be NHWC; got shape {tuple(x.shape)})"
            )
        factor = 2 ** (cfg.num_levels - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"image height and width must be divisible by 2^(levels-1) = {factor}, got {x.shape[1]}×{x.shape[2]}"
            )
        if jnp.ndim(t) not in (0, 1) or (jnp.ndim(t) == 1 and jnp.shape(t)[0] != x.shape[0]):
            raise ValueError(f"t must be a scalar or have shape [B] = [{x.shape[0]}], got shape {jnp.shape(t)}")
        check_condition(cfg, context, class_labels, text_embeds, time_ids, batch=x.shape[0])

    def _class_embedding(self, class_labels: Array, batch: int, features: int) -> Array:
        """The class condition as a vector [B, features], added to the timestep embedding."""
        cfg = self.config
        if cfg.class_conditioning == "projection":
            vectors = jnp.broadcast_to(class_labels, (batch, class_labels.shape[-1])).astype(cfg.dtype)  # [B, D_proj]
            return TimestepMLP(features, cfg.dtype, name="class_embedding")(vectors)  # [B, features]
        labels = jnp.broadcast_to(jnp.asarray(class_labels), (batch,))  # [B]
        # An out-of-range label (possible under jit, where check_condition cannot see values) is sent
        # to index num_class_embeds, which the lookup fills with NaN: a visible failure, not a wrong class.
        n = cfg.num_class_embeds
        labels = jnp.where((labels >= 0) & (labels < n), labels, n)
        return nn.Embed(n, features, dtype=cfg.dtype, name="class_embedding")(labels)  # [B, features]

    def _added_embedding(self, text_embeds: Array, time_ids: Array, batch: int, features: int) -> Array:
        """SDXL's micro-conditioning (Podell et al. 2023, §2.2; diffusers' ``add_time_proj`` + ``add_embedding``):
        each of the N time ids (SDXL base: c_size = (h_orig, w_orig), c_crop = (top, left), target (h, w)) goes
        through the timestep's sinusoidal embedding of width D_t = addition_time_embed_dim ("Fourier feature
        encoding"), the N embeddings are flattened, concatenated with the pooled text embedding, and a
        two-layer MLP maps them to the timestep-embedding width, to which they are added:

            e_add = MLP([text_embeds; emb(id_1); …; emb(id_N)])                          [B, features]
        """
        cfg = self.config
        n = time_ids.shape[-1]
        ids = jnp.broadcast_to(time_ids, (batch, n)).reshape(-1)  # [B·N]
        emb = timestep_embedding(ids, cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)  # [B·N, D_t]
        pooled = jnp.broadcast_to(text_embeds, (batch, text_embeds.shape[-1])).astype(jnp.float32)  # [B, D_pooled]
        add = jnp.concatenate([pooled, emb.reshape(batch, n * cfg.addition_time_embed_dim)], axis=-1)  # [B, D_pooled + N·D_t]
        return TimestepMLP(features, cfg.dtype, name="add_embedding")(add.astype(cfg.dtype))  # [B, features]

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        context: Array | None = None,
        class_labels: Array | None = None,
        text_embeds: Array | None = None,
        time_ids: Array | None = None,
        *,
        train: bool = False,
        dropout_keys: Array | None = None,
    ) -> Array:
        cfg = self.config
        self._check_inputs(x, t, context, class_labels, text_embeds, time_ids)
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))  # [B]
        if context is not None:
            context = jnp.broadcast_to(context, (batch,) + context.shape[1:]).astype(cfg.dtype)  # [B, L, D_ctx]

        # Timestep embedding (+ class embedding), shared by every ResNet block.
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)  # [B, C0]
        temb = TimestepMLP(cfg.time_embed_dim, cfg.dtype, name="time_embedding")(temb.astype(cfg.dtype))  # [B, D]
        if cfg.class_conditioning is not None:
            temb = temb + self._class_embedding(class_labels, batch, cfg.time_embed_dim)  # [B, D]
        if cfg.addition_embed_type == "text_time":
            temb = temb + self._added_embedding(text_embeds, time_ids, batch, cfg.time_embed_dim)  # [B, D]

        # Down path; keep every activation for the skip connections.
        h = Conv3x3(cfg.block_out_channels[0], dtype=cfg.dtype, name="conv_in")(x.astype(cfg.dtype))  # [B, H, W, C0]
        skips = [h]
        for level, (block_type, channels) in enumerate(zip(cfg.down_block_types, cfg.block_out_channels)):
            h, level_skips = DownBlock(
                cfg,
                channels,
                attention=DOWN_BLOCK_ATTENTION[block_type],
                add_downsample=level < cfg.num_levels - 1,
                num_heads=cfg.level_heads[level],
                num_layers=cfg.level_transformer_layers[level],
                name=f"down_blocks_{level}",
            )(h, temb, context, train=train, dropout_keys=dropout_keys)
            skips += level_skips

        h = MidBlock(cfg, name="mid_block")(h, temb, context, train=train, dropout_keys=dropout_keys)  # [B, H/2^(L-1), W/2^(L-1), C_last]

        # Up path, from the lowest resolution; each level consumes layers_per_block + 1 skips.
        up_channels, up_heads, up_layers = cfg.block_out_channels[::-1], cfg.level_heads[::-1], cfg.level_transformer_layers[::-1]
        for level, (block_type, channels) in enumerate(zip(cfg.up_block_types, up_channels)):
            n = cfg.layers_per_block + 1
            skips, level_skips = skips[:-n], skips[-n:]
            h = UpBlock(
                cfg,
                channels,
                attention=UP_BLOCK_ATTENTION[block_type],
                add_upsample=level < cfg.num_levels - 1,
                num_heads=up_heads[level],
                num_layers=up_layers[level],
                name=f"up_blocks_{level}",
            )(h, level_skips, temb, context, train=train, dropout_keys=dropout_keys)

        # Output head.
        h = GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, dtype=cfg.dtype, name="conv_norm_out")(h)
        h = nn.silu(h)
        h = Conv3x3(cfg.out_channels, dtype=cfg.dtype, name="conv_out")(h)  # [B, H, W, out_channels]
        return h.astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# Cross-attention maps
# --------------------------------------------------------------------------------------------


def cross_attention_maps(intermediates: Any) -> dict[str, Array]:
    """The cross-attention probabilities stored by a call with ``mutable=["intermediates"]``.

    Returns ``{"down_blocks_0/attentions_0/transformer_blocks_0/attn2": probs, …}`` in the order of
    the forward pass, each probs [B, heads, H·W, L] float32 (H, W of that level; row-major pixels):
    how much each pixel of that layer attends to each of the L context tokens.
    """
    flat = traverse_util.flatten_dict(intermediates)
    return {"/".join(path[:-1]): value[0] for path, value in flat.items() if path[-1] == "attention_probs"}


def apply_with_attention_maps(
    unet: UNet,
    params: Any,
    x: Array,
    t: Array,
    context: Array,
    class_labels: Array | None = None,
    text_embeds: Array | None = None,
    time_ids: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Run the U-Net and return ``(eps_hat, cross_attention_maps)``; the maps as in ``cross_attention_maps``.

    Computing the maps uses an explicit softmax instead of the fused attention kernel; the output is
    the same up to float rounding.
    """
    out, state = unet.apply({"params": params}, x, t, context, class_labels, text_embeds, time_ids,
                            mutable=["intermediates"])
    return out, cross_attention_maps(state["intermediates"])
