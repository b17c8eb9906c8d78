"""Inpainting with Stable Diffusion: repaint the region of an image under a mask, keep the rest.

Two kinds of U-Net, as diffusers' ``StableDiffusionInpaintPipeline`` runs them (shapes for B images of H × W,
f = the VAE's downsampling factor, h = H/f, w = W/f):

- **SD's inpainting U-Net** (Rombach et al. 2022 §4.5; ``in_channels = 9``), trained with the mask and the masked
  image as extra inputs: at every step the U-Net reads

      [z_t, m↓, s·E(x ⊙ (1 − m))]                                   [B, h, w, 4 + 1 + 4]

  (``unet_inputs``): the latent z_t (scaled by the scheduler), the mask m↓ at latent size and the latents of the
  masked image, the last two fixed for the whole run and not scaled.
- **A plain U-Net** (``in_channels = 4``) by latent blending (as RePaint's known-region step, Lugmayr et al. 2022
  Eq. 8, without its resampling): after the step to grid point i + 1 the known region is replaced by the image's
  latents noised to that point, z ← (1 − m↓) ⊙ q(z_0^image, t_{i+1}; ε) + m↓ ⊙ z, with the same ε as the start
  and the clean z_0^image after the last step (``blend_fn``; DDPM Eq. 4 through the scheduler's ``add_noise``).

The mask is diffusers' ``VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)``:
one channel in [0, 1] (white = repaint), binarised at 0.5 (``prepare_mask``); the masked image is x ⊙ (m < 0.5)
(``masked_image``); m↓ is the mask at latent size by nearest neighbour, torch's ``interpolate`` default
(``latent_mask``). ``StableDiffusion.inpaint`` runs it as one compiled program; tests: ``tests/test_inpaint.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.diffusion import EpsFn

Array = jax.Array


def prepare_mask(mask: Any, images_shape: tuple[int, ...]) -> np.ndarray:
    """A mask for images [B, H, W, 3] → [B, H, W, 1] float32 of 0/1 (1 = repaint), binarised at 0.5 as diffusers'
    mask processor (``do_binarize``). Accepts [H, W], [H, W, 1] (one for every image), [B, H, W] or [B, H, W, 1],
    values in [0, 1]; anything else is a one-line error naming what was wrong."""
    mask = np.asarray(mask, np.float32)
    batch, height, width = images_shape[:3]
    if mask.ndim == 4 and mask.shape[-1] != 1 or mask.ndim == 3 and mask.shape[-1] not in (1, width):
        raise ValueError(f"the mask must have one channel (grayscale, white = repaint), got shape {mask.shape}; "
                         f"convert it with PIL's .convert('L') or take one channel")
    if mask.ndim == 2 or mask.ndim == 3 and mask.shape[-1] == 1 and mask.shape[0] == height:
        mask = mask[None]                                                          # one mask for every image
    mask = mask if mask.ndim == 4 else mask[..., None]                             # [b, H, W, 1]
    if mask.ndim != 4 or mask.shape[1:3] != (height, width) or mask.shape[0] not in (1, batch):
        raise ValueError(f"the mask must be the images' size {height}×{width} (one per image or one for all), got shape "
                         f"{mask.shape}; resize it to the image (stable_diffusion.read_image(path, H, W, "
                         f"grayscale=True) does)")
    if not np.isfinite(mask).all() or mask.min() < 0.0 or mask.max() > 1.0:
        raise ValueError(f"mask values must be in [0, 1] (1 = repaint), got [{mask.min():g}, {mask.max():g}]; "
                         f"divide an 8-bit mask by 255")
    return np.broadcast_to(np.where(mask < 0.5, 0.0, 1.0).astype(np.float32), (batch, height, width, 1))


def masked_image(images: Array, mask: Array) -> Array:
    """x ⊙ (m < 0.5): the image with the region to repaint set to 0 (mid-grey in [−1, 1]), [B, H, W, 3]."""
    return images * (mask < 0.5).astype(images.dtype)


def latent_mask(mask: Array, f: int) -> Array:
    """m↓: the mask [B, H, W, 1] at latent size [B, H/f, W/f, 1], nearest neighbour (torch's ``interpolate``
    default, which for a whole factor f reads pixel (f·y, f·x))."""
    return mask[:, ::f, ::f, :]


def unet_inputs(eps_fn: EpsFn, mask_latent: Array, masked_latents: Array) -> EpsFn:
    """The 9-channel inpainting U-Net as an ``eps_fn(z, t)`` of the 4 latent channels: its input is
    [z, m↓, s·E(x ⊙ (1 − m))] along the channels, [B, h, w, 9] (``eps_fn`` is the guided U-Net, which doubles
    the batch itself)."""

    def eps(z: Array, t: Array) -> Array:
        return eps_fn(jnp.concatenate([z, mask_latent.astype(z.dtype), masked_latents.astype(z.dtype)], -1), t)

    return eps


def blend_fn(scheduler: Any, image_latents: Array, noise: Array, mask_latent: Array
             ) -> Callable[[Array, Array, Any], Array]:
    """Latent blending for a plain U-Net, ``schedulers.run``'s ``after_step``: after step i,

        z ← (1 − m↓) ⊙ add_noise(z_0^image, ε, i + 1) + m↓ ⊙ z        (z_0^image itself after the last step)

    with ``scheduler.add_noise`` (DDPM Eq. 4, or x_0 + σ ε in σ-space) at grid point i + 1 and the ε of the start."""

    def after_step(z: Array, i: Array, state: Any) -> Array:
        n = state.timesteps.shape[0]
        noised = scheduler.add_noise(state, image_latents, noise, jnp.minimum(i + 1, n - 1))
        known = jnp.where(i + 1 < n, noised, image_latents)                            # [B, h, w, 4]
        return (1.0 - mask_latent) * known + mask_latent * z

    return after_step


__all__ = ["blend_fn", "latent_mask", "masked_image", "prepare_mask", "unet_inputs"]
