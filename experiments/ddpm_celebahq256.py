"""Ho et al. 2020's CelebA-HQ 256×256 run, with the paper's settings (Appendix B).

Command::

    ddpm-jax train --config experiments/ddpm_celebahq256.py --workdir runs/ddpm_celebahq256
    ddpm-jax sample --workdir runs/ddpm_celebahq256 --num 64 --sampler ddpm --out celebahq.png
    ddpm-jax eval --workdir runs/ddpm_celebahq256 --inception pt_inception-2015-12-05-6726825d.pth \\
        --num-samples 50000 --reference celebahq256_train_stats.npz --bpd-examples 0

Data: ``tfds:celeb_a_hq/256`` must be prepared first (CelebA-HQ is a manual download for
tensorflow-datasets: follow ``tfds build celeb_a_hq/256 --file_format=array_record``'s instructions on a
machine with the data, then point ``data.data_dir=...`` at the result). The trainer reads it with random
access (``data.open_dataset``: each host decodes only its share of each batch, two batches ahead in a
background thread) and converts only the batch to float32, so host memory holds a few batches
(64 × 256² × 3 × 4 bytes = 50 MB each), not the dataset (30,000 images as float32 would be ≈ 24 GB).
``data.cache=True`` keeps decoded images as uint8 (≈ 5.9 GB when all are read) to skip decoding after epoch 1.

Model: ch = 128, ch_mult = (1, 1, 2, 2, 4, 4) (six resolutions, 256² down to 8²), 2 ResNet blocks per
level, self-attention at 16×16 only, dropout 0 — 113,673,219 parameters ("114 million", Appendix B),
the layout of diffusers' google/ddpm-celebahq-256. Training: Adam, lr 2e-5 (the paper lowered it from
2e-4 for 256² images, which were unstable at the larger rate), batch 64, EMA 0.9999, T = 1000 linear β
from 1e-4 to 0.02, random horizontal flips, 0.5M steps.

Hardware: the paper trained on a TPU v3-8 at about 2.2 steps/s at batch 64 (so 0.5M steps take roughly
2.6 days); sampling 128 images with the 1,000-step chain took ~300 s there. On GPUs use 8 × 40–80 GB
(global batch 64, data parallel); the same command on every host of a multi-host slice. Device memory:
``model.remat=blocks`` recomputes each ResNet/attention block in the backward pass (about one more forward
pass per step) and cuts the training step's activation memory to 0.42× (21.0 → 8.9 GB at 8 images per
device; XLA's buffer assignment, ``benchmarks/bench_memory.py``): the option for smaller GPUs.

Expected result: samples like Figure 1 (left) of Ho et al. 2020; the paper reports no FID for CelebA-HQ.
Compare with the released weights: ``ddpm-jax sample --pretrained <copy of google/ddpm-celebahq-256>``.
"""

import ml_collections

from ddpm_jax.config import dataclass_to_config
from ddpm_jax.models.unet import UNetConfig

IMAGE_SIZE = 256

# The paper's 256×256 U-Net (experiments/ddpm_lsun_church256.py repeats it; a test checks they agree).
UNET_256 = UNetConfig(
    sample_size=IMAGE_SIZE,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 128, 256, 256, 512, 512),  # ch = 128, ch_mult = (1, 1, 2, 2, 4, 4)
    layers_per_block=2,
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),  # attention at 16×16
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    add_attention=True,
    attention_head_dim=None,  # one head
    norm_num_groups=32,
    norm_eps=1e-6,
    dropout=0.0,  # "We set the dropout rate on the other datasets to zero"
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
)


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = ml_collections.ConfigDict(
        dict(name="tfds:celeb_a_hq/256", image_size=IMAGE_SIZE, channels=3, random_flip=True, data_dir=None,
             num_examples=None, cache=False, prefetch=2)
    )
    config.model = dataclass_to_config(UNET_256)
    config.diffusion = ml_collections.ConfigDict(
        dict(schedule="linear", num_timesteps=1000, prediction="eps",
             variance="fixed_small")  # google/ddpm-celebahq-256's scheduler_config.json: variance_type fixed_small
    )
    config.train = ml_collections.ConfigDict(
        dict(
            batch_size=64,
            num_steps=500_000,
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
