"""Text-to-image latent diffusion on captioned MNIST digits: Stable Diffusion's recipe at laptop scale.

Needs the two frozen first stages, trained first (each ~5 minutes on 2 CPU cores)::

    ddpm-jax train-vae  --config experiments/autoencoder_kl_mnist.py --workdir runs/autoencoder_kl_mnist
    ddpm-jax train-clip --config experiments/clip_mnist.py           --workdir runs/clip_mnist

Command::

    ddpm-jax train   --config experiments/ldm_text_mnist.py --workdir runs/ldm_text_mnist
    ddpm-jax txt2img --workdir runs/ldm_text_mnist "a thick seven" --guidance 3 --steps 50 --attention-maps
    ddpm-jax eval    --workdir runs/ldm_text_mnist      # prompts "a handwritten digit <d>" judged by the MNIST judge

What is what (Rombach et al. 2022): the U-Net predicts ε in the 8×8×4 latent space of the f = 4
AutoencoderKL (z = s·E(x), s its measured scaling factor, so z has unit variance); each ResNet block is
followed by a spatial transformer whose cross-attention reads the per-token states [24, 64] of our
CLIP text transformer (frozen; the caption states are precomputed once). 10% of the captions are
replaced by the empty prompt "" during training (classifier-free guidance, Ho & Salimans 2021), and
sampling uses ε̂ = ε(∅) + w (ε(c) − ε(∅)) with w = ``sample.guidance``.

Hardware: 2 CPU cores. Measured: ~1 step/s at batch 64 on a machine shared with other jobs (1,000 steps
in 17 minutes; the session stopped the 3,000-step config at 1,000 with ``train.num_steps=1500`` killed at its
1,000-step checkpoint).

Expected result (measured at 1,000 steps, ``ddpm-jax eval --workdir runs/ldm_text_mnist --num-samples 100
--sweep-per-class 10 --steps 50``): the MNIST judge classifies the images of "a handwritten digit <d>" as
digit d 7% / 49% / 78% / 91% / 91% of the time at guidance w = 0 / 1 / 2 / 3 / 5 (10 per digit); the grids
``guidance_sweep_w*.png`` show one row per prompt.
"""

import ml_collections

from ddpm_jax.config import dataclass_to_config
from ddpm_jax.models.unet import UNetConfig

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict(dict(
        image_size=32,        # the autoencoder's input: 28 padded to 32 → 8×8×4 latents
        channels=1,
        layout="original",    # MNIST's own framing, which the MNIST judge (evaluation/judge.py) was trained on
        seed=0,               # layout and caption templates (as in experiments/clip_mnist.py)
        num_examples=None,
        random_flip=False,
    ))
    config.latent = ml_collections.ConfigDict(dict(autoencoder="runs/autoencoder_kl_mnist"))
    config.condition = ml_collections.ConfigDict(dict(
        kind="text",
        clip_workdir="runs/clip_mnist",
        layer=-1,             # last layer of the text transformer (-2: SD 2's "penultimate")
        p_uncond=0.1,
        grid_prompts=[f"a handwritten digit {d}" for d in DIGITS],
    ))

    config.model = dataclass_to_config(UNetConfig(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=64,  # the CLIP text transformer's hidden size
        num_attention_heads=4,
        norm_num_groups=16,
        flip_sin_to_cos=True,    # SD's timestep embedding convention
        freq_shift=0,
        dropout=0.0,
    ))

    config.diffusion = ml_collections.ConfigDict(dict(
        schedule="linear", num_timesteps=1000, prediction="eps", variance="fixed_small"))

    config.train = ml_collections.ConfigDict(dict(
        batch_size=64,
        num_steps=3000,
        lr=1e-3,
        warmup_steps=100,
        grad_clip=1.0,
        ema_decay=0.995,
        ema_warmup=True,
        seed=0,
        log_every=50,
        ckpt_every=500,
        keep_checkpoints=2,
        sample_every=1000,
        num_samples=20,       # the grid: the ten prompts twice
        parallel="jit",
    ))
    # Latents are not clipped to [-1, 1] like pixels: clip_denoised must be off (see samplers.py).
    config.sample = ml_collections.ConfigDict(dict(sampler="ddim", steps=50, eta=0.0, guidance=3.0,
                                                   clip_denoised=False))
    return config
