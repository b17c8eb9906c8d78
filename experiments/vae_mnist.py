"""The lecture's Gaussian VAE (Kingma & Welling 2014) on the 5,000 bundled MNIST digits (works offline).

Command::

    ddpm-jax train-vae --config experiments/vae_mnist.py --workdir runs/vae_mnist
    ddpm-jax train-vae --config experiments/vae_mnist.py --workdir runs/vae_mnist_2d model.latent_dim=2
    ddpm-jax train-vae --config experiments/vae_mnist.py --workdir runs/vae_gauss model.likelihood=gaussian

An MLP encoder 784 → 512 → (μ, log σ²) ∈ R^16 and the mirror-image decoder with a Bernoulli likelihood on
the grey levels (x + 1)/2, trained on −ELBO (K&W Eq. 10) with Adam; 500 of the digits are held out.
``model.latent_dim=2`` adds latent_map.png (decoded grid over the latent plane, K&W Fig. 4) and
latent_scatter.png (held-out digits' μ by class).

Hardware: 2 CPU cores. MEASURED: see "Expected result" (filled in from the run of this file).

Expected result: see the bottom of this docstring (measured numbers are added after the real run).
"""

import ml_collections

IMAGE_SIZE = 28  # native MNIST: the MLP sees all 784 pixels


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = ml_collections.ConfigDict(
        dict(name="mnist_bundled", image_size=IMAGE_SIZE, channels=1, data_dir=None, num_examples=None,
             num_held_out=500))
    config.model = ml_collections.ConfigDict(
        dict(kind="gaussian_vae", hidden_dims=(512,), latent_dim=16, likelihood="bernoulli", sigma=0.1))
    config.train = ml_collections.ConfigDict(
        dict(
            batch_size=128,
            num_steps=3000,
            lr=1e-3,
            warmup_steps=100,
            grad_clip=0.0,  # none
            adam_b1=0.9,
            adam_b2=0.999,
            ema_decay=0.0,  # no EMA: the ELBO is evaluated with the trained parameters
            ema_warmup=False,
            seed=0,
            log_every=50,
            ckpt_every=1000,
            keep_checkpoints=2,
            sample_every=1000,  # reconstruction / prior-sample grids (and the latent map) every N steps
            num_samples=32,
            parallel="jit",
        ))
    return config
