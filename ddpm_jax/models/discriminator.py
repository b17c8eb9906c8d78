"""The PatchGAN discriminator that LDM's autoencoder is trained against.

Isola et al. 2017 ("Image-to-Image Translation with Conditional Adversarial Networks", §3.2.2) replace a
discriminator that outputs one real/fake score per image by a fully convolutional one that outputs a
*map* of scores, each judging one N×N patch ("PatchGAN"): it penalises structure at the scale of
patches, which is what an L1/L2 reconstruction loss leaves blurry. Taming transformers (Esser et al.
2021) and LDM (Rombach et al. 2022) train their autoencoders against it; this is their
``NLayerDiscriminator`` (taming/modules/discriminator/model.py), layer for layer::

    Conv(ndf, 4×4, stride 2, pad 1) → LeakyReLU(0.2)                          [B, H/2, W/2, ndf]
    for n = 1 … n_layers−1:
        Conv(ndf·min(2ⁿ, 8), 4×4, stride 2, pad 1, no bias) → Norm → LeakyReLU [B, H/2ⁿ⁺¹, …]
    Conv(ndf·min(2^n_layers, 8), 4×4, stride 1, pad 1, no bias) → Norm → LeakyReLU   (size − 1)
    Conv(1, 4×4, stride 1, pad 1)                                              (size − 1): logits

so an H×W image gives logits [B, H/2^n_layers − 2, W/2^n_layers − 2, 1]. Each logit sees a patch of
``receptive_field(n_layers)`` pixels: 70 for the default n_layers = 3 (the "70×70 PatchGAN"), 34 for 2,
16 for 1.

Norm: taming uses BatchNorm in training mode (the discriminator only ever runs in training). Here it is
exactly that computation, the batch's per-channel mean and variance, without running averages (they
would only be used at evaluation time, which a discriminator never has), so the module stays a pure
function of (params, images). Initialisation as taming's ``weights_init``: conv weights N(0, 0.02²),
norm scales N(1, 0.02²), biases 0.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

_conv_init = nn.initializers.normal(0.02)


def receptive_field(n_layers: int) -> int:
    """Side of the input patch that one output logit sees (4×4 kernels; n_layers stride-2 convs, two stride-1)."""
    field = 1
    for stride in reversed([2] * n_layers + [1, 1]):  # walk back from the output: r ← s·r + (k − s)
        field = stride * field + (4 - stride)
    return field


def output_size(size: int, n_layers: int) -> int:
    """Spatial size of the logit map for an input of side ``size``."""
    for _ in range(n_layers):
        size = (size + 2 - 4) // 2 + 1  # 4×4, stride 2, pad 1: ⌊size/2⌋
    return size - 2  # two 4×4 stride-1 pad-1 convs: −1 each


class BatchStatsNorm(nn.Module):
    """BatchNorm in training mode: (x − mean_B,H,W) / √(var_B,H,W + ε) · scale + bias, per channel."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]
        scale = self.param("scale", lambda k, s: 1.0 + 0.02 * jax.random.normal(k, s), (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        mean = jnp.mean(x, axis=(0, 1, 2))  # [C]
        var = jnp.var(x, axis=(0, 1, 2))  # [C] (biased, as BatchNorm normalises)
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class NLayerDiscriminator(nn.Module):
    """PatchGAN: images [B, H, W, C] in [−1, 1] → real/fake logits [B, h, w, 1], one per patch.

    Attributes:
      ndf: channels of the first conv (64 in taming/LDM); later layers have ndf·min(2ⁿ, 8).
      n_layers: stride-2 convs (3 in taming/LDM). The input must be at least 2^n_layers · 3 pixels wide.
      use_norm: the batch-statistics norm after the inner convs (taming: BatchNorm); without it those
        convs get a bias instead.
    """

    ndf: int = 64
    n_layers: int = 3
    use_norm: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if x.ndim != 4:
            raise ValueError(f"the discriminator expects NHWC images [B, H, W, C], got shape {x.shape}")
        if min(output_size(x.shape[1], self.n_layers), output_size(x.shape[2], self.n_layers)) < 1:
            raise ValueError(
                f"images of {x.shape[1]}×{x.shape[2]} are too small for a discriminator with n_layers={self.n_layers} "
                f"(needs at least {3 * 2 ** self.n_layers} pixels); use fewer layers")

        def conv(features: int, stride: int, bias: bool, name: str) -> nn.Conv:
            return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                           use_bias=bias, kernel_init=_conv_init, name=name)

        def norm_act(h: Array, name: str) -> Array:
            if self.use_norm:
                h = BatchStatsNorm(name=name)(h)
            return nn.leaky_relu(h, 0.2)

        h = nn.leaky_relu(conv(self.ndf, 2, True, "conv_0")(x), 0.2)  # [B, H/2, W/2, ndf]
        mult = 1
        for n in range(1, self.n_layers):
            mult = min(2**n, 8)
            h = norm_act(conv(self.ndf * mult, 2, not self.use_norm, f"conv_{n}")(h), f"norm_{n}")  # [B, H/2ⁿ⁺¹, …]
        mult = min(2**self.n_layers, 8)
        h = norm_act(conv(self.ndf * mult, 1, not self.use_norm, f"conv_{self.n_layers}")(h),
                     f"norm_{self.n_layers}")  # [B, h + 1, w + 1, ndf·mult]
        return conv(1, 1, True, f"conv_{self.n_layers + 1}")(h)  # [B, h, w, 1]
