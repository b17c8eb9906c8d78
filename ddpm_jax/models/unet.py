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
``down_blocks_0/resnets_1/conv1``), so ``ddpm_jax.pretrained.load_unet`` is a key mapping.

Which blocks a level holds is the diffusers block type (``"AttnDownBlock2D"``, …); the tables
``DOWN_BLOCK_ATTENTION``/``UP_BLOCK_ATTENTION`` say what attention each type adds after its ResNet
blocks. Stable Diffusion's cross-attention blocks and class conditioning extend these tables and
``UNetConfig``; the module structure stays the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models.layers import (
    Conv3x3,
    Downsample,
    ResnetBlock,
    SpatialSelfAttention,
    TimestepMLP,
    Upsample,
    timestep_embedding,
)

Array = jax.Array

# Block type (diffusers' name) → the attention that follows each of its ResNet blocks.
DOWN_BLOCK_ATTENTION: dict[str, str | None] = {"DownBlock2D": None, "AttnDownBlock2D": "self"}
UP_BLOCK_ATTENTION: dict[str, str | None] = {"UpBlock2D": None, "AttnUpBlock2D": "self"}


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of the U-Net; field names and meanings are those of diffusers' UNet2DModel.

    The defaults are the DDPM CIFAR-10 model (see ``ddpm_cifar10``) without dropout.
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
    mid_block_scale_factor: float = 1.0  # the mid block's outputs are divided by this
    dtype: Any = jnp.float32  # computation dtype; parameters are always float32

    def __post_init__(self):
        # JSON gives lists; keep the config hashable.
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
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

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

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


# --------------------------------------------------------------------------------------------
# Blocks of one resolution level
# --------------------------------------------------------------------------------------------


def _resnet(config: UNetConfig, out_channels: int, name: str, scale: float = 1.0) -> ResnetBlock:
    return ResnetBlock(
        out_channels,
        num_groups=config.norm_num_groups,
        eps=config.norm_eps,
        dropout=config.dropout,
        output_scale_factor=scale,
        dtype=config.dtype,
        name=name,
    )


def _attention(config: UNetConfig, kind: str, channels: int, name: str, scale: float = 1.0) -> nn.Module:
    """The attention layer of type ``kind`` (see DOWN_BLOCK_ATTENTION) over ``channels`` features."""
    if kind == "self":
        head_dim = config.attention_head_dim or channels
        return SpatialSelfAttention(
            query_dim=channels,
            num_heads=channels // head_dim,
            head_dim=head_dim,
            norm_num_groups=config.norm_num_groups,
            norm_eps=config.norm_eps,
            rescale_output_factor=scale,
            dtype=config.dtype,
            name=name,
        )
    raise ValueError(f"unknown attention kind {kind!r}")


class DownBlock(nn.Module):
    """One level of the encoder: ResNet blocks (each + attention if any), then a stride-2 conv.

    Returns the output and every intermediate activation, for the skip connections.
    """

    config: UNetConfig
    out_channels: int
    attention: str | None  # None or "self"
    add_downsample: bool

    @nn.compact
    def __call__(self, h: Array, temb: Array, *, train: bool = False) -> tuple[Array, list[Array]]:
        # h: [B, H, W, C_in] → [B, H/2, W/2, C_out] (or [B, H, W, C_out] at the last level)
        cfg = self.config
        skips = []
        for i in range(cfg.layers_per_block):
            h = _resnet(cfg, self.out_channels, f"resnets_{i}")(h, temb, train=train)  # [B, H, W, C_out]
            if self.attention:
                h = _attention(cfg, self.attention, self.out_channels, f"attentions_{i}")(h)
            skips.append(h)
        if self.add_downsample:
            h = Downsample(self.out_channels, cfg.downsample_padding, cfg.dtype, name="downsamplers_0")(h)
            skips.append(h)  # [B, H/2, W/2, C_out]
        return h, skips


class MidBlock(nn.Module):
    """The bottleneck at the lowest resolution: ResNet → self-attention → ResNet."""

    config: UNetConfig

    @nn.compact
    def __call__(self, h: Array, temb: Array, *, train: bool = False) -> Array:
        # h: [B, h, w, C] → [B, h, w, C]
        cfg = self.config
        channels, scale = h.shape[-1], cfg.mid_block_scale_factor
        h = _resnet(cfg, channels, "resnets_0", scale)(h, temb, train=train)
        if cfg.add_attention:
            h = _attention(cfg, "self", channels, "attentions_0", scale)(h)
        return _resnet(cfg, channels, "resnets_1", scale)(h, temb, train=train)


class UpBlock(nn.Module):
    """One level of the decoder: (concat a skip → ResNet (+ attention)) × (layers_per_block + 1), then ×2 up."""

    config: UNetConfig
    out_channels: int
    attention: str | None
    add_upsample: bool

    @nn.compact
    def __call__(self, h: Array, skips: list[Array], temb: Array, *, train: bool = False) -> Array:
        # h: [B, H, W, C_prev], skips: the encoder activations of this level, consumed last-first
        cfg = self.config
        for i, skip in enumerate(reversed(skips)):
            h = jnp.concatenate([h, skip], axis=-1)  # [B, H, W, C_prev + C_skip]
            h = _resnet(cfg, self.out_channels, f"resnets_{i}")(h, temb, train=train)  # [B, H, W, C_out]
            if self.attention:
                h = _attention(cfg, self.attention, self.out_channels, f"attentions_{i}")(h)
        if self.add_upsample:
            h = Upsample(self.out_channels, cfg.dtype, name="upsamplers_0")(h)  # [B, 2H, 2W, C_out]
        return h


# --------------------------------------------------------------------------------------------
# The U-Net
# --------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """ε_θ(x_t, t): predicts the noise in x_t (Ho et al. 2020, Eq. 11-14; architecture in Appendix B).

    Call ``UNet(config).apply({"params": params}, x, t)`` with x [B, H, W, in_channels] (NHWC)
    and integer timesteps t [B] (or a scalar, used for the whole batch). With ``train=True``,
    dropout is active and draws from the "dropout" rng collection.
    """

    config: UNetConfig

    def _check_inputs(self, x: Array, t: Array) -> None:
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

    @nn.compact
    def __call__(self, x: Array, t: Array, *, train: bool = False) -> Array:
        cfg = self.config
        self._check_inputs(x, t)
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))  # [B]

        # Timestep embedding, shared by every ResNet block.
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)  # [B, C0]
        temb = TimestepMLP(cfg.time_embed_dim, cfg.dtype, name="time_embedding")(temb.astype(cfg.dtype))  # [B, D]

        # Down path; keep every activation for the skip connections.
        h = Conv3x3(cfg.block_out_channels[0], dtype=cfg.dtype, name="conv_in")(x.astype(cfg.dtype))  # [B, H, W, C0]
        skips = [h]
        for level, (block_type, channels) in enumerate(zip(cfg.down_block_types, cfg.block_out_channels)):
            h, level_skips = DownBlock(
                cfg,
                channels,
                attention=DOWN_BLOCK_ATTENTION[block_type],
                add_downsample=level < cfg.num_levels - 1,
                name=f"down_blocks_{level}",
            )(h, temb, train=train)
            skips += level_skips

        h = MidBlock(cfg, name="mid_block")(h, temb, train=train)  # [B, H/2^(L-1), W/2^(L-1), C_last]

        # Up path, from the lowest resolution; each level consumes layers_per_block + 1 skips.
        up_channels = cfg.block_out_channels[::-1]
        for level, (block_type, channels) in enumerate(zip(cfg.up_block_types, up_channels)):
            n = cfg.layers_per_block + 1
            skips, level_skips = skips[:-n], skips[-n:]
            h = UpBlock(
                cfg,
                channels,
                attention=UP_BLOCK_ATTENTION[block_type],
                add_upsample=level < cfg.num_levels - 1,
                name=f"up_blocks_{level}",
            )(h, level_skips, temb, train=train)

        # Output head.
        h = nn.GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, dtype=cfg.dtype, name="conv_norm_out")(h)
        h = nn.silu(h)
        h = Conv3x3(cfg.out_channels, dtype=cfg.dtype, name="conv_out")(h)  # [B, H, W, out_channels]
        return h.astype(jnp.float32)
