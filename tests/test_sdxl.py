"""Stable Diffusion XL base (Podell et al. 2023) in stable_diffusion.py against diffusers' StableDiffusionXLPipeline.

A tiny random SDXL folder saved by diffusers: two text encoders (a CLIPTextModel and a CLIPTextModelWithProjection
whose tokenizer pads with "!", both 32 wide → a 64-wide context of their penultimate states), the U-Net's added
conditioning (addition_embed_type "text_time": pooled embedding [B, 32] + six time ids × 8 sinusoidal features),
SDXL's U-Net layout (no attention at the first level, linear projections; per-level transformer depths are
checked in test_unet_condition.py), the VAE scale 0.13025, force_zeros_for_empty_prompt. Our txt2img from the
same initial latents equals diffusers' to ≤ 1e-3 for Euler (SDXL's own), DPM-Solver++ and DDIM, with negative
prompts (given, or none: zero embeddings), guidance and non-default time ids; so do the second encoder's own prompts
(prompt_2, negative_prompt_2) and ∅'s own time ids (negative_original_size, …), which change the image; img2img
equals diffusers' StableDiffusionXLImg2ImgPipeline over the same components; the CLI's --prompt-2 is recorded in the
PNG and re-run by --from-png.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from _cli import run_cli  # noqa: E402
from _sd_fixtures import pipe, sd  # noqa: E402,F401 (module fixtures over `folder`)
from _sd_fixtures import PROMPTS, SIZE, write_sdxl_folder  # noqa: E402

from ddpm_jax.pipelines.stable_diffusion import StableDiffusion  # noqa: E402

pytestmark = pytest.mark.fast_compile  # compile-bound: tiny programs, a few calls each (tests/conftest.py)

# diffusers' prompt_2 / negative_prompt_2 (the second encoder's texts) and ∅'s own time ids, all distinct from the defaults
PROMPTS_2 = ["the dog on a cat", "a cat"]
NEGATIVE_SIZES = dict(negative_original_size=(8, 12), negative_crops_coords_top_left=(6, 2), negative_target_size=(64, 48))
CASES = {  # scheduler: (its diffusers class, negative prompts, extra time-id arguments)
    "euler": ("EulerDiscreteScheduler", ["the cat", ""], {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", None, {}),  # no negative prompt: ∅ = zeros (force_zeros)
    "ddim": ("DDIMScheduler", "the cat", dict(original_size=(64, 48), crops_coords_top_left=(4, 2),
                                              target_size=(32, 32))),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_sdxl_folder(tmp_path_factory.mktemp("sdxl"))


def test_sdxl_folder_reads_as_sdxl(sd, pipe):
    """The components say what they are: two encoders (the second with projection), the added conditioning,
    force_zeros_for_empty_prompt, the VAE scale from its config; the condition shapes."""
    assert sd.is_sdxl and sd.force_zeros_for_empty_prompt and pipe.config.force_zeros_for_empty_prompt
    assert sd.unet.config.addition_embed_type == "text_time" and sd.unet.config.addition_time_embed_dim == 8
    assert sd.vae.config.scaling_factor == pipe.vae.config.scaling_factor == 0.13025
    assert sd.tokenizer_2(["the dog"])[0][-1] == pipe.tokenizer_2.convert_tokens_to_ids("!")
    cond = sd.prompt_condition(PROMPTS)
    assert cond["context"].shape == (2, 77, 64) and cond["text_embeds"].shape == (2, 32)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    np.testing.assert_allclose(cond["context"], embeds.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(cond["text_embeds"], pooled.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(sd.time_ids(32, 24), [32, 24, 0, 0, 32, 24])


@pytest.mark.parametrize("name", list(CASES))
def test_sdxl_txt2img_equals_diffusers_pipeline(sd, pipe, name):
    """Same latents, prompts, negative prompts and time ids → the same images to ≤ 1e-3 (2 steps, w = 5), both at
    the model's default size (U-Net sample_size 16 × the VAE's f = 2)."""
    cls, negative, sizes = CASES[name]
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config)
    latents = np.random.default_rng(0).standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)  # NHWC
    if isinstance(negative, str):
        negative = [negative] * len(PROMPTS)
    with torch.no_grad():
        expected = pipe(PROMPTS, negative_prompt=negative, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                        num_inference_steps=2, guidance_scale=5.0, output_type="np", **sizes).images
    ours = sd.with_scheduler(name).txt2img(PROMPTS, negative, guidance_scale=5.0, num_steps=2, latents=latents, **sizes)
    assert ours["images"].shape == expected.shape == (2, SIZE, SIZE, 3) and sd.default_size == (SIZE, SIZE)
    assert expected.std() > 0.05  # not a degenerate (saturated or constant) image
    np.testing.assert_allclose((ours["images"] + 1) / 2, expected, atol=1e-3, rtol=0)


def test_sdxl_prompt_2_and_negative_micro_conditioning_equal_diffusers(sd, pipe):
    """diffusers' prompt_2 / negative_prompt_2 and negative_original_size / _crops_coords_top_left / _target_size (Euler,
    2 steps, w = 5, negative prompts): ours (prompts_2=, negative_prompts_2=, the same negative_* names) equals
    StableDiffusionXLPipeline to ≤ 1e-3; leaving out either the second prompts or ∅'s time ids changes the images by
    far more (so neither is ignored). diffusers is run one prompt at a time: for a batch B > 1 its txt2img lays the
    time ids out as [∅'s, c's] repeated B times (``torch.cat(...).repeat(B, 1)``) against its [∅ × B; c × B] batch,
    mixing ∅'s and c's; ours (one batch of 2) gives image b from its own latents alone."""
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    latents = np.random.default_rng(2).standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)  # NHWC
    negative = ["the cat", ""]
    with torch.no_grad():
        expected = np.concatenate([pipe(PROMPTS[b], negative_prompt=negative[b], prompt_2=PROMPTS_2[b],
                                        negative_prompt_2="a dog", num_inference_steps=2, guidance_scale=5.0,
                                        latents=torch.from_numpy(latents[b:b + 1].transpose(0, 3, 1, 2)),
                                        output_type="np", **NEGATIVE_SIZES).images for b in range(2)])
    euler = sd.with_scheduler("euler")

    def ours(second=True, sizes=True):
        kwargs = (dict(prompts_2=PROMPTS_2, negative_prompts_2="a dog") if second else {}) | (NEGATIVE_SIZES if sizes else {})
        return (euler.txt2img(PROMPTS, ["the cat", ""], guidance_scale=5.0, num_steps=2, latents=latents,
                              **kwargs)["images"] + 1) / 2

    assert expected.std() > 0.05
    np.testing.assert_allclose(ours(), expected, atol=1e-3, rtol=0)
    for ablated in (ours(second=False), ours(sizes=False)):
        assert np.abs(ablated - expected).max() > 0.05
    no_negative = [euler.txt2img(PROMPTS, guidance_scale=5.0, num_steps=2, latents=latents, **kwargs)["images"]
                   for kwargs in ({}, dict(negative_prompts_2="a dog"))]
    assert np.abs(no_negative[0] - no_negative[1]).max() > 0.05  # negative_prompts_2 alone: ∅ is not zeros then


def test_sdxl_img2img_equals_diffusers_img2img_pipeline(sd, pipe):
    """SDEdit from given latents and noise with the base's components: diffusers' StableDiffusionXLImg2ImgPipeline
    (requires_aesthetics_score=False: six time ids, c's for the image's size), DDIM, ≤ 1e-3, with prompt_2,
    negative_prompt_2 and ∅'s own sizes (diffusers' img2img keeps c's crop for ∅: the negative crop left out)."""
    img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**pipe.components, requires_aesthetics_score=False)
    img2img.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    sizes = dict(negative_original_size=(8, 12), negative_target_size=(64, 48))
    init = np.random.default_rng(1).standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)  # NHWC latents
    noise = torch.randn((2, 4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = img2img(PROMPTS, image=torch.from_numpy(init.transpose(0, 3, 1, 2)), strength=0.6, num_inference_steps=4,
                           guidance_scale=4.0, negative_prompt=["the cat", ""], output_type="np",
                           generator=torch.Generator().manual_seed(7), prompt_2=PROMPTS_2, negative_prompt_2="a dog",
                           **sizes).images
    ours = sd.with_scheduler("ddim").img2img(None, PROMPTS, strength=0.6, guidance_scale=4.0, num_steps=4,
                                             negative_prompts=["the cat", ""], init_latents=init,
                                             noise=noise.numpy().transpose(0, 2, 3, 1), prompts_2=PROMPTS_2,
                                             negative_prompts_2="a dog", **sizes)
    assert expected.std() > 0.05
    np.testing.assert_allclose((ours["images"] + 1) / 2, expected, atol=1e-3, rtol=0)


def test_sdxl_bad_inputs_are_one_clear_error(sd, folder, tmp_path):
    """An SDXL U-Net with one (v1) text encoder; an SDXL base or refiner folder without text_encoder_2/."""
    with pytest.raises(ValueError, match="SDXL's added conditioning .* but the pipeline has one text encoder"):
        StableDiffusion(sd.tokenizer, sd.text_encoder, sd.unet, sd.vae, sd.scheduler, sd.params)
    broken = tmp_path / "no_text_encoder_2"
    broken.mkdir()
    for child in folder.iterdir():
        if child.name != "text_encoder_2":
            (broken / child.name).symlink_to(child)
    with pytest.raises(FileNotFoundError, match="not a diffusers SDXL folder: missing text_encoder_2/"):
        StableDiffusion.from_pretrained(broken)
    (broken / "model_index.json").unlink()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionXLImg2ImgPipeline", '
                                             '"text_encoder": [null, null], "requires_aesthetics_score": true}')
    with pytest.raises(FileNotFoundError, match="not a diffusers SDXL refiner folder: missing text_encoder_2/"):
        StableDiffusion.from_pretrained(broken)
    with pytest.raises(ValueError, match="original_size, crops_coords_top_left and target_size must be"):
        sd.txt2img("the dog", num_steps=1, height=SIZE, width=SIZE, original_size=(32,))
    with pytest.raises(ValueError, match="2 prompts but 3 prompts_2; give one per prompt"):
        sd.txt2img(PROMPTS, num_steps=1, prompts_2=["a", "b", "c"])
    with pytest.raises(ValueError, match="2 prompts but 1 negative_prompts_2; give one per prompt"):
        sd.txt2img(PROMPTS, num_steps=1, negative_prompts_2=["a"])


def test_cli_prompt_2_is_recorded_and_from_png_remakes_it(folder, tmp_path, capsys):
    """``ddpm-jax txt2img --prompt-2 … --negative-prompt-2 …`` (1 step): each PNG records both texts; --from-png re-runs
    image 1's record to the same pixels; --prompt-2 with a --workdir: the one-line error."""
    from PIL import Image

    from ddpm_jax import png_metadata

    out = tmp_path / "t.png"
    argv = ["txt2img", "--model", str(folder), "--steps", "1", "--out", str(out), "--negative", "the cat",
            "--prompt-2", "a cat", "--prompt-2", "the dog on a cat", "--negative-prompt-2", "a dog", *PROMPTS]
    status, _, _ = run_cli(argv, capsys)
    assert status == 0
    record = png_metadata.read_generation(tmp_path / "t_1.png")
    assert (record.prompt, record.prompt_2, record.negative_prompt_2) == (PROMPTS[1], "the dog on a cat", "a dog")
    status, _, _ = run_cli(["txt2img", "--from-png", str(tmp_path / "t_1.png"), "--out", str(tmp_path / "a.png")], capsys)
    assert status == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a_0.png")), np.asarray(Image.open(tmp_path / "t_1.png")))
    status, _, err = run_cli(["txt2img", "--workdir", str(tmp_path), "--prompt-2", "a", "the dog"], capsys)
    assert status == 2 and "not to a --workdir run (so do --prompt-2" in err


def test_from_configs_builds_a_random_sdxl_of_the_folders_architecture(sd):
    """StableDiffusion.from_configs with the folder's configs and text_config_2: the same parameter tree and shapes
    as the diffusers folder (random values), SDXL's wiring (force_zeros_for_empty_prompt, Euler), a txt2img run at
    the default size; the refiner form (text_encoder_2 alone, five time ids); one-line errors."""
    import jax

    configs = (sd.unet.config, sd.vae.config, sd.text_encoder.config)
    random = StableDiffusion.from_configs(*configs, text_config_2=sd.text_encoder_2.config, seed=1)
    shapes = lambda params: jax.tree.map(np.shape, params)  # noqa: E731
    assert shapes(random.params) == shapes(sd.params)
    assert random.is_sdxl and random.force_zeros_for_empty_prompt and random.scheduler.name == "euler"
    images = random.txt2img(PROMPTS, guidance_scale=5.0, num_steps=2, seed=3)["images"]
    assert images.shape == (2, SIZE, SIZE, 3) and np.isfinite(images).all() and images.std() > 0.01
    refiner_unet = sd.unet.config.__class__(**{**sd.unet.config.__dict__, "cross_attention_dim": 32,
                                               "projection_class_embeddings_input_dim": 32 + 5 * 8})
    refiner = StableDiffusion.from_configs(refiner_unet, sd.vae.config, None, text_config_2=sd.text_encoder_2.config,
                                           refiner=True)
    assert refiner.is_refiner and refiner.text_encoder is None and "text_encoder" not in refiner.params
    with pytest.raises(ValueError, match="text_encoder_2 alone"):
        StableDiffusion.from_configs(refiner_unet, sd.vae.config, sd.text_encoder.config, refiner=True)
    with pytest.raises(ValueError, match="needs text_encoder_2"):
        StableDiffusion.from_configs(*configs)    # an SDXL U-Net with one text encoder
