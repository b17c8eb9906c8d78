"""Tiny random diffusers/transformers components shared by the Stable Diffusion tests (not a test file)."""

from __future__ import annotations

import json

import torch

from ddpm_jax import tokenizer as tok_lib

MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "o n</w>", "d o", "do g</w>"]
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
