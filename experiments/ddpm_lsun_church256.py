"""Ho et al. 2020's LSUN Church 256×256 run, with the paper's settings (Appendix B).

Command::

    ddpm-jax train --config experiments/ddpm_lsun_church256.py --workdir runs/ddpm_church256
    ddpm-jax sample --workdir runs/ddpm_church256 --num 64 --sampler ddpm --out church.png
    ddpm-jax eval --workdir runs/ddpm_church256 --inception pt_inception-2015-12-05-6726825d.pth \\
        --num-samples 50000 --reference church256_train_stats.npz --bpd-examples 0

Data: ``tfds:lsun/church_outdoor`` (126,227 training images, center-cropped and area-resized to 256×256
by ``data.py``), prepared on a machine with internet: ``tfds build lsun/church_outdoor
--file_format=array_record``. ``data.py`` keeps the dataset in host memory as float32 (≈ 99 GB for all
126k images at 256²): use a host with that much RAM, or fewer images with ``data.num_examples=...``.

Model: the same 113,673,219-parameter U-Net as experiments/ddpm_celebahq256.py (ch = 128,
ch_mult = (1, 1, 2, 2, 4, 4), attention at 16×16, dropout 0; diffusers' google/ddpm-church-256 layout).
Training: Adam, lr 2e-5, batch 64, EMA 0.9999, T = 1000 linear β, random horizontal flips, 1.2M steps.

Hardware: TPU v3-8 at about 2.2 steps/s at batch 64 in the paper (1.2M steps ≈ 6.3 days), or 8 GPUs
(global batch 64).

Expected result (Ho et al. 2020, Table 3): FID 7.89 on LSUN Church 256² (50k samples, 1,000-step
ancestral sampling, EMA parameters). Check the protocol on the released weights first:
``ddpm-jax eval --pretrained <copy of google/ddpm-church-256> --inception ... --reference ...``.
"""

import ml_collections

from ddpm_jax.config import dataclass_to_config
from ddpm_jax.models.unet import UNetConfig

IMAGE_SIZE = 256


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = ml_collections.ConfigDict(
        dict(name="tfds:lsun/church_outdoor", image_size=IMAGE_SIZE, channels=3, random_flip=True, data_dir=None,
             num_examples=None)
    )
    config.model = dataclass_to_config(
        UNetConfig(
            sample_size=IMAGE_SIZE,
            in_channels=3,
            out_channels=3,
            block_out_channels=(128, 128, 256, 256, 512, 512),  # ch = 128, ch_mult = (1, 1, 2, 2, 4, 4)
            layers_per_block=2,
            down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),  # attention at 16×16
            up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
            add_attention=True,
            attention_head_dim=None,
            norm_num_groups=32,
            norm_eps=1e-6,
            dropout=0.0,
            flip_sin_to_cos=False,
            freq_shift=1,
            downsample_padding=0,
        )
    )
    config.diffusion = ml_collections.ConfigDict(
        dict(schedule="linear", num_timesteps=1000, prediction="eps",
             variance="fixed_small")  # as google/ddpm-church-256's scheduler_config.json
    )
    config.train = ml_collections.ConfigDict(
        dict(
            batch_size=64,
            num_steps=1_200_000,
            lr=2e-5,
            warmup_steps=5000,
            grad_clip=1.0,
            ema_decay=0.9999,
            ema_warmup=False,
            seed=0,
            log_every=100,
            ckpt_every=10_000,
            keep_checkpoints=3,
            sample_every=50_000,
            num_samples=16,
            parallel="jit",
        )
    )
    config.sample = ml_collections.ConfigDict(dict(sampler="ddpm", steps=1000, eta=1.0))
    return config
