"""Pipelines: what is diffused and what conditions it, and generation from trained models.

- ``training_data``: the arrays a diffusion model trains on (pixels or latents; labels or text states).
- ``generate``: any solver for any :class:`~ddpm_jax.diffusion_model.DiffusionModel`, guided, over devices.
- ``cross_attention``: per-token cross-attention maps of text-conditional models.
- ``stable_diffusion``: Stable Diffusion checkpoints (tokenizer → CLIP → guided U-Net → VAE) as one program.
"""
