"""Stable Diffusion (stable_diffusion.py, pretrained/compvis.py) against diffusers' pipelines.

Tiny random components (U-Net with cross-attention, AutoencoderKL, CLIP text model, a CLIP BPE
tokenizer written to disk) are saved as a diffusers StableDiffusionPipeline folder; our txt2img from
the same initial latents must equal diffusers' output (images in [0, 1]) to ≤ 1e-3 for DDIM, PNDM,
Euler and DPM-Solver++, with a negative prompt; img2img equals diffusers' Img2Img pipeline (DDIM,
Euler). The same folder written as a single-file CompVis checkpoint — its layout checked by
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

from ddpm_jax.pipelines.stable_diffusion import StableDiffusion  # noqa: E402

from _sd_fixtures import UNET_V1, check_with_diffusers, pipe, sd, to_single_file, write_sd_folder  # noqa: E402,F401 (module fixtures)
from _training_fixtures import subprocess_env  # noqa: E402

pytestmark = pytest.mark.fast_compile  # compile-bound: tiny programs, a few calls each (tests/conftest.py)

SIZE = 32  # image side; the tiny VAE has f = 2 → 16×16×4 latents
PROMPTS = ["a cat on the dog", "the dog"]
NEGATIVE = ["the cat", ""]
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                 steps_offset=1, set_alpha_to_one=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_sd_folder(tmp_path_factory.mktemp("sd"), UNET_V1, diffusers.PNDMScheduler(**SCHEDULER))


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
    per-step noise (step i: fold_in(split(key(seed))[1], i)) fed to its randn_tensor in order."""
    import importlib

    class_name, changes, module = STOCHASTIC[name]
    pipe.scheduler = getattr(diffusers, class_name).from_config({**folder_scheduler_config(), **changes})
    latents, seed, steps = _latents(), 3, 6
    key_steps = jax.random.split(jax.random.key(seed))[1]
    noise = iter(np.asarray(jax.random.normal(jax.random.fold_in(key_steps, i), latents.shape)).transpose(0, 3, 1, 2)
                 for i in range(steps))
    monkeypatch.setattr(importlib.import_module(f"diffusers.schedulers.{module}"), "randn_tensor",
                        lambda shape, **kw: torch.from_numpy(next(noise)))
    with torch.no_grad():
        expected = pipe(PROMPTS, negative_prompt=NEGATIVE, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                        num_inference_steps=steps, guidance_scale=5.0, height=SIZE, width=SIZE, output_type="np").images
    assert next(noise, None) is None  # diffusers drew every step's noise from ours
    ours = by_scheduler(name).txt2img(PROMPTS, NEGATIVE, guidance_scale=5.0, num_steps=steps, height=SIZE,
                                      width=SIZE, latents=latents, seed=seed)
    assert expected.std() > 0.05
    np.testing.assert_allclose((ours["images"] + 1) / 2, expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", ["euler"])
def test_img2img_equals_diffusers_pipeline(by_scheduler, folder, name):
    """SDEdit from given latents and noise: diffusers' StableDiffusionImg2ImgPipeline (latents as `image`)."""
    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None,
                                                                    requires_safety_checker=False)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)
    init = _latents(seed=1)
    noise = torch.randn((2, 4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = pipe(PROMPTS, image=torch.from_numpy(init.transpose(0, 3, 1, 2)), strength=0.6,
                        num_inference_steps=10, guidance_scale=4.0, output_type="np",
                        generator=torch.Generator().manual_seed(7)).images
    ours = by_scheduler(name).img2img(None, PROMPTS, strength=0.6, guidance_scale=4.0, num_steps=10,
                                          init_latents=init, noise=noise.numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose((ours["images"] + 1) / 2, expected, atol=1e-3, rtol=0)


def test_one_program_for_new_prompts_and_guidance_seed_determinism(by_scheduler):
    model = by_scheduler("euler_ancestral")
    traces = model.trace_count  # the pipeline is shared: other tests may have compiled other shapes
    a = model.txt2img(["a cat"], num_steps=3, height=SIZE, width=SIZE, seed=3)
    assert model.trace_count == traces + 1
    b = model.txt2img(["the dog"], ["cat"], guidance_scale=2.0, num_steps=3, height=SIZE, width=SIZE, seed=3)
    c = model.txt2img(["a cat"], num_steps=3, height=SIZE, width=SIZE, seed=3)
    assert model.trace_count == traces + 1  # prompts, negative prompts and w are traced arguments
    np.testing.assert_array_equal(a["images"], c["images"])  # seed → identical images
    assert np.abs(a["images"] - b["images"]).max() > 1e-3
    d = model.txt2img(["a cat"], num_steps=3, height=SIZE, width=SIZE, seed=4)
    assert np.abs(a["images"] - d["images"]).max() > 1e-3


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
    with pytest.raises(ValueError, match="latents must have shape"):
        sd.txt2img(PROMPTS, height=SIZE, width=SIZE, latents=np.zeros((1, 16, 16, 4)))
    with pytest.raises(ValueError, match="img2img supports"):
        sd.img2img(np.zeros((1, SIZE, SIZE, 3)), "a cat")  # the folder's PNDM
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        sd.with_scheduler("ddim").img2img(np.zeros((1, SIZE, SIZE, 3)), "a cat", strength=1.5)  # before compiling
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
