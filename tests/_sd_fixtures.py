"""Tiny random diffusers/transformers components shared by the Stable Diffusion tests (not a test file)."""

from __future__ import annotations

import json

import pytest
import torch

from ddpm_jax import tokenizer as tok_lib

SIZE = 32  # image side of the tiny pipelines: the tiny VAE has f = 2 → 16×16×4 latents
PROMPTS = ["a cat on the dog", "the dog"]
NEGATIVE = ["the cat", ""]
MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "o n</w>", "d o", "do g</w>"]
# The tiny SD v1 U-Net (16×16×4 latents; attention at the first level, 1×1-conv projections); SDXL's: SDXL_UNET below.
UNET_V1 = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=32, attention_head_dim=2, norm_num_groups=16)
VAE = dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=16, layers_per_block=1,
           sample_size=32)
# A tiny SDXL base U-Net (SDXL's layout: no attention at the first level, linear projections; context 32 + 32 = 64
# wide; added conditioning: pooled embedding [B, 32] + six time ids × 8 sinusoidal features) and SDXL base's Euler.
SDXL_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1), use_linear_projection=True,
                 norm_num_groups=16, cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=32 + 6 * 8)
# The refiner's: context τ₂(y) alone (32 wide), five time ids (the aesthetic score in place of the target size).
REFINER_UNET = SDXL_UNET | dict(cross_attention_dim=32, projection_class_embeddings_input_dim=32 + 5 * 8)
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                      timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False)


def perturb(model, seed):
    """Random weights on their own scale (diffusers zero-initialises some output layers)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (p.std() if p.ndim > 1 and p.numel() > 1 and p.std() > 0 else 0.05))
    return model.eval()


def write_tokenizer(path):
    """A CLIP BPE tokenizer (vocab.json, merges.txt) over the bytes and MERGES; returns the vocabulary size."""
    byte_tokens = list(tok_lib.bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    path.mkdir(parents=True)
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n", encoding="utf-8")
    return len(tokens)


def copy_bpe_files(tok, folder):
    """transformers v5 writes tokenizer.json only; SD folders have vocab.json and merges.txt too."""
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((tok / name).read_bytes())


def sharp_posterior(vae):
    """Makes the VAE's posterior q(z|x) a point mass to far below the tests' 1e-3: the log-variance half of quant_conv
    is set to the constant −30 (σ = e^−15 ≈ 3e−7), so a sample of q(z|x) is its mean whatever noise either library
    draws, and "from the same image" comparisons are exact without sharing torch's generator."""
    import torch

    half = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[half:] = 0.0
        vae.quant_conv.bias[half:] = -30.0
    return vae


def write_sd_folder(root, unet, scheduler, pad_token=None, hidden_act="quick_gelu", sdxl=False, refiner=False,
                    vae=None, width_2=32, sharp_vae=False, inpainting=False):
    """A tiny random StableDiffusionPipeline folder under ``root``: U-Net config ``unet``, the VAE above, a
    2-layer CLIP text model, the BPE tokenizer (padding with ``pad_token``, else end-of-text) and ``scheduler``
    (a diffusers scheduler object). With ``sdxl`` a StableDiffusionXLPipeline folder: SDXL's VAE scale 0.13025,
    and text_encoder_2 a CLIPTextModelWithProjection (GELU, projection 32; OpenCLIP ViT-bigG's layout) with
    tokenizer_2 padding with "!", as SDXL's. With ``refiner`` the SDXL refiner's StableDiffusionXLImg2ImgPipeline
    folder: text_encoder_2 alone (the same weights as the base's, as in SDXL 1.0), requires_aesthetics_score,
    force_zeros_for_empty_prompt false (as stabilityai/stable-diffusion-xl-refiner-1.0). ``vae``: AutoencoderKL
    arguments instead of VAE's; ``width_2``: text_encoder_2's hidden size; ``sharp_vae``: a point-mass posterior
    (``sharp_posterior``); ``inpainting``: a StableDiffusionInpaintPipeline folder (give a 9-channel ``unet``).
    Returns the folder."""
    import diffusers
    import transformers

    vocab_size = write_tokenizer(root / "tok")

    def text_model(cls, pad, act, seed, width=32):
        extra = {} if pad is None else {"pad_token": pad}
        tokenizer = transformers.CLIPTokenizer.from_pretrained(str(root / "tok"), model_max_length=77, **extra)
        model = cls(transformers.CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=width, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act=act, bos_token_id=vocab_size - 2, projection_dim=32,
            eos_token_id=vocab_size - 1, pad_token_id=tokenizer.pad_token_id))
        return tokenizer, perturb(model, seed)

    tokenizer, text = text_model(transformers.CLIPTextModel, pad_token, hidden_act, 2)
    vae = perturb(diffusers.AutoencoderKL(**(vae or VAE), **({"scaling_factor": 0.13025} if sdxl or refiner else {})), 1)
    vae = sharp_posterior(vae) if sharp_vae else vae
    parts = dict(vae=vae, text_encoder=text, tokenizer=tokenizer,
                 unet=perturb(diffusers.UNet2DConditionModel(**unet), 5 if refiner else 3), scheduler=scheduler)
    if refiner:
        tokenizer_2, text_2 = text_model(transformers.CLIPTextModelWithProjection, "!", "gelu", 4, width_2)
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**parts | dict(text_encoder=None, tokenizer=None),
                                                          text_encoder_2=text_2, tokenizer_2=tokenizer_2,
                                                          requires_aesthetics_score=True,
                                                          force_zeros_for_empty_prompt=False)
    elif sdxl:
        tokenizer_2, text_2 = text_model(transformers.CLIPTextModelWithProjection, "!", "gelu", 4, width_2)
        pipe = diffusers.StableDiffusionXLPipeline(**parts, text_encoder_2=text_2, tokenizer_2=tokenizer_2,
                                                   force_zeros_for_empty_prompt=True)
    else:
        cls = diffusers.StableDiffusionInpaintPipeline if inpainting else diffusers.StableDiffusionPipeline
        pipe = cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "model", safe_serialization=True)
    for name in ("tokenizer_2",) if refiner else ("tokenizer", "tokenizer_2") if sdxl else ("tokenizer",):
        copy_bpe_files(root / "tok", root / "model" / name)
    return root / "model"


def write_sdxl_folder(root, refiner=False):
    """The tiny SDXL base (``SDXL_UNET``) or, with ``refiner``, the tiny SDXL refiner (``REFINER_UNET``) folder under
    ``root``, both with SDXL base's Euler (``SDXL_SCHEDULER``); test_sdxl's and test_sdxl_refiner's."""
    import diffusers

    return write_sd_folder(root, REFINER_UNET if refiner else SDXL_UNET, diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER),
                           sdxl=not refiner, refiner=refiner)


@pytest.fixture(scope="module")
def pipe(folder):
    """diffusers' pipeline over the test module's ``folder`` fixture (the class its model_index.json names)."""
    import diffusers

    class_name = diffusers.DiffusionPipeline.load_config(folder)["_class_name"]
    if class_name in ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"):
        return getattr(diffusers, class_name).from_pretrained(folder)
    return diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def sd(folder):
    """Ours over the test module's ``folder`` fixture."""
    from ddpm_jax.pipelines.stable_diffusion import StableDiffusion

    return StableDiffusion.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------
# diffusers folders → single files (CompVis ldm / Stability sgm layouts), written here from diffusers'
# DIFFUSERS_TO_LDM_MAPPING tables read backwards, independently of our loader, and checked against
# diffusers' own single-file converters (check_with_diffusers)
# ------------------------------------------------------------------------------------------------

TEXT_PREFIXES = {  # layout → (component, prefix, "transformers" or "openclip")
    "sd_v1": [("text_encoder", "cond_stage_model.transformer.", "transformers")],
    "sd_v2": [("text_encoder", "cond_stage_model.model.", "openclip")],
    "sdxl": [("text_encoder", "conditioner.embedders.0.transformer.", "transformers"),
             ("text_encoder_2", "conditioner.embedders.1.model.", "openclip")],
    "sdxl_refiner": [("text_encoder_2", "conditioner.embedders.0.model.", "openclip")],
}


def _read(folder, name):
    from safetensors.numpy import load_file

    stem = "model" if name.startswith("text_encoder") else "diffusion_pytorch_model"
    return load_file(folder / name / f"{stem}.safetensors"), json.loads((folder / name / "config.json").read_text())


def _unet_to_ldm(state, config):
    n = config["layers_per_block"]
    out = {}
    for key, value in state.items():
        k = key
        for a, b in [("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
                     ("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2"),
                     ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"),
                     ("mid_block.resnets.0", "middle_block.0"), ("mid_block.attentions.0", "middle_block.1"),
                     ("mid_block.resnets.1", "middle_block.2")]:
            k = k.replace(a, b) if k.startswith(a + ".") else k
        parts = k.split(".")
        if parts[0] == "down_blocks":
            level, kind, j = int(parts[1]), parts[2], int(parts[3])
            if kind == "downsamplers":
                k = f"input_blocks.{(level + 1) * (n + 1)}.0.op." + ".".join(parts[5:])
            else:
                k = f"input_blocks.{1 + level * (n + 1) + j}.{0 if kind == 'resnets' else 1}." + ".".join(parts[4:])
        elif parts[0] == "up_blocks":
            level, kind, j = int(parts[1]), parts[2], int(parts[3])
            if kind == "upsamplers":
                has_attention = "CrossAttn" in config["up_block_types"][level]
                k = f"output_blocks.{level * (n + 1) + n}.{2 if has_attention else 1}.conv." + ".".join(parts[5:])
            else:
                k = f"output_blocks.{level * (n + 1) + j}.{0 if kind == 'resnets' else 1}." + ".".join(parts[4:])
        for a, b in [(".norm1.", ".in_layers.0."), (".conv1.", ".in_layers.2."), (".time_emb_proj.", ".emb_layers.1."),
                     (".norm2.", ".out_layers.0."), (".conv2.", ".out_layers.3."), (".conv_shortcut.", ".skip_connection.")]:
            if ".attentions." not in key and "transformer" not in k:
                k = k.replace(a, b)
        out["model.diffusion_model." + k] = value
    return out


def _vae_to_ldm(state, config):
    levels = len(config["block_out_channels"])
    out = {}
    for key, value in state.items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = k.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        k = k.replace("mid_block.attentions.0", "mid.attn_1")
        for a, b in [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]:
            if ".attn_1." in k:
                k = k.replace(f".{a}.", f".{b}.")
        parts = k.split(".")
        if parts[1] == "down_blocks":
            i = parts[2]
            k = (f"encoder.down.{i}.block.{parts[4]}." if parts[3] == "resnets" else f"encoder.down.{i}.downsample.conv.")
            k += ".".join(parts[5:] if parts[3] == "resnets" else parts[6:])
        elif parts[1] == "up_blocks":
            i = levels - 1 - int(parts[2])
            k = (f"decoder.up.{i}.block.{parts[4]}." if parts[3] == "resnets" else f"decoder.up.{i}.upsample.conv.")
            k += ".".join(parts[5:] if parts[3] == "resnets" else parts[6:])
        if ".attn_1." in k and k.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1×1 convs
        out["first_stage_model." + k] = value
    return out


def _text_to_openclip(state):
    """transformers CLIP text names → OpenCLIP's (diffusers' "openclip" table read backwards; q, k, v fused)."""
    import numpy as np

    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out = {}
    for key, value in state.items():
        if key == "text_projection.weight":
            out["text_projection"] = np.ascontiguousarray(value.T)
            continue
        if ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        k = key.replace("encoder.layers.", "transformer.resblocks.").replace("embeddings.token_embedding.", "token_embedding.")
        k = k.replace("embeddings.position_embedding.weight", "positional_embedding").replace("final_layer_norm.", "ln_final.")
        for a, b in [(".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."), (".mlp.fc1.", ".mlp.c_fc."),
                     (".mlp.fc2.", ".mlp.c_proj."), (".self_attn.out_proj.", ".attn.out_proj.")]:
            k = k.replace(a, b)
        if ".self_attn.q_proj." in key:
            leaf = key.rsplit(".", 1)[1]
            fused = [state[key.replace("q_proj", name)] for name in ("q_proj", "k_proj", "v_proj")]
            k = k.split(".self_attn.")[0] + f".attn.in_proj_{leaf}"
            value = np.concatenate(fused, axis=0)
        out[k] = value
    return out


def to_single_file(folder, layout):
    """A diffusers folder (write_sd_folder) → the NumPy state dict of its single file in ``layout`` ("sd_v1",
    "sd_v2", "sdxl", "sdxl_refiner"), with LDM's (sgm's) schedule buffer and OpenCLIP's logit_scale as real files have them (to be
    ignored)."""
    import numpy as np

    unet, unet_config = _read(folder, "unet")
    vae, vae_config = _read(folder, "vae")
    out = _unet_to_ldm(unet, unet_config) | _vae_to_ldm(vae, vae_config)
    for component, prefix, names in TEXT_PREFIXES[layout]:
        text, _ = _read(folder, component)
        if names == "openclip":  # (+ OpenCLIP's contrastive temperature, in real files too)
            out |= {prefix + k: v for k, v in _text_to_openclip(text).items()} | {prefix + "logit_scale": np.array(4.6, np.float32)}
        else:  # FrozenCLIPEmbedder holds a transformers (v4) CLIPTextModel: text_model.…
            out |= {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in text.items()}
    out["denoiser.sigmas" if layout.startswith("sdxl") else "betas"] = np.linspace(0, 1, 1000, dtype=np.float32)
    return out


def check_with_diffusers(state, folder, layout):
    """diffusers' own single-file converters (loaders/single_file_utils.py) turn ``state`` back into exactly the
    folder's weights: the file's layout is the one diffusers reads."""
    import types

    from diffusers.loaders import single_file_utils as sfu
    from safetensors.torch import load_file

    checkpoint = {k: torch.from_numpy(v) for k, v in state.items()}
    converted = {"unet": sfu.convert_ldm_unet_checkpoint(checkpoint, _read(folder, "unet")[1]),
                 "vae": sfu.convert_ldm_vae_checkpoint(checkpoint, _read(folder, "vae")[1])}
    for component, prefix, names in TEXT_PREFIXES[layout]:
        if names == "openclip":
            width = _read(folder, component)[1]["hidden_size"]  # (used only when the file has no text_projection)
            model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=width))
            converted[component] = sfu.convert_open_clip_checkpoint(model, checkpoint, prefix=prefix)
        else:
            converted[component] = sfu.convert_ldm_clip_checkpoint(checkpoint)
    for name, weights in converted.items():
        stem = "model" if name.startswith("text_encoder") else "diffusion_pytorch_model"
        reference = load_file(folder / name / f"{stem}.safetensors")
        if name.startswith("text_encoder"):  # transformers v5 saves a bare CLIPTextModel without "text_model."
            strip = not any(k.startswith("text_model.") for k in reference)
            weights = {(k.removeprefix("text_model.") if strip else k): v for k, v in weights.items()
                       if not k.endswith("position_ids")}
            if layout == "sd_v2":  # SD 2.x's text_encoder has no projection; diffusers ignores it
                weights.pop("text_projection.weight", None)
        assert set(weights) == set(reference), (name, sorted(set(weights) ^ set(reference))[:5])
        for k, v in reference.items():
            assert torch.equal(weights[k].reshape(v.shape), v), (name, k)


def check_with_diffusers_single_file_loader(path, folder, refiner=False):
    """diffusers' StableDiffusionXLPipeline.from_single_file (the ``refiner``: StableDiffusionXLImg2ImgPipeline's;
    configs from the local ``folder``) loads the file at ``path`` to exactly the folder's weights. (The base's text
    encoders are told apart by their widths: they must differ.)"""
    import diffusers

    cls = diffusers.StableDiffusionXLImg2ImgPipeline if refiner else diffusers.StableDiffusionXLPipeline
    single = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    reference = cls.from_pretrained(folder)
    assert (single.text_encoder is None) == refiner
    for name in ("unet", "vae", "text_encoder_2") if refiner else ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(single, name).state_dict(), getattr(reference, name).state_dict()
        assert set(a) == set(b), name
        for k in b:
            assert not a[k].is_meta and torch.equal(a[k], b[k]), (name, k)


# ------------------------------------------------------------------------------------------------
# Inputs shared by the img2img and inpainting parity tests
# ------------------------------------------------------------------------------------------------

def smooth_image(height, width, k=0):
    """A smooth RGB PIL image (sines of the coordinates, phase k): something a VAE encodes to structured latents."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[:height, :width] / max(height, width)
    rgb = np.stack([np.sin(6 * x + k), np.cos(5 * y - k), np.sin(4 * (x + y) + 2 * k)], -1)
    return Image.fromarray(np.round((rgb * 0.5 + 0.5) * 255).astype(np.uint8))




def inject_step_noise(monkeypatch, module, seed, shape, steps):
    """Feeds a diffusers scheduler module's ``randn_tensor`` our step noise, in order: at step i (a grid index of
    ``steps``) image b draws z from fold_in(split(key(seed + b))[1], i) (the library's noise-key rule per image,
    ``stable_diffusion.image_keys``), shape [B, ...] NHWC → NCHW."""
    import jax
    import numpy as np

    key_steps = [jax.random.split(jax.random.key(seed + b))[1] for b in range(shape[0])]
    noise = iter([np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, i), shape[1:])) for k in key_steps]
                           ).transpose(0, 3, 1, 2) for i in steps])
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.from_numpy(next(noise)))
    return noise  # exhausted once diffusers drew every step's noise
