"""A normalizing flow: RealNVP's multi-scale architecture (Dinh et al. 2017) with Glow's pieces (Kingma & Dhariwal 2018).

A flow is an invertible map f: x ↦ z built from layers whose Jacobian determinants are cheap, so the exact
log-likelihood follows from the change of variables (``objectives.flow_log_likelihood``, RealNVP Eqs. 2–3)

    log p_X(x) = log p_Z(f(x)) + Σ_l log |det ∂h_l/∂h_{l−1}|,      h_0 = x, h_L = z,

and sampling is inversion: z ~ p_Z, x = f⁻¹(z). Every layer here is a Flax module whose ``forward(x)``
returns ``(h, logdet)`` (logdet [B], its own term of the sum) and whose ``inverse(h)`` returns x; both are
``__call__(x, reverse=False | True)``.

=====================  =======================================================================================
layer                  forward h = ·(x)                                              log |det J| per example
=====================  =======================================================================================
``ActNorm``            (x + b) ⊙ exp(log s), per channel; data-dependent init         H·W·Σ_c log s_c
                       (Glow §3.1, Table 1)
``InvertibleConv1x1``  W x at every pixel, W = P L (U + diag(s)) (Glow §3.2, Eq. 10)  H·W·Σ_c log |s_c|
``AffineCoupling``     b⊙x + (1−b)⊙(x⊙exp(s(b⊙x)) + t(b⊙x)) (RealNVP Eq. 9),         Σ (1−b)⊙s(b⊙x)
                       s = scale ⊙ tanh(ŝ); mask b checkerboard or channel (Fig. 3)
``Squeeze``            [H, W, C] → [H/2, W/2, 4C] (RealNVP §3.6, Fig. 3)             0
``Split``              factor out half of the channels (RealNVP §3.6, Fig. 4)         0
=====================  =======================================================================================

``Flow`` (RealNVP §3.6): at each of ``num_levels`` scales, ``num_checkerboard`` checkerboard couplings (each
after an actnorm), a squeeze, then ``num_steps`` Glow steps [actnorm → 1×1 conv → channel coupling], and
(except at the last scale) half of the channels are factored out as that level's latent z_l. For 16×16×1
digits and 3 levels: z_0 [8, 8, 2], z_1 [4, 4, 4], z_2 [2, 2, 16] (256 numbers, as many as pixels). Each
level's prior is a learned diagonal Gaussian p(z_l) = N(μ_l, diag σ_l²) (zero-initialised: N(0, I) at the
start; Glow's prior conditioned on the kept half is not implemented). Sampling with a temperature T draws
z_l = μ_l + T σ_l ε (Glow §5: T < 1 trades diversity for cleaner samples).

Arrays are NHWC; the flow models y ∈ [−1, 1] (dequantised images, ``objectives.dequantize``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ddpm_jax.objectives import flow_log_likelihood, gaussian_log_density

Array = jax.Array
MASKS = ("checkerboard", "channel")


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """The multi-scale flow. Defaults: 16×16 digits, 3 scales (two factor-outs)."""

    image_shape: tuple[int, int, int] = (16, 16, 1)  # H, W, C
    num_levels: int = 3  # scales: one squeeze each, so H and W must be divisible by 2^num_levels
    num_checkerboard: int = 2  # checkerboard couplings before each squeeze (RealNVP: 3)
    num_steps: int = 4  # Glow steps (actnorm, 1×1 conv, channel coupling) after each squeeze
    hidden_channels: int = 64  # width of each coupling's s, t network


def check_flow_config(config: FlowConfig) -> None:
    """A one-line ValueError for a config the flow cannot build (the squeezes must divide the image)."""
    h, w, c = config.image_shape
    if config.num_levels < 1:
        raise ValueError(f"model.num_levels={config.num_levels}: the flow needs at least one scale")
    factor = 2 ** config.num_levels
    if h % factor or w % factor:
        raise ValueError(f"an image of {h}×{w} cannot be squeezed {config.num_levels} times (model.num_levels): "
                         f"each squeeze halves H and W, so they must be divisible by {factor}; change data.image_size "
                         f"or model.num_levels")
    if min(config.num_checkerboard, config.num_steps) < 0 or config.hidden_channels < 1:
        raise ValueError("model.num_checkerboard and model.num_steps must be ≥ 0 and model.hidden_channels ≥ 1")


def latent_shapes(config: FlowConfig) -> list[tuple[int, int, int]]:
    """The shape [h, w, c] of each level's latent z_l (the factored-out halves, then the last level's output)."""
    check_flow_config(config)
    h, w, c = config.image_shape
    shapes = []
    for level in range(config.num_levels):
        h, w, c = h // 2, w // 2, c * 4  # squeeze
        if level < config.num_levels - 1:
            shapes.append((h, w, c // 2))  # factored out
            c = c // 2
    return [*shapes, (h, w, c)]


class Bijection(nn.Module):
    """A flow layer: ``__call__(x, reverse=False) -> (h, logdet)``; ``forward`` and ``inverse`` name the two ways."""

    def forward(self, x: Array) -> tuple[Array, Array]:
        """(h, log |det ∂h/∂x|) with logdet [B]."""
        return self(x)

    def inverse(self, h: Array) -> Array:
        """x with forward(x) = h."""
        return self(h, reverse=True)[0]


def _per_example(value: Array, x: Array) -> Array:
    return jnp.broadcast_to(value, x.shape[:1])  # [] → [B]


class ActNorm(Bijection):
    """Activation normalisation (Glow §3.1, Table 1): h = (x + b) ⊙ exp(log s), b and log s per channel.

    Data-dependent initialisation: at ``init`` the batch given sets b = −mean(x) and log s = −log std(x) over
    (batch, H, W), so the first batch leaves with zero mean and unit variance per channel; afterwards b and
    log s are ordinary parameters. log |det J| = H · W · Σ_c log s_c.
    """

    @nn.compact
    def __call__(self, x: Array, reverse: bool = False) -> tuple[Array, Array]:  # x [B, H, W, C]
        axes = tuple(range(x.ndim - 1))
        bias = self.param("bias", lambda _: -jnp.mean(x, axes))                         # b [C]
        logs = self.param("logs", lambda _: -jnp.log(jnp.std(x, axes) + 1e-6))          # log s [C]
        logdet = _per_example(math.prod(x.shape[1:-1]) * jnp.sum(logs), x)
        if reverse:
            return x * jnp.exp(-logs) - bias, -logdet
        return (x + bias) * jnp.exp(logs), logdet


class InvertibleConv1x1(Bijection):
    """The invertible 1×1 convolution, LU-decomposed (Glow §3.2, Eqs. 9–10): h = W x at every pixel,

        W = P L (U + diag(s)),       log |det W| = Σ_c log |s_c|,       log |det J| = H · W · log |det W|

    P is a fixed permutation, L lower triangular with ones on the diagonal, U strictly upper triangular. W
    starts as a random rotation (log |det W| = 0) decomposed once at init. P and sign(s) are fixed (Glow:
    "P remains fixed"): they are stored with the parameters but used under ``stop_gradient``, so their
    gradients are zero and Adam never moves them. log |s| is the parameter ``log_s``.
    """

    @nn.compact
    def __call__(self, x: Array, reverse: bool = False) -> tuple[Array, Array]:  # x [B, H, W, C]
        c = x.shape[-1]
        p = l_init = u_init = jnp.eye(c, dtype=x.dtype)  # placeholders: Flax checks the shapes at apply time
        if self.is_initializing():
            rotation = jnp.linalg.qr(jax.random.normal(self.make_rng("params"), (c, c)))[0]  # [C, C]
            p, l_init, u_init = jax.scipy.linalg.lu(rotation)                                 # rotation = P L U
        s_init = jnp.diag(u_init)
        P = lax.stop_gradient(self.param("P", lambda _: p))                                   # [C, C]
        sign_s = lax.stop_gradient(self.param("sign_s", lambda _: jnp.sign(s_init)))          # [C]
        L = self.param("L", lambda _: l_init)                                                  # [C, C]
        U = self.param("U", lambda _: jnp.triu(u_init, 1))                                     # [C, C]
        log_s = self.param("log_s", lambda _: jnp.log(jnp.abs(s_init)))                        # [C]
        eye = jnp.eye(c, dtype=x.dtype)
        W = P @ (jnp.tril(L, -1) + eye) @ (jnp.triu(U, 1) + jnp.diag(sign_s * jnp.exp(log_s)))  # [C_out, C_in]
        logdet = _per_example(math.prod(x.shape[1:-1]) * jnp.sum(log_s), x)
        if reverse:
            return jnp.einsum("...i,ji->...j", x, jnp.linalg.inv(W)), -logdet
        return jnp.einsum("...i,ji->...j", x, W), logdet


def coupling_mask(shape: Sequence[int], kind: str, parity: int) -> Array:
    """The binary mask b [H, W, C] of a coupling (RealNVP Fig. 3): 1 = passed through, conditions s and t.

    "checkerboard": b = 1 where (h + w + parity) is even; "channel": b = 1 on the first half of the channels
    (parity 0) or the second (parity 1), which needs an even channel count.
    """
    h, w, c = shape
    if kind == "checkerboard":
        grid = (jnp.arange(h)[:, None] + jnp.arange(w)[None, :] + parity) % 2 == 0        # [H, W]
        return jnp.broadcast_to(grid[:, :, None], (h, w, c)).astype(jnp.float32)
    if kind == "channel":
        if c % 2:
            raise ValueError(f"a channel-mask coupling splits the channels in half, but the input has C={c} "
                             "(odd); squeeze first (4·C channels) or use the checkerboard mask")
        first = jnp.arange(c) < c // 2                                                      # [C]
        keep = first if parity % 2 == 0 else ~first
        return jnp.broadcast_to(keep, (h, w, c)).astype(jnp.float32)
    raise ValueError(f"coupling mask must be one of {MASKS}, got {kind!r}")


class AffineCoupling(Bijection):
    """The masked affine coupling layer (RealNVP §3.3–3.4, Eqs. 4–9):

        h = b ⊙ x + (1 − b) ⊙ ( x ⊙ exp(s(b ⊙ x)) + t(b ⊙ x) )                 (Eq. 9)
        x = b ⊙ h + (1 − b) ⊙ ( (h − t(b ⊙ h)) ⊙ exp(−s(b ⊙ h)) )              (b ⊙ h = b ⊙ x)
        log |det J| = Σ_{h,w,c} (1 − b) ⊙ s(b ⊙ x)                              (the Jacobian is triangular)

    s, t come from one small conv net of b ⊙ x (and b): 3×3 conv → ReLU → 1×1 conv → ReLU → 3×3 conv to 2C
    channels, the last conv zero-initialised so the layer starts as the identity (Glow §3.3). The scale is
    RealNVP's s = scale ⊙ tanh(ŝ) with a learned per-channel ``scale``, which bounds |s| early in training.
    """

    mask: str = "checkerboard"
    parity: int = 0
    hidden_channels: int = 64

    @nn.compact
    def __call__(self, x: Array, reverse: bool = False) -> tuple[Array, Array]:  # x [B, H, W, C]
        c = x.shape[-1]
        b = coupling_mask(x.shape[1:], self.mask, self.parity)                                 # [H, W, C]
        net_in = jnp.concatenate([b * x, jnp.broadcast_to(b[..., :1], x.shape[:-1] + (1,))], -1)  # [B, H, W, C+1]
        hid = nn.relu(nn.Conv(self.hidden_channels, (3, 3), name="conv_in")(net_in))
        hid = nn.relu(nn.Conv(self.hidden_channels, (1, 1), name="conv_hidden")(hid))
        out = nn.Conv(2 * c, (3, 3), kernel_init=nn.initializers.zeros, name="conv_out")(hid)     # [B, H, W, 2C]
        s_hat, t = jnp.split(out, 2, axis=-1)
        scale = self.param("scale", nn.initializers.ones, (c,))
        s = (1.0 - b) * scale * jnp.tanh(s_hat)                                                # [B, H, W, C]
        t = (1.0 - b) * t
        logdet = jnp.sum(s, axis=(1, 2, 3))                                                     # [B]
        if reverse:
            return (x - t) * jnp.exp(-s), -logdet
        return x * jnp.exp(s) + t, logdet


def squeeze(x: Array) -> Array:
    """[B, H, W, C] → [B, H/2, W/2, 4C]: each 2×2 block of pixels becomes 4 channels (RealNVP §3.6)."""
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"squeeze halves H and W, but the input is {h}×{w}; use an image size divisible by "
                         "2^num_levels")
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)  # [B, H/2, W/2, 2, 2, C]
    return x.reshape(b, h // 2, w // 2, 4 * c)


def unsqueeze(x: Array) -> Array:
    """The inverse of :func:`squeeze`: [B, H, W, 4C] → [B, 2H, 2W, C]."""
    b, h, w, c4 = x.shape
    x = x.reshape(b, h, w, 2, 2, c4 // 4).transpose(0, 1, 3, 2, 4, 5)      # [B, H, 2, W, 2, C]
    return x.reshape(b, 2 * h, 2 * w, c4 // 4)


class Squeeze(Bijection):
    """:func:`squeeze` as a layer (a permutation: log |det J| = 0)."""

    def __call__(self, x: Array, reverse: bool = False) -> tuple[Array, Array]:
        return (unsqueeze(x) if reverse else squeeze(x)), _per_example(0.0, x)


def split(h: Array) -> tuple[Array, Array]:
    """Factor-out (RealNVP §3.6): [B, H, W, C] → (kept [B, H, W, C/2], z [B, H, W, C/2]) by channels."""
    c = h.shape[-1]
    if c % 2:
        raise ValueError(f"factor-out splits the channels in half, but the input has C={c} (odd)")
    return h[..., : c // 2], h[..., c // 2:]


class Flow(nn.Module):
    """The multi-scale flow of the module docstring. ``init`` it with a data batch (``log_likelihood``):
    the actnorms initialise from it."""

    config: FlowConfig

    def setup(self) -> None:
        cfg = self.config
        check_flow_config(cfg)
        layers: list[nn.Module | str] = []
        for level in range(cfg.num_levels):
            for k in range(cfg.num_checkerboard):
                layers += [ActNorm(), AffineCoupling("checkerboard", k % 2, cfg.hidden_channels)]
            layers.append(Squeeze())
            for k in range(cfg.num_steps):
                layers += [ActNorm(), InvertibleConv1x1(), AffineCoupling("channel", k % 2, cfg.hidden_channels)]
            if level < cfg.num_levels - 1:
                layers.append("split")
        self.layers = [layer for layer in layers if layer != "split"]
        self.plan = tuple("split" if layer == "split" else "layer" for layer in layers)
        shapes = latent_shapes(cfg)
        self.prior_mean = [self.param(f"prior_mean_{l}", nn.initializers.zeros, s) for l, s in enumerate(shapes)]
        self.prior_logs = [self.param(f"prior_logs_{l}", nn.initializers.zeros, s) for l, s in enumerate(shapes)]

    def forward(self, x: Array) -> tuple[tuple[Array, ...], Array]:
        """x [B, H, W, C] → ((z_0, …, z_{L−1}), log |det ∂(z_0, …, z_{L−1})/∂x| [B])."""
        h, logdet, zs, layers = x, jnp.zeros(x.shape[:1], x.dtype), [], iter(self.layers)
        for kind in self.plan:
            if kind == "split":
                h, z = split(h)
                zs.append(z)
            else:
                h, term = next(layers)(h)
                logdet = logdet + term
        return (*zs, h), logdet

    def inverse(self, zs: Sequence[Array]) -> Array:
        """(z_0, …, z_{L−1}) → x: the layers in reverse order, each inverted."""
        zs = list(zs)
        h, layers = zs.pop(), list(self.layers)
        for kind in reversed(self.plan):
            if kind == "split":
                h = jnp.concatenate([h, zs.pop()], axis=-1)
            else:
                h, _ = layers.pop()(h, reverse=True)
        return h

    def prior_log_prob(self, zs: Sequence[Array]) -> Array:
        """log p_Z(z) = Σ_l log N(z_l; μ_l, diag σ_l²), [B]."""
        return sum(gaussian_log_density(z, m, s) for z, m, s in zip(zs, self.prior_mean, self.prior_logs))

    def log_likelihood(self, x: Array) -> Array:
        """log p_X(x) [B] in nats by the change of variables (``objectives.flow_log_likelihood``)."""
        zs, logdet = self.forward(x)
        return flow_log_likelihood(self.prior_log_prob(zs), logdet)

    def sample(self, eps: Sequence[Array], temperature: float | Array = 1.0) -> Array:
        """x = f⁻¹(z), z_l = μ_l + T · σ_l ⊙ ε_l; ``eps`` are standard normal [B, *latent_shapes(config)[l]]."""
        zs = [m + temperature * jnp.exp(s) * e for e, m, s in zip(eps, self.prior_mean, self.prior_logs)]
        return self.inverse(zs)
