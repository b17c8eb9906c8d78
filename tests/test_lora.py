"""LoRA (pretrained/lora.py, StableDiffusion.load_lora …) against diffusers' load_lora_weights.

Tiny random LoRAs are made with peft on the tiny random SD v1 and SDXL folders of tests/_sd_fixtures.py (a
LoraConfig with random non-zero B, init_lora_weights=False, on the attention projections, proj_in, the
feed-forward and a 3×3 resnet conv in the U-Net, and on q/k/v/out_proj and fc1 of each text encoder), saved with
diffusers' save_lora_weights (diffusers' PEFT format, α ≠ r in the file's lora_adapter_metadata) and renamed
here to the kohya format (lora_unet_* / lora_te_* / lora_te1_* / lora_te2_*, lora_down / lora_up, .alpha). Our
txt2img equals diffusers' StableDiffusion(XL)Pipeline with load_lora_weights + set_adapters (scales, two
adapters) and fuse_lora to ≤ 1e-3 from the same latents; new scales do not recompile; unload restores the
parameters bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from safetensors.torch import load_file as load_torch_file  # noqa: E402

from _sd_fixtures import SDXL_UNET, UNET_V1, write_sd_folder  # noqa: E402
from ddpm_jax.pretrained import compvis  # noqa: E402
from ddpm_jax.pipelines.stable_diffusion import StableDiffusion  # noqa: E402

pytestmark = pytest.mark.fast_compile  # compile-bound: tiny programs, a few calls each (tests/conftest.py)

SIZE = 32  # the tiny VAE has f = 2 → 16×16×4 latents
PROMPTS = ["a cat on the dog", "the dog"]
NEGATIVE = ["the cat", ""]
STEPS, GUIDANCE = 2, 5.0
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "conv1"]  # conv1: a 3×3 conv
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}  # SD v1's; SDXL: te1


def make_lora(folder, out, seed, sdxl=False, alpha=8):
    """A random LoRA over the folder's U-Net and text encoder(s) (rank 4 / 2, α = ``alpha`` / 2), saved by
    diffusers' save_lora_weights as out/lora.safetensors; returns (that file, {component: α})."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    parts = {"unet": (diffusers.UNet2DConditionModel, LoraConfig(r=4, lora_alpha=alpha, target_modules=UNET_TARGETS,
                                                                   init_lora_weights=False)),
             "text_encoder": (transformers.CLIPTextModel, LoraConfig(r=2, lora_alpha=2 * alpha / 4,
                                                                     target_modules=TEXT_TARGETS,
                                                                     init_lora_weights=False))}
    if sdxl:
        parts["text_encoder_2"] = (transformers.CLIPTextModelWithProjection,
                                   LoraConfig(r=2, lora_alpha=1, target_modules=TEXT_TARGETS, init_lora_weights=False))
    layers = {}
    for name, (cls, config) in parts.items():
        model = cls.from_pretrained(folder / name)
        peft.inject_adapter_in_model(config, model)
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(model)
        layers[f"{name}_lora_adapter_metadata"] = config.to_dict()
    pipeline = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
    pipeline.save_lora_weights(out, weight_name="lora.safetensors", **layers)
    return out / "lora.safetensors", {name: config.lora_alpha for name, (_, config) in parts.items()}


def sgm_name(module, unet_config):
    """A diffusers U-Net module name in the SGM blocks kohya's SDXL LoRAs use; None inside a ResNet."""
    for sgm, diffusers_prefix in compvis.unet_prefixes(unet_config).items():
        if (module + ".").startswith(diffusers_prefix):
            return None if ".resnets." in diffusers_prefix else (sgm + module[len(diffusers_prefix):]).rstrip(".")
    return module


def to_kohya(diffusers_file, alphas, out, sdxl_unet=None):
    """The same LoRA in the kohya / A1111 format: lora_unet_<module with _>.lora_down/lora_up.weight, .alpha; with
    ``sdxl_unet`` (a UNetConfig) kohya's SDXL file: lora_te1_/lora_te2_ and the U-Net in SGM block names (its
    ResNet layers left out)."""
    prefixes = dict(KOHYA, text_encoder="lora_te1_") if sdxl_unet else KOHYA
    state = {}
    for key, value in load_torch_file(diffusers_file).items():
        component, rest = key.split(".", 1)
        module, factor = rest.rsplit(".lora_", 1)
        if component == "unet" and sdxl_unet and (module := sgm_name(module, sdxl_unet)) is None:
            continue
        name = prefixes[component] + module.replace(".", "_")
        state[f"{name}.{'lora_down' if factor.startswith('A') else 'lora_up'}.weight"] = value.numpy()
        state[f"{name}.alpha"] = np.asarray(alphas[component], np.float32)
    save_file(state, out)
    return out


def _latents():
    return np.random.default_rng(0).standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)  # NHWC


def diffusers_images(pipe):
    with torch.no_grad():
        return pipe(PROMPTS, negative_prompt=NEGATIVE, latents=torch.from_numpy(_latents().transpose(0, 3, 1, 2)),
                    num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                    output_type="np").images


def our_images(sd):
    out = sd.txt2img(PROMPTS, NEGATIVE, guidance_scale=GUIDANCE, num_steps=STEPS, height=SIZE, width=SIZE,
                     latents=_latents())
    return (out["images"] + 1) / 2


def assert_close(ours, theirs, errors, label):
    errors[label] = float(np.abs(ours - theirs).max())
    print(f"{label}: max |ours - diffusers| = {errors[label]:.2e}")
    assert theirs.std() > 0.05
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)


def assert_same_params(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    """(folder, our pipeline (DDIM), a diffusers-format LoRA, a second LoRA in the kohya format)."""
    root = tmp_path_factory.mktemp("sd_lora")
    folder = write_sd_folder(root, UNET_V1, diffusers.DDIMScheduler(**SCHEDULER, clip_sample=False))
    first, _ = make_lora(folder, root / "a", seed=0)
    second = to_kohya(*make_lora(folder, root / "b", seed=1, alpha=2), root / "b_kohya.safetensors")
    return folder, StableDiffusion.from_pretrained(folder), first, second


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_lora")
    folder = write_sd_folder(root, SDXL_UNET, diffusers.EulerDiscreteScheduler(**SCHEDULER), sdxl=True)
    lora_file, alphas = make_lora(folder, root / "a", seed=2, sdxl=True)
    sd = StableDiffusion.from_pretrained(folder)
    return folder, sd, lora_file, to_kohya(lora_file, alphas, root / "k.safetensors", sdxl_unet=sd.unet.config)


def test_sd_v1_lora_scales_fuse_unload_equal_diffusers(v1):
    """Diffusers format: scale 1 and 0.5 (set_adapters) on the fly, then fused; no recompilation for a new scale or
    the fused weights; unload gives the original parameters back bit for bit and the original images."""
    folder, sd, first, _ = v1
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    original, errors = sd.params, {}
    base = our_images(sd)
    assert sd.load_lora(first, name="a") == "a" and sd.lora_scales == {"a": 1.0}
    pipe.load_lora_weights(first.parent, weight_name=first.name, adapter_name="a")
    with_lora = our_images(sd)
    assert np.abs(with_lora - base).max() > 0.05  # the LoRA changes the images
    assert_close(with_lora, diffusers_images(pipe), errors, "scale 1")
    traces = sd.trace_count
    sd.set_lora_scales(0.5)
    pipe.set_adapters(["a"], adapter_weights=[0.5])
    assert_close(our_images(sd), diffusers_images(pipe), errors, "scale 0.5")
    assert sd.trace_count == traces  # the scale is a traced argument
    sd.fuse_lora()
    pipe.fuse_lora(components=["unet", "text_encoder"])
    assert_close(our_images(sd), diffusers_images(pipe), errors, "fused at 0.5")
    assert sd.trace_count == traces  # the fused program is the LoRA-free one, compiled first
    sd.unload_lora()
    assert sd.params is original and sd.lora_scales == {}
    assert_same_params(sd.text.params, original["text_encoder"])
    np.testing.assert_array_equal(our_images(sd), base)


def test_sd_v1_two_loras_diffusers_and_kohya_formats_equal_diffusers(v1):
    """A diffusers-format and a kohya-format LoRA at once, each at its own scale (set_adapters), then one unloaded."""
    folder, sd, first, second = v1
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    original, errors = jax.tree.map(np.asarray, sd.params), {}
    sd.load_lora(first, scale=0.7, name="a")
    sd.load_lora(second, scale=0.8, name="b")
    pipe.load_lora_weights(first.parent, weight_name=first.name, adapter_name="a")
    pipe.load_lora_weights(second.parent, weight_name=second.name, adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.8])
    assert_close(our_images(sd), diffusers_images(pipe), errors, "a 0.7 + b (kohya) 0.8")
    traces = sd.trace_count
    sd.set_lora_scales({"a": -0.3, "b": 1.2})
    pipe.set_adapters(["a", "b"], adapter_weights=[-0.3, 1.2])
    assert_close(our_images(sd), diffusers_images(pipe), errors, "a -0.3 + b 1.2")
    assert sd.trace_count == traces
    sd.unload_lora("a")
    pipe.delete_adapters("a")
    pipe.set_adapters(["b"], adapter_weights=[1.2])
    assert_close(our_images(sd), diffusers_images(pipe), errors, "b 1.2 alone")
    sd.unload_lora()
    assert_same_params(sd.params, original)


def test_sdxl_lora_both_formats_and_fused_equal_diffusers(xl):
    """SDXL: U-Net, text_encoder and text_encoder_2 LoRAs, diffusers' format at 0.6 and kohya's SDXL one (lora_te1_,
    lora_te2_, the U-Net in SGM block names) fused at 1, against StableDiffusionXLPipeline; unload restores the
    parameters exactly."""
    folder, sd, lora_file, kohya_file = xl
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    original, errors = sd.params, {}
    base = our_images(sd)
    sd.load_lora(lora_file, scale=0.6)
    pipe.load_lora_weights(lora_file.parent, weight_name=lora_file.name, adapter_name="a")
    pipe.set_adapters(["a"], adapter_weights=[0.6])
    ours = our_images(sd)
    assert np.abs(ours - base).max() > 0.05
    assert_close(ours, diffusers_images(pipe), errors, "SDXL diffusers format 0.6")
    factors = sd.loras.loras["lora"].factors  # the name defaults to the file's stem
    assert set(factors) == {"unet", "text_encoder", "text_encoder_2"} and min(map(len, factors.values())) >= 10
    sd.unload_lora()
    assert sd.params is original
    pipe.delete_adapters("a")
    sd.load_lora(kohya_file, name="k")
    sd.fuse_lora()
    pipe.load_lora_weights(kohya_file.parent, weight_name=kohya_file.name, adapter_name="k")
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"])
    assert any(k.startswith("lora_unet_input_blocks_") for k in load_torch_file(kohya_file))
    fused = our_images(sd)
    assert np.abs(fused - base).max() > 0.05
    assert_close(fused, diffusers_images(pipe), errors, "SDXL kohya format (SGM names) fused")
    sd.unload_lora()
    assert sd.params is original
    assert_same_params(sd.text_2.params, original["text_encoder_2"])
    np.testing.assert_array_equal(our_images(sd), base)


def test_lora_bad_inputs_are_one_clear_error(v1, xl, tmp_path):
    """Keys that match nothing (count + a few), an SDXL LoRA on SD v1, wrong shapes, a missing factor, LyCORIS,
    a duplicate name, an unknown scale name."""
    _, sd, first, second = v1
    _, _, xl_lora, xl_kohya = xl
    unknown = tmp_path / "unknown.safetensors"
    save_file({"lora_unet_nowhere_to_q.lora_down.weight": np.zeros((4, 32), np.float32),
               "lora_unet_nowhere_to_q.lora_up.weight": np.zeros((32, 4), np.float32),
               "something.else": np.zeros(1, np.float32)}, unknown)
    with pytest.raises(ValueError, match=r"^LoRA unknown.safetensors: 3 keys match no layer of this pipeline, e.g. "):
        sd.load_lora(unknown)
    for sdxl_lora in (xl_lora, xl_kohya):
        with pytest.raises(ValueError, match="adapts text_encoder_2, which this pipeline does not have .* SDXL LoRA"):
            sd.load_lora(sdxl_lora)
    state = {k: v for k, v in load_torch_file(second).items()}
    name = next(k for k in state if k.startswith("lora_unet_") and k.endswith("to_k.lora_down.weight"))
    state[name] = torch.zeros((4, 48))
    save_file({k: v.numpy() for k, v in state.items()}, tmp_path / "shapes.safetensors")
    with pytest.raises(ValueError, match=r"does not fit this model \(1 layers of another shape, e.g. unet\..*to_k gives "
                                         r"\(48, 32\), the model's kernel is \(32, 32\)\): a LoRA for another"):
        sd.load_lora(tmp_path / "shapes.safetensors")
    del state[name]
    save_file({k: v.numpy() for k, v in state.items()}, tmp_path / "half.safetensors")
    with pytest.raises(ValueError, match="to_k has alpha/up but not both factors"):
        sd.load_lora(tmp_path / "half.safetensors")
    save_file({"lora_unet_x.hada_w1_a": np.zeros((2, 2), np.float32)}, tmp_path / "loha.safetensors")
    with pytest.raises(ValueError, match="LyCORIS/DoRA variant"):
        sd.load_lora(tmp_path / "loha.safetensors")
    sd.load_lora(first, name="a")
    try:
        with pytest.raises(ValueError, match="a LoRA named 'a' is loaded already"):
            sd.load_lora(first, name="a")
        with pytest.raises(ValueError, match="no LoRA named 'z'; loaded: a"):
            sd.set_lora_scales({"z": 1.0})
    finally:
        sd.unload_lora()
    assert sd.loras.loras == {}


def test_cli_lora_option(v1, capsys):
    """``--lora FILE[:SCALE]``, repeatable, loads each LoRA into the pipeline (the generation itself is the tests'
    above and test_stable_diffusion's CLI test); a bad scale and --lora with --workdir are one clear error each."""
    from ddpm_jax import cli

    folder, _, first, second = v1
    args = cli.build_parser().parse_args(["txt2img", "--model", str(folder), "a cat", "--lora", f"{first}:0.8",
                                          "--lora", str(second)])
    assert args.lora == [(str(first), 0.8), (str(second), 1.0)]
    assert cli.load_stable_diffusion(args).lora_scales == {"lora": 0.8, "b_kohya": 1.0}
    with pytest.raises(SystemExit) as info:
        cli.main(["txt2img", "--model", str(folder), "a cat", "--lora", f"{first}:strong"])
    assert info.value.code == 2 and "expected FILE[:SCALE] with SCALE a number" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["txt2img", "--workdir", str(folder), "a cat", "--lora", str(first)])
    assert info.value.code == 2 and "--lora applies to Stable Diffusion weights" in capsys.readouterr().err
