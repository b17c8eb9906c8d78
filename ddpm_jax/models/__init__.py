"""Neural networks: the U-Net and its building blocks (VAE and CLIP will join them)."""

from ddpm_jax.models.layers import (
    Attention,
    Downsample,
    ResnetBlock,
    SpatialSelfAttention,
    TimestepMLP,
    Upsample,
    timestep_embedding,
)
from ddpm_jax.models.unet import UNet, UNetConfig

__all__ = [
    "Attention",
    "Downsample",
    "ResnetBlock",
    "SpatialSelfAttention",
    "TimestepMLP",
    "UNet",
    "UNetConfig",
    "Upsample",
    "timestep_embedding",
]
