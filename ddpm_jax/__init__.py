"""ddpm_jax: denoising diffusion and Stable Diffusion from scratch in JAX + Flax, written to be read."""

__version__ = "0.1.0"
