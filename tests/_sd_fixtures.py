"""Tiny random diffusers/transformers components shared by the Stable Diffusion tests (not a test file)."""

from __future__ import annotations

import json

import pytest
import torch

from ddpm_jax import tokenizer as tok_lib

MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "o n</w>", "d o", "do g</w>"]
# The tiny U-Nets (16×16×4 latents): SD v1's layout (attention at the first level, 1×1-conv projections) and SDXL
# base's (no attention at the first level, linear projections, the added conditioning: pooled 32 + 6 time ids × 8).
UNET_V1 = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=32, attention_head_dim=2, norm_num_groups=16)
UNET_XL = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
               attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1), use_linear_projection=True,
               norm_num_groups=16, cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
               projection_class_embeddings_input_dim=32 + 6 * 8)
VAE = dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=16, layers_per_block=1,
           sample_size=32)


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


def write_sd_folder(root, unet, scheduler, pad_token=None, hidden_act="quick_gelu", sdxl=False):
    """A tiny random StableDiffusionPipeline folder under ``root``: U-Net config ``unet``, the VAE above, a
    2-layer CLIP text model, the BPE tokenizer (padding with ``pad_token``, else end-of-text) and ``scheduler``
    (a diffusers scheduler object). With ``sdxl`` a StableDiffusionXLPipeline folder: SDXL's VAE scale 0.13025,
    and text_encoder_2 a CLIPTextModelWithProjection (GELU, projection 32; OpenCLIP ViT-bigG's layout) with
    tokenizer_2 padding with "!", as SDXL's. Returns the folder."""
    import diffusers
    import transformers

    vocab_size = write_tokenizer(root / "tok")

    def text_model(cls, pad, act, seed):
        extra = {} if pad is None else {"pad_token": pad}
        tokenizer = transformers.CLIPTokenizer.from_pretrained(str(root / "tok"), model_max_length=77, **extra)
        model = cls(transformers.CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act=act, bos_token_id=vocab_size - 2, projection_dim=32,
            eos_token_id=vocab_size - 1, pad_token_id=tokenizer.pad_token_id))
        return tokenizer, perturb(model, seed)

    tokenizer, text = text_model(transformers.CLIPTextModel, pad_token, hidden_act, 2)
    vae = perturb(diffusers.AutoencoderKL(**VAE, **({"scaling_factor": 0.13025} if sdxl else {})), 1)
    parts = dict(vae=vae, text_encoder=text, tokenizer=tokenizer,
                 unet=perturb(diffusers.UNet2DConditionModel(**unet), 3), scheduler=scheduler)
    if sdxl:
        tokenizer_2, text_2 = text_model(transformers.CLIPTextModelWithProjection, "!", "gelu", 4)
        pipe = diffusers.StableDiffusionXLPipeline(**parts, text_encoder_2=text_2, tokenizer_2=tokenizer_2,
                                                   force_zeros_for_empty_prompt=True)
    else:
        pipe = diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    pipe.save_pretrained(root / "model", safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2") if sdxl else ("tokenizer",):
        copy_bpe_files(root / "tok", root / "model" / name)
    return root / "model"


@pytest.fixture(scope="module")
def pipe(folder):
    """diffusers' pipeline over the test module's ``folder`` fixture (the class its model_index.json names)."""
    import diffusers

    if diffusers.DiffusionPipeline.load_config(folder)["_class_name"] == "StableDiffusionXLPipeline":
        return diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    return diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def sd(folder):
    """Ours over the test module's ``folder`` fixture."""
    from ddpm_jax.pipelines.stable_diffusion import StableDiffusion

    return StableDiffusion.from_pretrained(folder)
