"""The lecture's Gaussian VAE (Kingma & Welling 2014) on the 5,000 bundled MNIST digits (works offline).

Command::

    ddpm-jax train-vae --config experiments/vae_mnist.py --workdir runs/vae_mnist
    ddpm-jax train-vae --config experiments/vae_mnist.py --workdir runs/vae_mnist_2d model.latent_dim=2
    ddpm-jax train-vae --config experiments/vae_mnist.py --workdir runs/vae_gauss model.likelihood=gaussian
    ddpm-jax train-vae --config experiments/vae_mnist.py --workdir runs/vae_mnist16 data.image_size=16 \
        model.likelihood=gaussian model.sigma=0.2      # notebook 08's VAE

An MLP encoder 784 → 512 → (μ, log σ²) ∈ R^16 and the mirror-image decoder with a Bernoulli likelihood on
the grey levels (x + 1)/2, trained on −ELBO (K&W Eq. 10) with Adam; 500 of the digits are held out.
``model.latent_dim=2`` adds latent_map.png (decoded grid over the latent plane, K&W Fig. 4) and
latent_scatter.png (held-out digits' μ by class).

Hardware: 2 CPU cores, shared with ~6 other jobs while measured (load average ~10): 24–63 steps/s,
mean 36, so the 6,000 steps took 3 min 12 s (16-D latent) and 4 min 22 s (2-D latent); its fastest
stretches ran at 63 steps/s.

Expected result (measured, seed 0, 6,000 steps = 170 epochs of the 4,500 training digits):

* 16-D latent: training −ELBO 417 → 101.7 nats; held-out (500 digits) ELBO −112.8 nats =
  reconstruction −88.0 − KL 24.7. Reconstructions are the right digit, slightly blurred; about half of the
  prior samples are clearly recognisable, the rest smeared (docs/images/vae_mnist_reconstructions.png).
* 2-D latent (``model.latent_dim=2``): held-out ELBO −157.5 nats = reconstruction −151.4 − KL 6.0;
  blurry reconstructions, and latent_map.png shows the classes laid out in the plane
  (docs/images/vae_mnist_2d_latent_map.png).

* 16×16 with a Gaussian decoder, the VAE of notebooks/08_four_families.ipynb (``data.image_size=16
  model.likelihood=gaussian model.sigma=0.2``; 77 s wall for the 6,000 steps at load average ~9): held-out ELBO
  +4.5 nats (a density of the [−1, 1] values, so it can be positive) = reconstruction 43.4 − KL 39.0; as discrete
  bits/dim (IWAE, k = 1000, its decoder discretised onto the 256 levels) 2.98 on the 500 held-out digits, 2.76 on as
  many training digits. Prior samples are mostly noise with some digit shapes. With the default σ = 0.1 the held-out
  ELBO is −213.1 nats and the bound 4.5 bits/dim; σ = 0.2 is that run's root-mean-square reconstruction error.

The gap between training and held-out ELBO (~11 nats) is overfitting of the 4,500 digits; for a
bigger training set use ``data.name=tfds:mnist``.
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
            num_steps=6000,  # ~3 min on 2 busy CPU cores
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
