"""Inpainting (pipelines/inpainting.py, StableDiffusion.inpaint) against diffusers' StableDiffusionInpaintPipeline.

Two tiny random folders written by diffusers' own save_pretrained: a StableDiffusionInpaintPipeline with SD's
9-channel inpainting U-Net (z_t, the mask at latent size, the masked image's latents), and a plain 4-channel
StableDiffusionPipeline (latent blending by mask). From the same PIL image and mask, with the same ε and step noise
and a point-mass VAE posterior (``sharp_posterior``: the encoder's draw changes nothing), our images equal diffusers'
to ≤ 1e-3 for both U-Net kinds, at strength 1 (pure noise) and < 1 (mid-grid start). Plus the mask preprocessing
against diffusers' mask processor and torch's interpolate, the bad inputs, and the CLI.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from ddpm_jax.pipelines import inpainting  # noqa: E402
from ddpm_jax.pipelines.stable_diffusion import StableDiffusion, preprocess_image, strength_start  # noqa: E402

from _sd_fixtures import UNET_V1, inject_step_noise, smooth_image, write_sd_folder  # noqa: E402

pytestmark = pytest.mark.fast_compile  # compile-bound: tiny programs, a few calls each (tests/conftest.py)

SIZE = 32  # image side; the tiny VAE has f = 2 → 16×16 latents
PROMPTS = ["a cat on the dog", "the dog"]
NEGATIVE = ["the cat", ""]
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                 steps_offset=1, set_alpha_to_one=False)
SCHEDULERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
              "dpmsolver++": "DPMSolverMultistepScheduler"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{9: the inpainting folder (in_channels 9), 4: a plain SD folder}, both with a point-mass VAE posterior."""
    root = tmp_path_factory.mktemp("inpaint")
    return {9: write_sd_folder(root / "nine", UNET_V1 | dict(in_channels=9), diffusers.PNDMScheduler(**SCHEDULER),
                               sharp_vae=True, inpainting=True),
            4: write_sd_folder(root / "four", UNET_V1, diffusers.PNDMScheduler(**SCHEDULER), sharp_vae=True)}


@pytest.fixture(scope="module")
def pipelines(folders):
    """(ours, diffusers') per U-Net kind, loaded once."""
    return {k: (StableDiffusion.from_pretrained(folder), diffusers.StableDiffusionInpaintPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False)) for k, folder in folders.items()}


def images_and_masks():
    """Two images and masks as PIL (the mask a soft grayscale disc, so binarising matters)."""
    y, x = np.mgrid[:SIZE, :SIZE]
    masks = [np.clip(1.5 - np.hypot(x - c, y - c) / 6.0, 0, 1) for c in (12, 20)]           # white = repaint
    from PIL import Image

    return ([smooth_image(SIZE, SIZE, k) for k in range(2)],
            [Image.fromarray(np.round(m * 255).astype(np.uint8), "L") for m in masks])




@pytest.mark.parametrize("channels,name,strength", [(9, "ddim", 1.0), (9, "pndm", 0.6), (4, "dpmsolver++", 1.0),
                                                    (4, "euler_ancestral", 0.7)])
def test_inpaint_equals_diffusers_pipeline(pipelines, channels, name, strength, monkeypatch):
    """StableDiffusionInpaintPipeline from the same PIL images and masks, ours from preprocess_image of them: the
    9-channel U-Net (its input [z, m↓, s·E(x ⊙ (1 − m))]) and a plain U-Net (latent blending after each step), from
    pure noise (strength 1) and from the image noised mid-grid (PNDM's warm-up restarted there), ≤ 1e-3. The same ε
    goes to both (ours: ``noise=``; diffusers': its randn_tensor) and Euler-ancestral's steps get our step noise."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint_module
    from diffusers.schedulers import scheduling_euler_ancestral_discrete

    ours, theirs = pipelines[channels]
    ours = ours.with_scheduler(name)
    theirs.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(theirs.scheduler.config)
    images, masks = images_and_masks()
    seed, steps = 4, 5
    noise = np.random.default_rng(2).standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
    monkeypatch.setattr(inpaint_module, "randn_tensor", lambda shape, **kw: torch.from_numpy(noise.transpose(0, 3, 1, 2)))
    inject_step_noise(monkeypatch, scheduling_euler_ancestral_discrete, seed, noise.shape,
                      range(strength_start(steps, strength), steps))
    with torch.no_grad():
        expected = theirs(PROMPTS, image=images, mask_image=masks, strength=strength, num_inference_steps=steps,
                          guidance_scale=4.0, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
                          output_type="np").images
    pixels = np.concatenate([preprocess_image(im, multiple=2) for im in images])                 # [2, 32, 32, 3]
    mask = np.concatenate([preprocess_image(m, multiple=2, grayscale=True) for m in masks])      # [2, 32, 32, 1]
    result = ours.inpaint(pixels, mask, PROMPTS, strength=strength, negative_prompts=NEGATIVE, guidance_scale=4.0,
                          num_steps=steps, seed=seed, noise=noise)
    assert expected.std() > 0.05
    np.testing.assert_allclose((result["images"] + 1) / 2, expected, atol=1e-3, rtol=0)


def test_mask_preprocessing_equals_diffusers(pipelines):
    """prepare_mask (binarised at 0.5) = diffusers' mask processor, masked_image = image · (mask < 0.5), latent_mask =
    torch's nearest interpolate to latent size, as StableDiffusionInpaintPipeline prepares them."""
    theirs = pipelines[9][1]
    images, masks = images_and_masks()
    expected_mask = theirs.mask_processor.preprocess(masks, height=SIZE, width=SIZE)              # [2, 1, H, W]
    soft = np.concatenate([preprocess_image(m, multiple=2, grayscale=True) for m in masks])
    mask = inpainting.prepare_mask(soft, (2, SIZE, SIZE, 3))
    assert 0 < mask.mean() < 1 and set(np.unique(soft)) - {0.0, 1.0}                            # a soft mask, binarised
    np.testing.assert_array_equal(mask, expected_mask.numpy().transpose(0, 2, 3, 1))
    init = theirs.image_processor.preprocess(images, height=SIZE, width=SIZE)
    pixels = np.concatenate([preprocess_image(im, multiple=2) for im in images])
    np.testing.assert_allclose(inpainting.masked_image(pixels, mask),
                               (init * (expected_mask < 0.5)).numpy().transpose(0, 2, 3, 1), atol=1e-6)
    small = torch.nn.functional.interpolate(expected_mask, size=(SIZE // 2, SIZE // 2))
    np.testing.assert_array_equal(inpainting.latent_mask(mask, 2), small.numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(inpainting.prepare_mask(soft[0, ..., 0], (2, SIZE, SIZE, 3)), np.stack([mask[0]] * 2))


def test_bad_inputs(pipelines):
    """One clear line each, before anything is compiled."""
    nine, plain = pipelines[9][0], pipelines[4][0]
    images, mask = np.zeros((1, SIZE, SIZE, 3)), np.ones((1, SIZE, SIZE, 1))
    with pytest.raises(ValueError, match=r"the mask must be the images' size 32×32 .* got shape \(1, 16, 16, 1\)"):
        plain.inpaint(images, np.ones((1, 16, 16, 1)), "a cat")
    with pytest.raises(ValueError, match="the mask must have one channel"):
        plain.inpaint(images, np.ones((1, SIZE, SIZE, 3)), "a cat")
    with pytest.raises(ValueError, match=r"mask values must be in \[0, 1\].*divide an 8-bit mask by 255"):
        plain.inpaint(images, mask * 255, "a cat")
    for strength in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            nine.inpaint(images, mask, "a cat", strength=strength)
    for call in (lambda: nine.txt2img("a cat", height=SIZE, width=SIZE),
                 lambda: nine.img2img(images, "a cat", num_steps=2)):
        with pytest.raises(ValueError, match="SD's inpainting U-Net .* use inpaint"):
            call()


def test_cli_inpaint(folders, tmp_path):
    """ddpm-jax inpaint --model M --image I --mask K prompt: a PNG; img2img --scheduler pndm (every scheduler works)."""
    from ddpm_jax import cli

    images, masks = images_and_masks()
    images[0].save(tmp_path / "in.png")
    masks[0].resize((40, 40)).save(tmp_path / "mask.png")      # any size: resized to the image's, as diffusers
    out = tmp_path / "out.png"
    assert cli.main(["inpaint", "--model", str(folders[9]), "--image", str(tmp_path / "in.png"), "--mask",
                     str(tmp_path / "mask.png"), "a cat", "--steps", "2", "--scheduler", "euler",
                     "--out", str(out)]) == 0
    assert out.is_file()
