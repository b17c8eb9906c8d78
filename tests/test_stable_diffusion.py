"""Stable Diffusion (stable_diffusion.py, pretrained/compvis.py) against diffusers' pipelines.

Tiny random components (U-Net with cross-attention, AutoencoderKL, CLIP text model, a CLIP BPE
tokenizer written to disk) are saved as a diffusers StableDiffusionPipeline folder; our txt2img from
the same initial latents must equal diffusers' output (images in [0, 1]) to ≤ 1e-3 for DDIM, PNDM,
Euler and DPM-Solver++, with a negative prompt; img2img from the same image equals diffusers' Img2Img pipeline
for every scheduler (the multistep ones restarted mid-grid; the VAE's posterior a point mass, ``sharp_posterior``). The same folder written as a single-file CompVis checkpoint — its layout checked by
diffusers' own CompVis→diffusers converters — loads to identical params. Plus: compile once for
new prompts and guidance scales, seed determinism, sharding over 8 simulated devices, errors.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import save_file  # noqa: E402

from ddpm_jax.pipelines.stable_diffusion import (StableDiffusion, preprocess_image, read_image,  # noqa: E402
                                                 strength_start)

from _sd_fixtures import (UNET_V1, check_with_diffusers, inject_step_noise, pipe, sd, smooth_image,  # noqa: E402,F401
                          to_single_file, write_sd_folder)  # (pipe, sd: module fixtures)
from _training_fixtures import subprocess_env  # noqa: E402

pytestmark = pytest.mark.fast_compile  # compile-bound: tiny programs, a few calls each (tests/conftest.py)

SIZE = 32  # image side; the tiny VAE has f = 2 → 16×16×4 latents
PROMPTS = ["a cat on the dog", "the dog"]
NEGATIVE = ["the cat", ""]
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                 steps_offset=1, set_alpha_to_one=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_sd_folder(tmp_path_factory.mktemp("sd"), UNET_V1, diffusers.PNDMScheduler(**SCHEDULER), sharp_vae=True)


@pytest.fixture(scope="module")
def by_scheduler(sd):
    """One pipeline per scheduler, shared by the tests so that their compiled programs are reused."""
    cache = {}
    return lambda name: cache.setdefault(name, sd.with_scheduler(name))


def folder_scheduler_config():
    """The folder's scheduler config as read from its json (not ``pipe.scheduler.config``, which holds the options
    of the last test's scheduler, e.g. use_karras_sigmas; nor ``_use_default_values``, which would give another
    class its own default spacing)."""
    return {k: v for k, v in diffusers.PNDMScheduler(**SCHEDULER).config.items() if k != "_use_default_values"}


def _latents(batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, SIZE // 2, SIZE // 2, 4)).astype(np.float32)  # NHWC


SCHEDULERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
              "dpmsolver++": "DPMSolverMultistepScheduler", "heun": "HeunDiscreteScheduler"}
# img2img from an image: the SD schedulers, the stochastic ones, and Heun (two grid points per step: start t_start · 2)
ALL_SCHEDULERS = {k: SCHEDULERS[k] for k in ("ddim", "pndm", "euler", "dpmsolver++", "heun")} | {
    "euler_ancestral": "EulerAncestralDiscreteScheduler", "ddpm": "DDPMScheduler"}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_txt2img_equals_diffusers_pipeline(by_scheduler, pipe, name):
    """Same latents, same prompts and negative prompts → the same images to ≤ 1e-3, for each scheduler (Heun: its
    2N − 1 model calls on the interleaved grid; UniPC and the Karras grids are checked whole-loop, from mid-grid
    and step by step in tests/test_schedulers.py, which keeps this module's compile time down)."""
    karras = {"use_karras_sigmas": True} if name.endswith("_karras") else {}
    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config({**folder_scheduler_config(), **karras})
    latents = _latents()
    with torch.no_grad():
        expected = pipe(PROMPTS, negative_prompt=NEGATIVE, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                        num_inference_steps=6, guidance_scale=5.0, height=SIZE, width=SIZE, output_type="np").images
    ours = by_scheduler(name).txt2img(PROMPTS, NEGATIVE, guidance_scale=5.0, num_steps=6, height=SIZE, width=SIZE,
                                      latents=latents)
    images = (ours["images"] + 1) / 2
    assert images.shape == expected.shape == (2, SIZE, SIZE, 3)
    assert expected.std() > 0.05  # not a degenerate (saturated or constant) image
    np.testing.assert_allclose(images, expected, atol=1e-3, rtol=0)


# the stochastic solvers: ours by name -> diffusers' class, its config changes, the module whose randn_tensor draws z
STOCHASTIC = {"ddpm": ("DDPMScheduler", {}, "scheduling_ddpm"),
              "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}, "scheduling_euler_ancestral_discrete"),
              "sde-dpmsolver++_karras": ("DPMSolverMultistepScheduler",
                                         {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
                                         "scheduling_dpmsolver_multistep")}


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_txt2img_stochastic_equals_diffusers_pipeline(by_scheduler, pipe, monkeypatch, name):
    """The solvers that draw fresh noise z at every step: "ddpm" (respaced Algorithm 2), Euler-ancestral and
    "DPM++ 2M SDE Karras": diffusers' StableDiffusionPipeline with that scheduler, the same latents and our
    per-step noise (image b, step i: fold_in(split(key(seed + b))[1], i)) fed to its randn_tensor in order."""
    import importlib

    class_name, changes, module = STOCHASTIC[name]
    pipe.scheduler = getattr(diffusers, class_name).from_config({**folder_scheduler_config(), **changes})
    latents, seed, steps = _latents(), 3, 6
    noise = inject_step_noise(monkeypatch, importlib.import_module(f"diffusers.schedulers.{module}"), seed,
                              latents.shape, range(steps))
    with torch.no_grad():
        expected = pipe(PROMPTS, negative_prompt=NEGATIVE, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                        num_inference_steps=steps, guidance_scale=5.0, height=SIZE, width=SIZE, output_type="np").images
    assert next(noise, None) is None  # diffusers drew every step's noise from ours
    ours = by_scheduler(name).txt2img(PROMPTS, NEGATIVE, guidance_scale=5.0, num_steps=steps, height=SIZE,
                                      width=SIZE, latents=latents, seed=seed)
    assert expected.std() > 0.05
    np.testing.assert_allclose((ours["images"] + 1) / 2, expected, atol=1e-3, rtol=0)


@pytest.fixture(scope="module")
def img2img_pipe(folder):
    return diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None,
                                                                    requires_safety_checker=False)


@pytest.mark.parametrize("name", list(ALL_SCHEDULERS))
def test_img2img_from_an_image_equals_diffusers_pipeline(by_scheduler, img2img_pipe, name, monkeypatch):
    """SDEdit from the same PIL images (preprocessing, VAE encoding, noising to grid point N − ⌊strength·N⌋, the
    rest of the grid) equals diffusers' StableDiffusionImg2ImgPipeline for every scheduler: PNDM's warm-up and
    DPM-Solver++'s first-order step restart at the start point (diffusers' set_begin_index). The same ε is given to
    both (ours: ``noise=``; diffusers': its randn_tensor), the ancestral steps get our step noise, and q(z|x) is a
    point mass (``sharp_posterior``), so the encoder's draw changes nothing."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_module
    from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete

    img2img_pipe.scheduler = getattr(diffusers, ALL_SCHEDULERS[name]).from_config(img2img_pipe.scheduler.config)
    images, seed, steps, strength = [smooth_image(SIZE, SIZE, k) for k in range(2)], 5, 5, 0.6
    noise = _latents(seed=1)
    monkeypatch.setattr(img2img_module, "randn_tensor", lambda shape, **kw: torch.from_numpy(noise.transpose(0, 3, 1, 2)))
    grid = range(strength_start(steps, strength), len(by_scheduler(name).grid(steps)))   # the steps run (grid indices)
    for module in (scheduling_ddpm, scheduling_euler_ancestral_discrete):
        inject_step_noise(monkeypatch, module, seed, noise.shape, grid)
    with torch.no_grad():
        expected = img2img_pipe(PROMPTS, image=images, strength=strength, num_inference_steps=steps,
                                guidance_scale=4.0, negative_prompt=NEGATIVE, output_type="np").images
    pixels = np.concatenate([preprocess_image(im, multiple=2) for im in images])          # [2, 32, 32, 3]
    ours = by_scheduler(name).img2img(pixels, PROMPTS, strength=strength, negative_prompts=NEGATIVE,
                                      guidance_scale=4.0, num_steps=steps, seed=seed, noise=noise)
    assert expected.std() > 0.05
    np.testing.assert_allclose((ours["images"] + 1) / 2, expected, atol=1e-3, rtol=0)


def test_image_preprocessing_equals_diffusers(tmp_path):
    """preprocess_image = VaeImageProcessor.preprocess (Lanczos resize to height × width, or the size rounded down
    to the VAE's multiple; [0, 255] → [−1, 1]), and its grayscale form = the inpainting mask processor before
    binarising; a PNG read by read_image is the same array."""
    from diffusers.image_processor import VaeImageProcessor

    im = smooth_image(37, 43, 3)
    image_processor, mask_processor = VaeImageProcessor(vae_scale_factor=8), VaeImageProcessor(
        vae_scale_factor=8, do_normalize=False, do_convert_grayscale=True)
    for size in ({}, {"height": 24, "width": 48}):
        expected = image_processor.preprocess(im, **size).numpy().transpose(0, 2, 3, 1)
        ours = preprocess_image(im, **size)
        assert ours.shape == expected.shape == ((1, 32, 40, 3) if not size else (1, 24, 48, 3))
        np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)
        expected = mask_processor.preprocess(im, **size).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(preprocess_image(im, grayscale=True, **size), expected, atol=1e-6, rtol=0)
    im.save(tmp_path / "im.png")
    np.testing.assert_array_equal(read_image(tmp_path / "im.png"), preprocess_image(im))


def test_one_program_for_new_prompts_and_guidance_seed_determinism(by_scheduler):
    model = by_scheduler("euler_ancestral")
    before = model.trace_count  # the shared pipeline may have compiled img2img's program already
    a = model.txt2img(["a cat"], num_steps=3, height=SIZE, width=SIZE, seed=3)
    assert model.trace_count == before + 1
    b = model.txt2img(["the dog"], ["cat"], guidance_scale=2.0, num_steps=3, height=SIZE, width=SIZE, seed=3)
    c = model.txt2img(["a cat"], num_steps=3, height=SIZE, width=SIZE, seed=3)
    assert model.trace_count == before + 1  # prompts, negative prompts and w are traced arguments
    np.testing.assert_array_equal(a["images"], c["images"])  # seed → identical images
    assert np.abs(a["images"] - b["images"]).max() > 1e-3
    d = model.txt2img(["a cat"], num_steps=3, height=SIZE, width=SIZE, seed=4)
    assert np.abs(a["images"] - d["images"]).max() > 1e-3


def test_a_seed_is_one_image_whatever_the_batch(by_scheduler):
    """Image b of a call with seed s is the image of seed s + b alone (z_T and the ancestral steps' noise per image:
    image_keys), so a PNG's recorded seed re-makes it in a batch of any size."""
    model = by_scheduler("euler_ancestral")
    batch = model.txt2img(["a cat", "the dog", "a cat"], num_steps=3, height=SIZE, width=SIZE, seed=5)["images"]
    alone = model.txt2img(["the dog"], num_steps=3, height=SIZE, width=SIZE, seed=6)["images"]
    np.testing.assert_allclose(alone[0], batch[1], atol=1e-5, rtol=0)   # float rounding of the batched U-Net only
    assert np.abs(batch[0] - batch[2]).max() > 1e-2                     # same prompt, seeds 5 and 7: other images


def test_latents_and_attention_maps(by_scheduler):
    out = by_scheduler("ddim").txt2img(["a cat"], num_steps=3, height=SIZE, width=SIZE, return_latents=True,
                                           return_attention=True)
    assert out["trajectory"].shape == (3, 1, SIZE // 2, SIZE // 2, 4)
    np.testing.assert_array_equal(out["trajectory"][-1], out["latents"])
    maps = out["attention"]
    assert maps.shape == (1, SIZE // 2, SIZE // 2, 77)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-4)  # a distribution over the tokens at each pixel
    assert out["tokens"][0] == ["<start>", "a", "cat", "<end>"]


def test_compvis_single_file_loads_to_identical_params(sd, folder, tmp_path):
    state = to_single_file(folder, "sd_v1")  # (more layouts: tests/test_single_file.py)
    check_with_diffusers(state, folder, "sd_v1")  # the file's layout is the one diffusers' converters read

    path = tmp_path / "tiny-v1.safetensors"
    save_file(state, path)
    single = StableDiffusion.from_pretrained(path, config_folder=folder)
    flat_a, flat_b = jax.tree.leaves_with_path(single.params), jax.tree.leaves_with_path(sd.params)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (p, a), (_, b) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(p))

    # a key too many and one missing: both listed
    del state["model.diffusion_model.out.2.bias"]
    state["model.diffusion_model.extra.weight"] = np.zeros(2, np.float32)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"(?s)missing.*conv_out/bias.*unexpected.*extra\.weight"):
        StableDiffusion.from_pretrained(tmp_path / "bad.safetensors", config_folder=folder)
    with pytest.raises(ValueError, match="without a tokenizer"):
        StableDiffusion.from_pretrained(path)


@pytest.mark.full_optimization  # bf16 arithmetic runs emulated on the CPU: unoptimised it is slower than its compile
def test_fp16_variant_and_bf16(folder, tmp_path, by_scheduler):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    for sub, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        from safetensors.numpy import load_file

        state = load_file(copy / sub / f"{stem}.safetensors")
        save_file({k: v.astype(np.float16) for k, v in state.items()}, copy / sub / f"{stem}.fp16.safetensors")
        (copy / sub / f"{stem}.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no (model|diffusion_pytorch_model)\.safetensors"):
        StableDiffusion.from_pretrained(copy)
    half = StableDiffusion.from_pretrained(copy, variant="fp16", dtype="bf16")
    assert {a.dtype for a in jax.tree.leaves(half.params)} == {jnp.dtype(jnp.bfloat16)}
    a = half.with_scheduler("ddim").txt2img(PROMPTS, NEGATIVE, guidance_scale=5.0, num_steps=6, height=SIZE,
                                            width=SIZE, latents=_latents())
    b = by_scheduler("ddim").txt2img(PROMPTS, NEGATIVE, guidance_scale=5.0, num_steps=6, height=SIZE, width=SIZE,
                                     latents=_latents())  # the parity test's program
    other = by_scheduler("ddim").txt2img(PROMPTS, NEGATIVE, guidance_scale=5.0, num_steps=6, height=SIZE, width=SIZE,
                                         latents=_latents(seed=5))  # other noise: how far unrelated images are
    error, unrelated = np.abs(a["images"] - b["images"]).mean(), np.abs(other["images"] - b["images"]).mean()
    assert error < 0.15 and error < 0.5 * unrelated, (error, unrelated)  # bf16 (8-bit mantissa): close, not equal


def test_bin_weights_are_read_without_torch(folder, tmp_path):
    """A diffusers folder saved as PyTorch pickles (.bin) loads through torch_pickle to the same params."""
    import shutil

    from safetensors.numpy import load_file

    from ddpm_jax.pretrained.diffusers import load_unet

    shutil.copytree(folder / "unet", tmp_path / "unet")
    state = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "unet" / "diffusion_pytorch_model.bin")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    _, from_bin = load_unet(tmp_path / "unet")
    _, from_safetensors = load_unet(folder / "unet")
    for a, b in zip(jax.tree.leaves(from_bin), jax.tree.leaves(from_safetensors)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_errors(sd, folder, tmp_path):
    with pytest.raises(ValueError, match="multiples of 2"):
        sd.txt2img("a cat", height=33, width=SIZE)
    with pytest.raises(ValueError, match="multiples of 4 for this U-Net"):
        sd.txt2img("a cat", height=34, width=SIZE)
    with pytest.raises(ValueError, match="unknown scheduler 'lms'"):
        StableDiffusion.from_pretrained(folder, scheduler="lms")
    with pytest.raises(ValueError, match="float16 weights need a GPU"):
        StableDiffusion.from_pretrained(folder, dtype="fp16")
    with pytest.raises(ValueError, match="2 prompts but 3 negative prompts"):
        sd.txt2img(PROMPTS, ["a", "b", "c"], height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="prompts_2 / negative_prompts_2 are for SDXL base's second text encoder; "
                                         r"this model has one text encoder \(SD v1/2.x\)"):
        sd.txt2img(PROMPTS, prompts_2="a dog", height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="their negative_\\* are SDXL's micro-conditioning"):
        sd.txt2img(PROMPTS, negative_original_size=(16, 16), height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="latents must have shape"):
        sd.txt2img(PROMPTS, height=SIZE, width=SIZE, latents=np.zeros((1, 16, 16, 4)))
    for strength in (1.5, 0.0, -0.2):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            sd.img2img(np.zeros((1, SIZE, SIZE, 3)), "a cat", strength=strength)  # before compiling
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for name in ("model_index.json", "unet", "vae", "tokenizer", "scheduler"):
        os.symlink(folder / name, incomplete / name)
    with pytest.raises(FileNotFoundError, match="missing text_encoder/"):
        StableDiffusion.from_pretrained(incomplete)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StableDiffusion.from_pretrained(tmp_path / "nowhere")


def test_hub_id_without_network_says_pass_a_local_folder(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="pass the local folder"):
        StableDiffusion.from_pretrained("some-org/some-model-that-is-not-here")


@pytest.mark.slow
@pytest.mark.full_optimization  # 8-device programs in a subprocess: execution-bound
def test_sharded_over_8_devices_equals_one_device(folder):
    """The batch split over 8 simulated CPU devices gives the single-device images (a fresh process)."""
    code = textwrap.dedent(f"""
        import numpy as np, jax
        from ddpm_jax.pipelines.stable_diffusion import StableDiffusion
        from ddpm_jax import parallel
        assert jax.device_count() == 8
        many = StableDiffusion.from_pretrained({str(folder)!r}, scheduler="ddim")
        one = StableDiffusion.from_pretrained({str(folder)!r}, scheduler="ddim", mesh=parallel.make_mesh(jax.devices()[:1]))
        prompts = ["a cat", "the dog"] * 4
        a = many.txt2img(prompts, num_steps=3, height={SIZE}, width={SIZE}, seed=1)["images"]
        b = one.txt2img(prompts, num_steps=3, height={SIZE}, width={SIZE}, seed=1)["images"]
        np.testing.assert_allclose(a, b, atol=1e-4)  # float rounding of per-device batch sizes (seen: 2e-5)
        print("OK", np.abs(a - b).max())
    """)
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_cli_txt2img_and_img2img(folder, tmp_path, capsys):
    from PIL import Image

    from ddpm_jax import cli

    out = tmp_path / "out.png"
    assert cli.main(["txt2img", "--model", str(folder), "a cat", "the dog", "--steps", "2", "--height", str(SIZE),
                     "--width", str(SIZE), "--negative", "blurry", "--scheduler", "euler", "--out", str(out),
                     "--attention-maps"]) == 0
    assert out.is_file() and (tmp_path / "out_attention_1.png").is_file()
    with Image.open(out) as im:
        assert im.size[1] >= SIZE
    edited = tmp_path / "edited.png"
    Image.fromarray(np.full((SIZE, SIZE, 3), 128, np.uint8)).save(tmp_path / "in.png")
    assert cli.main(["img2img", "--model", str(folder), "--image", str(tmp_path / "in.png"), "a cat",
                     "--strength", "0.5", "--steps", "4", "--out", str(edited)]) == 0
    assert edited.is_file()
    with pytest.raises(SystemExit):
        cli.main(["txt2img", "--model", str(folder), "--workdir", str(tmp_path), "a cat"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["txt2img", "--model", str(folder), "a cat", "--height", "31", "--out", str(out)])
    assert info.value.code == 2 and "multiples of 2" in capsys.readouterr().err


def test_cli_each_png_records_its_generation_and_from_png_remakes_it(folder, tmp_path, capsys):
    """--num-images-per-prompt: one PNG per image whose text chunks say how it was made (seed + k for image k);
    --from-png re-runs image 3's record alone (a batch of 1) and gives the same pixels; bad records: one line."""
    from PIL import Image

    from _cli import run_cli

    out = tmp_path / "t.png"
    status, _, err = run_cli(["txt2img", "--model", str(folder), "a cat", "the dog", "--num-images-per-prompt", "2",
                              "--steps", "2", "--height", str(SIZE), "--width", str(SIZE), "--negative", "blurry",
                              "--scheduler", "euler_ancestral", "--seed", "10", "--out", str(out)], capsys)
    assert status == 0, err
    with Image.open(tmp_path / "t_3.png") as im:
        text, pixels = dict(im.text), np.asarray(im, np.int16)
    assert {k: text[k] for k in ("prompt", "negative_prompt", "seed", "steps", "scheduler", "width", "model")} == {
        "prompt": "the dog", "negative_prompt": "blurry", "seed": "13", "steps": "2", "scheduler": "euler_ancestral",
        "width": str(SIZE), "model": str(folder)}
    assert text["parameters"] == ("the dog\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 7.5, "
                                  f"Seed: 13, Size: {SIZE}x{SIZE}, Model: {folder.name}")
    status, _, err = run_cli(["txt2img", "--from-png", str(tmp_path / "t_3.png"), "--out", str(tmp_path / "a.png")],
                             capsys)
    assert status == 0, err
    with Image.open(tmp_path / "a_0.png") as im:
        assert np.abs(np.asarray(im, np.int16) - pixels).max() <= 1  # the same image (≤ 1e-5 before rounding)
        assert im.text["seed"] == "13" and im.text["prompt"] == "the dog"
    for argv, message in [(["--from-png", str(out)], "holds no ddpm_jax generation record"),   # the grid has none
                          (["a cat", "--model", str(folder), "--num-images-per-prompt", "0"], "positive integer"),
                          (["--model", str(folder)], "at least one PROMPT"), (["a cat"], "give --model")]:
        status, _, err = run_cli(["txt2img", *argv, "--out", str(tmp_path / "x.png")], capsys)
        errors = [line for line in err.splitlines() if not line.startswith("loading ")]
        assert status == 2 and errors == [f"ddpm-jax: error: {errors[0].split('error: ', 1)[1]}"] and message in err, err
