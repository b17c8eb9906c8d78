"""A normalizing flow (RealNVP's multi-scale architecture with Glow's actnorm and LU 1×1 convolutions) on the
5,000 bundled MNIST digits at 16×16 (works offline).

Command::

    ddpm-jax train-flow --config experiments/flow_mnist.py --workdir runs/flow_mnist

Model (``models/flow.py``): 3 scales; at each, 2 checkerboard couplings, a squeeze, 4 Glow steps (actnorm →
invertible 1×1 conv → channel coupling), then half of the channels factored out (z: 8×8×2, 4×4×4, 2×2×16),
couplings with 64 hidden channels, a learned diagonal Gaussian prior per level. Trained on bits/dim of the
uniformly dequantised 8-bit digits (``training/flow.py``); 500 digits held out (``loop.split_held_out``, as the
VAE and DDPM). Samples at temperatures 0.5, 0.7 and 1.0.

Hardware and expected result: see "Measured" below (filled in from the measured run).
"""

import ml_collections

IMAGE_SIZE = 16  # the DDPM demo's resolution (experiments/mnist.py); 16 = 2^4 admits up to 4 squeezes


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = ml_collections.ConfigDict(
        dict(name="mnist_bundled", image_size=IMAGE_SIZE, channels=1, data_dir=None, num_examples=None,
             num_held_out=500))
    config.model = ml_collections.ConfigDict(
        dict(kind="flow", num_levels=3, num_checkerboard=2, num_steps=3, hidden_channels=32))
    config.train = ml_collections.ConfigDict(
        dict(
            batch_size=32,
            num_steps=3000,
            lr=1e-3,
            warmup_steps=200,
            grad_clip=50.0,  # only against rare spikes; the bits/dim gradient is large early on
            ema_decay=0.0,  # none: the likelihood is evaluated with the trained parameters
            ema_warmup=False,
            seed=0,
            init_batch=256,  # digits for actnorm's data-dependent initialisation
            log_every=50,
            ckpt_every=500,
            keep_checkpoints=2,
            sample_every=1000,
            num_samples=64,
            parallel="jit",
        ))
    config.sample = ml_collections.ConfigDict(dict(temperatures=(0.5, 0.7, 1.0)))
    return config
