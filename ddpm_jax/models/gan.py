"""DCGAN's two networks (Radford et al. 2016), sized for the bundled digits: a generator G and a discriminator D.

The GAN of Goodfellow et al. 2014 pits a generator G: z ↦ x̂ against a discriminator D: x ↦ P(x is real);
the equations are in ``objectives.py``, the alternating updates in ``training/gan.py``. These are the
networks only. DCGAN's architecture guidelines (Radford et al. §3), followed here:

* no pooling: the generator upsamples with fractionally-strided (transposed) convolutions, the
  discriminator downsamples with strided convolutions;
* normalisation in the generator, ReLU in the generator with tanh at its output, LeakyReLU (slope 0.2)
  in the discriminator; no fully connected hidden layers (one linear projection of z at the input of G,
  one linear read-out of the last feature map in D);
* weights initialised from N(0, 0.02²) (§4).

Generator (``features = (2·ngf, ngf)``, ``start_size = 4``: the 16×16 digits of experiments/gan_mnist.py)::

    z [B, latent_dim] → Dense → reshape [B, 4, 4, 2·ngf] → GroupNorm → ReLU
      → ConvTranspose(ngf, 4×4, stride 2) [B, 8, 8, ngf] → GroupNorm → ReLU
      → ConvTranspose(C, 4×4, stride 2)   [B, 16, 16, C] → tanh               (images in [−1, 1])

so G makes images of side ``start_size · 2^len(features)`` (:func:`generator_output_shape`).

Discriminator (``features = (ndf, 2·ndf)``)::

    x [B, 16, 16, C] → Conv(ndf, 4×4, stride 2) [B, 8, 8, ndf] → LeakyReLU
      → Conv(2·ndf, 4×4, stride 2) [B, 4, 4, 2·ndf] → LeakyReLU → flatten → Dense(1)   logits [B]

D returns the logit l (D(x) = sigmoid(l)): the losses are computed from logits, stably.

**Why GroupNorm, not DCGAN's BatchNorm.** BatchNorm keeps running averages, a second mutable
collection that both pure training steps would have to thread through, checkpoint and switch between
"train" (batch statistics) and "eval" (running averages) modes; and with batch statistics G(z) of one z
depends on the other z's of its batch, so a sample grid of fixed z would change with the batch size and
the sharded step would not equal the single-device one example by example. GroupNorm (Wu & He 2018)
normalises each example on its own: G is a pure function of (params, z), the same at any batch size.
The discriminator has no normalisation (as in WGAN-GP and the hinge-loss GANs): a batch-coupled D
could tell a batch of fakes from a batch of reals by its statistics alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

dcgan_init = nn.initializers.normal(0.02)  # Radford et al. §4: "initialized from a zero-centered Normal, std 0.02"


def generator_output_shape(start_size: int, features: Sequence[int], channels: int) -> tuple[int, int, int]:
    """(H, W, C) of the generator's images: each of the ``len(features)`` transposed convs doubles the side."""
    side = int(start_size) * 2 ** len(features)
    return side, side, int(channels)


class DCGANGenerator(nn.Module):
    """G: z [B, latent_dim] ↦ images [B, H, W, channels] in [−1, 1] (module docstring).

    Attributes:
      channels: image channels C (1 for the digits).
      features: channels at each resolution before the output layer, coarsest first (DCGAN 64×64:
        (8·ngf, 4·ngf, 2·ngf, ngf)); one stride-2 transposed conv follows each.
      start_size: side of the first feature map, the reshaped projection of z.
      norm_groups: GroupNorm groups (must divide every entry of ``features``).
    """

    channels: int = 1
    features: Sequence[int] = (128, 64)
    start_size: int = 4
    norm_groups: int = 8

    def norm_relu(self, h: Array, name: str) -> Array:
        return nn.relu(nn.GroupNorm(num_groups=self.norm_groups, name=name)(h))

    @nn.compact
    def __call__(self, z: Array) -> Array:
        if z.ndim != 2:
            raise ValueError(f"the generator expects latents z [B, latent_dim], got shape {z.shape}")
        s, c0 = self.start_size, self.features[0]
        h = nn.Dense(s * s * c0, kernel_init=dcgan_init, name="project")(z)  # [B, s·s·c0]
        h = self.norm_relu(h.reshape(z.shape[0], s, s, c0), "norm_0")  # [B, s, s, c0]
        outs = [*self.features[1:], self.channels]
        for i, c in enumerate(outs):
            # 4×4 kernel, stride 2, "SAME": [B, h, w, ·] → [B, 2h, 2w, c] (PyTorch's k=4, s=2, p=1)
            h = nn.ConvTranspose(c, (4, 4), strides=(2, 2), padding="SAME", kernel_init=dcgan_init,
                                 name=f"deconv_{i}")(h)
            if i < len(outs) - 1:
                h = self.norm_relu(h, f"norm_{i + 1}")
        return jnp.tanh(h)  # [B, H, W, C]


class DCGANDiscriminator(nn.Module):
    """D: images [B, H, W, C] ↦ logits [B] of "x is real" (D(x) = sigmoid(logit); module docstring).

    Attributes:
      features: channels of the stride-2 convs, finest first; each halves the side (H must be
        divisible by 2^len(features)).
    """

    features: Sequence[int] = (64, 128)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if x.ndim != 4:
            raise ValueError(f"the discriminator expects NHWC images [B, H, W, C], got shape {x.shape}")
        h = x
        for i, c in enumerate(self.features):  # [B, H/2ⁱ, W/2ⁱ, ·] → [B, H/2ⁱ⁺¹, W/2ⁱ⁺¹, c]
            h = nn.leaky_relu(nn.Conv(c, (4, 4), strides=(2, 2), padding="SAME", kernel_init=dcgan_init,
                                      name=f"conv_{i}")(h), 0.2)
        h = h.reshape(h.shape[0], -1)  # [B, h·w·c]
        return nn.Dense(1, kernel_init=dcgan_init, name="logit")(h)[:, 0]  # [B]
