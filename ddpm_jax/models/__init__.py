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
from ddpm_jax.models.discriminator import NLayerDiscriminator
from ddpm_jax.models.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian, GaussianVAE, GaussianVAEConfig

__all__ = [
    "Attention",
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "DiagonalGaussian",
    "GaussianVAE",
    "GaussianVAEConfig",
    "NLayerDiscriminator",
    "Downsample",
    "ResnetBlock",
    "SpatialSelfAttention",
    "TimestepMLP",
    "UNet",
    "UNetConfig",
    "Upsample",
    "timestep_embedding",
]
