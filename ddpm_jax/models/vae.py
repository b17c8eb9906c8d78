"""Variational autoencoders: the lecture's Gaussian VAE and Stable Diffusion's AutoencoderKL.

Part 1, the Gaussian VAE (Kingma & Welling 2014, "Auto-Encoding Variational Bayes"). An encoder
q_φ(z|x) = N(z; μ_φ(x), diag σ²_φ(x)) and a decoder p_θ(x|z), trained by maximising the evidence
lower bound (ELBO, K&W Eq. 3 / Eq. 10)

    log p_θ(x) ≥ L(θ, φ; x) = E_{q_φ(z|x)}[log p_θ(x|z)]  −  KL(q_φ(z|x) ‖ p(z)),   p(z) = N(0, I)
                              └──── reconstruction ────┘     └────────── KL ──────────┘

Each piece of the bound is one small pure function in ``objectives.py`` (``reparameterize``,
``gaussian_kl``, ``bernoulli_log_likelihood``, ``gaussian_log_likelihood``, ``elbo``); ``GaussianVAE``
here is the MLP that produces μ, log σ² and the decoder's output.

Part 2, AutoencoderKL (Rombach et al. 2022, "LDM", §3 and Appendix G): the convolutional
autoencoder in whose latent space Stable Diffusion diffuses. An image [B, H, W, 3] becomes a
latent [B, H/f, W/f, latent_channels] with f = 2^(levels − 1) (f = 8 and 4 latent channels for SD),
and a small KL weight keeps the latent close to N(0, I) ("KL-reg."). Module structure and
parameter names follow diffusers' ``AutoencoderKL`` (``.N`` written ``_N``), so
``ddpm_jax.pretrained.diffusers.load_vae`` reads the real SD VAE with a key mapping:

    encoder.conv_in                                   x → [B, H, W, C0]
    encoder.down_blocks_i: resnets_0..L−1, downsamplers_0 (stride-2 conv padded bottom/right;
                           none after the last level) → [B, H/f, W/f, C_last]
    encoder.mid_block: resnets_0 → attentions_0 → resnets_1
    encoder.conv_norm_out → SiLU → encoder.conv_out   → [B, H/f, W/f, 2·latent]   (mean ‖ log σ²)
    quant_conv (1×1)                                  → DiagonalGaussian
    post_quant_conv (1×1)                             z → [B, H/f, W/f, latent]
    decoder.conv_in → decoder.mid_block               → [B, H/f, W/f, C_last]
    decoder.up_blocks_i: resnets_0..L (one more than the encoder), upsamplers_0 (none at the end)
    decoder.conv_norm_out → SiLU → decoder.conv_out   → [B, H, W, out_channels]

Arrays are NHWC; images float32 in [−1, 1].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from ddpm_jax.models.layers import Conv3x3, Downsample, GroupNorm, ResnetBlock, SpatialSelfAttention, Upsample
from ddpm_jax.objectives import LIKELIHOODS, gaussian_kl, reparameterize, sum_flat

Array = jax.Array

# ============================================================================================
# Part 1. The Gaussian VAE of Kingma & Welling (2014) (its ELBO: objectives.py)
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class GaussianVAEConfig:
    """The lecture's MLP VAE. Defaults: MNIST (28×28×1), one hidden layer of 512, a 2-D latent (for the latent map)."""

    image_shape: tuple[int, int, int] = (28, 28, 1)  # H, W, C
    hidden_dims: tuple[int, ...] = (512,)  # encoder widths; the decoder mirrors them
    latent_dim: int = 2
    likelihood: str = "bernoulli"  # "bernoulli" (logits out) or "gaussian" (mean out, fixed sigma)
    sigma: float = 0.1  # the Gaussian decoder's standard deviation; unused for Bernoulli

    def __post_init__(self):
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be (H, W, C), got {self.image_shape}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be positive, got {self.latent_dim}")


class GaussianVAE(nn.Module):
    """Encoder q_φ(z|x) = N(μ, diag σ²) and decoder p_θ(x|z), both MLPs with ReLU hidden layers.

    ``encode(x) -> (mu, logvar)``, ``decode(z) -> logits or mean``, and
    ``__call__(x, key) -> (decoder_output, mu, logvar)`` with z drawn by ``reparameterize``.
    """

    config: GaussianVAEConfig

    def setup(self):
        cfg = self.config
        self.encoder_hidden = [nn.Dense(d, name=f"encoder_{i}") for i, d in enumerate(cfg.hidden_dims)]
        self.to_mu = nn.Dense(cfg.latent_dim)
        self.to_logvar = nn.Dense(cfg.latent_dim)
        self.decoder_hidden = [nn.Dense(d, name=f"decoder_{i}") for i, d in enumerate(reversed(cfg.hidden_dims))]
        self.to_output = nn.Dense(math.prod(cfg.image_shape))

    def _check(self, x: Array) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.config.image_shape):
            raise ValueError(f"GaussianVAE expects images [B, {', '.join(map(str, self.config.image_shape))}], got {x.shape}")

    def encode(self, x: Array) -> tuple[Array, Array]:
        # x: [B, H, W, C] → μ, log σ²: [B, latent_dim]
        self._check(x)
        h = x.reshape(x.shape[0], -1)  # [B, H·W·C]
        for layer in self.encoder_hidden:
            h = nn.relu(layer(h))
        return self.to_mu(h), self.to_logvar(h)

    def decode(self, z: Array) -> Array:
        # z: [B, latent_dim] → logits (Bernoulli) or mean (Gaussian): [B, H, W, C]
        if z.ndim != 2 or z.shape[-1] != self.config.latent_dim:
            raise ValueError(f"GaussianVAE.decode expects z [B, {self.config.latent_dim}], got {z.shape}")
        h = z
        for layer in self.decoder_hidden:
            h = nn.relu(layer(h))
        return self.to_output(h).reshape(z.shape[0], *self.config.image_shape)

    def __call__(self, x: Array, key: Array) -> tuple[Array, Array, Array]:
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, key)  # [B, latent_dim]
        return self.decode(z), mu, logvar


def decoder_mean_image(config: GaussianVAEConfig, decoder_output: Array) -> Array:
    """The mean of p_θ(x|z) as an image in [−1, 1]: 2·sigmoid(logits) − 1 (Bernoulli) or the mean (Gaussian)."""
    if config.likelihood == "bernoulli":
        return 2.0 * jax.nn.sigmoid(decoder_output) - 1.0
    return decoder_output


# ============================================================================================
# Part 2. AutoencoderKL (LDM / Stable Diffusion)
# ============================================================================================


@struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, diag exp(logvar)), as diffusers' DiagonalGaussianDistribution.

    A pytree, so it can leave ``jit``. ``logvar`` is clipped to [−30, 20] (σ ∈ [3e−7, 2.2e4]),
    which keeps exp() finite early in training.
    """

    mean: Array  # [B, h, w, latent_channels]
    logvar: Array  # [B, h, w, latent_channels]

    @classmethod
    def from_moments(cls, moments: Array) -> DiagonalGaussian:
        """Split the encoder output [..., 2·latent] (mean first, then log σ², as diffusers) and clip."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> Array:
        return jnp.exp(self.logvar)

    def sample(self, key: Array) -> Array:
        """z = mean + std ⊙ ε, ε ~ N(0, I): the reparameterisation trick."""
        return reparameterize(self.mean, self.logvar, key)

    def mode(self) -> Array:
        """The most likely latent, the mean (what SD uses when it wants a deterministic encoding)."""
        return self.mean

    def kl(self) -> Array:
        """KL(q ‖ N(0, I)) per example, [B], summed over h, w and channels: ``gaussian_kl``."""
        return gaussian_kl(self.mean, self.logvar)

    def nll(self, z: Array) -> Array:
        """−log q(z) per example, [B]."""
        return 0.5 * sum_flat(jnp.log(2.0 * jnp.pi) + self.logvar + (z - self.mean) ** 2 / self.var)


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """Hyper-parameters of AutoencoderKL; names and meanings as in diffusers' ``AutoencoderKL`` config.

    ``scaling_factor`` (and ``shift_factor``): the diffusion model is trained on
    ``scaling_factor · (z − shift_factor)`` rather than on z itself. LDM (§4.3.2 and Appendix G)
    rescales the latents "component-wise" to unit variance so that the noise schedule, designed
    for data of variance ≈ 1, fits them: ``scaling_factor = 1 / std(z)`` measured on a batch of
    training latents. For the SD v1.x VAE that number is 0.18215 (its latents have std ≈ 5.5);
    SD-XL's VAE uses 0.13025, and SD3/Flux add a shift. It is used in exactly one place:
    ``AutoencoderKL.encode_latents`` / ``decode_latents``.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)  # one per level; f = 2^(len − 1)
    layers_per_block: int = 1  # ResNet blocks per encoder level (decoder levels have one more)
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32  # training resolution (informational; any multiple of f works)
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    mid_block_add_attention: bool = True  # self-attention in the encoder's and decoder's mid block
    use_quant_conv: bool = True  # 1×1 conv on the moments (LDM has it; SD3/Flux VAEs do not)
    use_post_quant_conv: bool = True  # 1×1 conv on z before decoding
    dtype: Any = jnp.float32  # computation dtype; params are float32

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if not self.block_out_channels:
            raise ValueError("block_out_channels must have at least one level")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"every block_out_channels entry must be divisible by norm_num_groups={self.norm_num_groups}; "
                    f"got {self.block_out_channels}"
                )
        if min(self.in_channels, self.out_channels, self.latent_channels, self.layers_per_block) < 1:
            raise ValueError("in_channels, out_channels, latent_channels and layers_per_block must be positive")

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downsampling_factor(self) -> int:
        """f = 2^(levels − 1): each level but the last halves H and W."""
        return 2 ** (self.num_levels - 1)

    @classmethod
    def sd_v1(cls) -> AutoencoderKLConfig:
        """Stable Diffusion v1.x's VAE (the "kl-f8" autoencoder of LDM): f = 8, 4 latent channels, 83.7M params."""
        return cls(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
            scaling_factor=0.18215,
        )

    @classmethod
    def sdxl(cls) -> AutoencoderKLConfig:
        """SDXL's VAE: the kl-f8 architecture of ``sd_v1`` retrained (Podell et al. 2023, Sec. 2.4), 1024×1024 images,
        latents scaled by 0.13025 (also the fp16-fix VAE's config: same layout and scale)."""
        return dataclasses.replace(cls.sd_v1(), sample_size=1024, scaling_factor=0.13025)

    @classmethod
    def mnist_f4(cls) -> AutoencoderKLConfig:
        """A small f = 4 autoencoder for MNIST (padded 32×32 → 8×8×4 latents); scaling_factor to be measured."""
        return cls(
            in_channels=1,
            out_channels=1,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=32,
            scaling_factor=1.0,
        )


def _resnet(cfg: AutoencoderKLConfig, channels: int, name: str) -> ResnetBlock:
    return ResnetBlock(channels, num_groups=cfg.norm_num_groups, eps=1e-6, dtype=cfg.dtype, name=name)


class VAEMidBlock(nn.Module):
    """ResNet → self-attention (one head over all channels) → ResNet, at the lowest resolution."""

    config: AutoencoderKLConfig

    @nn.compact
    def __call__(self, h: Array) -> Array:
        cfg = self.config
        channels = h.shape[-1]
        h = _resnet(cfg, channels, "resnets_0")(h)
        if cfg.mid_block_add_attention:
            h = SpatialSelfAttention(
                query_dim=channels,
                num_heads=1,
                head_dim=channels,
                norm_num_groups=cfg.norm_num_groups,
                norm_eps=1e-6,
                dtype=cfg.dtype,
                name="attentions_0",
            )(h)
        return _resnet(cfg, channels, "resnets_1")(h)


class DownEncoderBlock(nn.Module):
    """``layers_per_block`` ResNet blocks, then (except at the last level) a stride-2 conv."""

    config: AutoencoderKLConfig
    out_channels: int
    add_downsample: bool

    @nn.compact
    def __call__(self, h: Array) -> Array:
        cfg = self.config
        for j in range(cfg.layers_per_block):
            h = _resnet(cfg, self.out_channels, f"resnets_{j}")(h)  # [B, H, W, C]
        if self.add_downsample:
            # Padded at the bottom/right only (diffusers' downsample_padding=0), as in LDM.
            h = Downsample(self.out_channels, padding=0, dtype=cfg.dtype, name="downsamplers_0")(h)  # [B, H/2, W/2, C]
        return h


class UpDecoderBlock(nn.Module):
    """``layers_per_block + 1`` ResNet blocks, then (except at the last level) nearest ×2 + conv."""

    config: AutoencoderKLConfig
    out_channels: int
    add_upsample: bool

    @nn.compact
    def __call__(self, h: Array) -> Array:
        cfg = self.config
        for j in range(cfg.layers_per_block + 1):
            h = _resnet(cfg, self.out_channels, f"resnets_{j}")(h)  # [B, h, w, C]
        if self.add_upsample:
            h = Upsample(self.out_channels, dtype=cfg.dtype, name="upsamplers_0")(h)  # [B, 2h, 2w, C]
        return h


class Encoder(nn.Module):
    """x [B, H, W, in] → moments [B, H/f, W/f, 2·latent_channels] (before quant_conv)."""

    config: AutoencoderKLConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        h = Conv3x3(cfg.block_out_channels[0], dtype=cfg.dtype, name="conv_in")(x)  # [B, H, W, C0]
        for level, channels in enumerate(cfg.block_out_channels):
            last = level == cfg.num_levels - 1
            h = DownEncoderBlock(cfg, channels, not last, name=f"down_blocks_{level}")(h)
        h = VAEMidBlock(cfg, name="mid_block")(h)  # [B, H/f, W/f, C_last]
        h = nn.silu(GroupNorm(cfg.norm_num_groups, epsilon=1e-6, dtype=cfg.dtype, name="conv_norm_out")(h))
        return Conv3x3(2 * cfg.latent_channels, dtype=cfg.dtype, name="conv_out")(h)  # [B, H/f, W/f, 2·latent]


class Decoder(nn.Module):
    """z [B, h, w, latent_channels] (after post_quant_conv) → image [B, f·h, f·w, out]."""

    config: AutoencoderKLConfig

    @nn.compact
    def __call__(self, z: Array) -> Array:
        cfg = self.config
        reversed_channels = cfg.block_out_channels[::-1]
        h = Conv3x3(reversed_channels[0], dtype=cfg.dtype, name="conv_in")(z)  # [B, h, w, C_last]
        h = VAEMidBlock(cfg, name="mid_block")(h)
        for level, channels in enumerate(reversed_channels):
            last = level == cfg.num_levels - 1
            h = UpDecoderBlock(cfg, channels, not last, name=f"up_blocks_{level}")(h)
        h = nn.silu(GroupNorm(cfg.norm_num_groups, epsilon=1e-6, dtype=cfg.dtype, name="conv_norm_out")(h))
        return Conv3x3(cfg.out_channels, dtype=cfg.dtype, name="conv_out")(h)  # [B, H, W, out_channels]


class AutoencoderKL(nn.Module):
    """LDM's KL-regularised autoencoder (diffusers ``AutoencoderKL``).

    Methods (call with ``module.apply({"params": p}, x, method=AutoencoderKL.encode)`` etc.):
      ``encode(x) -> DiagonalGaussian``         x: [B, H, W, in_channels], H and W multiples of f
      ``decode(z) -> image``                    z: [B, h, w, latent_channels]
      ``__call__(x, key=None)``                 reconstruction (from a sample if key is given, else the mode) and posterior
      ``encode_latents(x, key)``                what the diffusion model sees: scaling_factor · (z − shift)
      ``decode_latents(latents)``               the inverse: decode(latents / scaling_factor + shift)
    """

    config: AutoencoderKLConfig

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), dtype=cfg.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), dtype=cfg.dtype)

    def _check_image(self, x: Array) -> None:
        cfg, f = self.config, self.config.downsampling_factor
        if x.ndim != 4:
            raise ValueError(f"AutoencoderKL expects NHWC images [B, H, W, {cfg.in_channels}], got shape {x.shape}")
        if x.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"AutoencoderKL expects {cfg.in_channels} image channels (NHWC, channels last), got shape {x.shape}"
            )
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"image size {x.shape[1]}×{x.shape[2]} is not divisible by the downsampling factor f={f} "
                f"(= 2^(levels−1) for block_out_channels={cfg.block_out_channels}); pad or resize the images"
            )

    def _check_latent(self, z: Array) -> None:
        cfg = self.config
        if z.ndim != 4 or z.shape[-1] != cfg.latent_channels:
            raise ValueError(f"AutoencoderKL expects latents [B, h, w, {cfg.latent_channels}] (NHWC), got shape {z.shape}")

    def encode(self, x: Array) -> DiagonalGaussian:
        self._check_image(x)
        moments = self.encoder(x.astype(self.config.dtype))  # [B, H/f, W/f, 2·latent]
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, z: Array) -> Array:
        self._check_latent(z)
        z = z.astype(self.config.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)  # [B, h, w, latent]
        return self.decoder(z).astype(jnp.float32)  # [B, H, W, out_channels]

    def __call__(self, x: Array, key: Array | None = None) -> tuple[Array, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z), posterior

    # The only place where the latent scaling is applied.
    def encode_latents(self, x: Array, key: Array | None = None) -> Array:
        """Images → the diffusion model's latents: scaling_factor · (z − shift_factor), z ~ q(z|x) (the mode if key is None)."""
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        shift = self.config.shift_factor or 0.0
        return self.config.scaling_factor * (z - shift)

    def decode_latents(self, latents: Array) -> Array:
        """The diffusion model's latents → images: decode(latents / scaling_factor + shift_factor)."""
        shift = self.config.shift_factor or 0.0
        return self.decode(latents / self.config.scaling_factor + shift)
