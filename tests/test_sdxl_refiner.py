"""The SDXL refiner and base → refiner (Podell et al. 2023 §2.5) in stable_diffusion.py against diffusers.

A tiny random refiner folder saved by diffusers (StableDiffusionXLImg2ImgPipeline): text_encoder_2 alone (the base's
CLIPTextModelWithProjection, 32 wide: the context is its penultimate states), requires_aesthetics_score (five time
ids: original size, crop top-left, aesthetic score; 6.0 with the prompt, 2.5 with ∅), force_zeros_for_empty_prompt
false; beside it test_sdxl's tiny SDXL base. Our refiner img2img equals diffusers' to ≤ 1e-3; base(denoising_end=0.8,
latents) → refiner(denoising_start=0.8) equals diffusers' two-pipeline run to ≤ 1e-3 (Euler, DDIM; with prompt_2
and ∅'s own time ids); the CLI's ``txt2img --refiner`` runs it with the refiner as a single file.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from _cli import run_cli  # noqa: E402
from _sd_fixtures import NEGATIVE, PROMPTS, SIZE, write_sdxl_folder  # noqa: E402
from _sd_fixtures import pipe, sd  # noqa: E402,F401 (module fixtures over `folder`)

from ddpm_jax.pipelines.stable_diffusion import StableDiffusion, txt2img_with_refiner  # noqa: E402

pytestmark = pytest.mark.fast_compile  # compile-bound: tiny programs, a few calls each (tests/conftest.py)

STEPS = 4  # the "leading" grid 751, 501, 251, 1: a cut at 0.8 (t_c = 200) leaves the base 3 steps, the refiner 1


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The refiner (``pipe`` and ``sd`` are over it)."""
    return write_sdxl_folder(tmp_path_factory.mktemp("refiner"), refiner=True)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return write_sdxl_folder(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def base(base_folder):
    return StableDiffusion.from_pretrained(base_folder)


def test_refiner_img2img_equals_diffusers(sd, pipe):
    """The refiner reads as what it is (no text_encoder, a 32-wide context, five time ids) and its SDEdit from given
    latents and noise equals diffusers' StableDiffusionXLImg2ImgPipeline (Euler, strength 0.6, w = 4, aesthetic
    scores 7 / 2, ∅'s own original size and crop): ≤ 1e-3 (measured max |Δ| 1.6e-6 on the images in [0, 1]).
    prompts_2 is refused (its one encoder reads the prompts, as diffusers'), and so is a target size."""
    assert sd.is_refiner and sd.is_sdxl and sd.text is None and "text_encoder" not in sd.params
    assert pipe.text_encoder is None and pipe.config.requires_aesthetics_score and not sd.force_zeros_for_empty_prompt
    cond = sd.prompt_condition(PROMPTS)
    assert cond["context"].shape == (2, 77, 32) and cond["text_embeds"].shape == (2, 32)
    init = np.random.default_rng(1).standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)  # NHWC latents
    noise = torch.randn((2, 4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(7))
    scores = dict(aesthetic_score=7.0, negative_aesthetic_score=2.0, negative_original_size=(8, 12),
                  negative_crops_coords_top_left=(6, 2))
    with torch.no_grad():
        expected = pipe(PROMPTS, image=torch.from_numpy(init.transpose(0, 3, 1, 2)), strength=0.6, num_inference_steps=4,
                        guidance_scale=4.0, negative_prompt=NEGATIVE, output_type="np",
                        generator=torch.Generator().manual_seed(7), **scores).images
    ours = sd.img2img(None, PROMPTS, strength=0.6, guidance_scale=4.0, num_steps=4, negative_prompts=NEGATIVE,
                      init_latents=init, noise=noise.numpy().transpose(0, 2, 3, 1), **scores)
    assert expected.std() > 0.05  # not a degenerate (saturated or constant) image
    np.testing.assert_allclose((ours["images"] + 1) / 2, expected, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="the SDXL refiner's reads prompts, as diffusers'"):
        sd.img2img(None, PROMPTS, init_latents=init, num_steps=2, prompts_2="a dog")
    with pytest.raises(ValueError, match="an aesthetic score in place of the target size"):
        sd.img2img(None, PROMPTS, init_latents=init, num_steps=2, negative_target_size=(8, 8))


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_base_to_refiner_equals_diffusers_two_pipeline_run(base, sd, base_folder, pipe, scheduler):
    """diffusers' "ensemble of expert denoisers": base(denoising_end=0.8, output_type="latent") → refiner(image=those
    latents, denoising_start=0.8), 4 steps, w = 5, negative prompts; ours (two programs, no decode in the first) gives
    the same cut (3 + 1 steps), the same latents and images: ≤ 1e-3 (measured max |Δ|: Euler 2.8e-5 on the latents
    at the cut, 2.1e-6 on the images in [0, 1]; DDIM 5.0e-5 and 2.4e-5). Euler with the base's prompt_2 /
    negative_prompt_2 and, for both models, ∅'s own original size and crop (txt2img_with_refiner passes those to
    both; one prompt: diffusers' txt2img mixes ∅'s and c's time ids for B > 1, see test_sdxl)."""
    cls = {"euler": diffusers.EulerDiscreteScheduler, "ddim": diffusers.DDIMScheduler}[scheduler]
    base_pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(base_folder)
    base_pipe.scheduler = cls.from_config(base_pipe.scheduler.config)
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    latents = np.random.default_rng(0).standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)  # z_T, NHWC
    prompts, negative, extra, second = PROMPTS, NEGATIVE, {}, {}
    if scheduler == "euler":
        prompts, negative, latents = PROMPTS[:1], NEGATIVE[:1], latents[:1]
        extra = dict(negative_original_size=(8, 12), negative_crops_coords_top_left=(6, 2))  # both models'
        second = dict(negative_target_size=(64, 48), prompt_2="the dog on a cat", negative_prompt_2="a dog")  # base's
    common = dict(num_inference_steps=STEPS, guidance_scale=5.0, negative_prompt=negative, **extra)
    with torch.no_grad():
        cut = base_pipe(prompts, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)), denoising_end=0.8,
                        output_type="latent", **common, **second).images                          # [B, 4, h, w]
        expected = pipe(prompts, image=cut, denoising_start=0.8, output_type="np", **common).images
    ours_second = {k.replace("prompt_2", "prompts_2"): v for k, v in second.items()}
    base_s, refiner_s = base.with_scheduler(scheduler), sd.with_scheduler(scheduler)
    first = base_s.txt2img(prompts, negative, guidance_scale=5.0, num_steps=STEPS, latents=latents, denoising_end=0.8,
                           return_latents=True, **extra, **ours_second)
    assert "images" not in first and first["trajectory"].shape[0] == 3                       # 3 of the 4 steps
    np.testing.assert_allclose(first["latents"], cut.numpy().transpose(0, 2, 3, 1), atol=1e-3, rtol=0)
    ours = txt2img_with_refiner(base_s, refiner_s, prompts, negative, guidance_scale=5.0, num_steps=STEPS,
                                high_noise_frac=0.8, latents=latents, **extra, **ours_second)
    assert expected.std() > 0.05
    np.testing.assert_allclose((ours["images"] + 1) / 2, expected, atol=1e-3, rtol=0)


def test_refiner_bad_inputs_are_one_clear_error(base, sd):
    """The refiner where the base is needed (txt2img: it was trained on the low noise levels only; diffusers has no
    refiner txt2img either); denoising_end / denoising_start outside (0, 1) or leaving no step to run."""
    with pytest.raises(ValueError, match="this is the SDXL refiner .* txt2img needs the SDXL base"):
        sd.txt2img("the dog", num_steps=2)
    with pytest.raises(ValueError, match=r"denoising_end must be a fraction in \(0, 1\)"):
        base.txt2img("the dog", num_steps=2, denoising_end=1.0)
    with pytest.raises(ValueError, match=r"denoising_start must be a fraction in \(0, 1\)"):
        sd.img2img(None, "the dog", init_latents=np.zeros((1, 16, 16, 4)), num_steps=2, denoising_start=0.0)
    with pytest.raises(ValueError, match="denoising_end=0.05 leaves no step of this 4-point grid to the base"):
        base.txt2img("the dog", num_steps=STEPS, denoising_end=0.05)
    with pytest.raises(ValueError, match="denoising_start=0.9995 leaves no step of this 4-point grid to the refiner"):
        sd.img2img(None, "the dog", init_latents=np.zeros((1, 16, 16, 4)), num_steps=STEPS, denoising_start=0.9995)


def test_cli_txt2img_with_refiner(base_folder, folder, tmp_path, capsys, monkeypatch):
    """``ddpm-jax txt2img --model <base> --refiner <refiner> --high-noise-frac 0.5`` writes the PNG (2 steps), the
    refiner a single file in sgm's refiner layout (test_single_file.py: it loads to the folder's params) without a
    config folder (the layout's implied configs, here the tiny folder's patched in) or tokenizer (the base's
    tokenizer_2: ``load_refiner``); the refiner given as --model, or the base as --refiner: the one-line errors."""
    import json

    from safetensors.numpy import save_file

    from _sd_fixtures import to_single_file
    from ddpm_jax.pretrained import compvis

    monkeypatch.setitem(compvis.IMPLIED_CONFIGS, "sdxl_refiner", {
        name: json.loads((folder / name / "config.json").read_text()) for name in ("unet", "vae", "text_encoder_2")})
    save_file(to_single_file(folder, "sdxl_refiner"), tmp_path / "refiner.safetensors")
    out = tmp_path / "grid.png"
    argv = ["txt2img", "--model", str(base_folder), "--high-noise-frac", "0.5", "--steps", "2", "--scheduler", "euler",
            "--out", str(out), "the dog"]
    status, stdout, err = run_cli(argv + ["--refiner", str(tmp_path / "refiner.safetensors")], capsys)
    assert status == 0 and out.is_file() and str(out) in stdout, err
    status, _, err = run_cli(["txt2img", "--model", str(folder), "--steps", "2", "--out", str(out), "the dog"], capsys)
    assert status == 2 and "this is the SDXL refiner" in err
    status, _, err = run_cli(argv + ["--refiner", str(base_folder)], capsys)
    assert status == 2 and "is not an SDXL refiner" in err
