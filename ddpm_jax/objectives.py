"""The objectives of the lecture's other families, as pure functions of arrays (the DDPM's are in diffusion.py).

Each function is one equation, its paper and number in the docstring; the trainers (``training/``) put
them together with their networks (``models/``). docs/equations.md maps every one to its test.

=====================================  ==========================================================================
family                                 equations here
=====================================  ==========================================================================
VAE (Kingma & Welling 2014)            ``reparameterize`` (Eq. 10), ``gaussian_kl`` (App. B),
                                       ``bernoulli_log_likelihood`` / ``gaussian_log_likelihood`` (App. C),
                                       ``elbo`` (Eq. 3 / SGVB Eq. 10)
LDM autoencoder (Rombach et al. 2022;  ``pixel_loss`` (L1/L2), ``perceptual_distance`` (LPIPS, Zhang et al. 2018 Eq. 1),
Esser et al. 2021)                     ``hinge_d_loss`` / ``hinge_g_loss`` (hinge GAN), ``adaptive_weight`` (Esser Eq. 7),
                                       ``psnr`` (the held-out metric)
CLIP (Radford et al. 2021)             ``contrastive_logits`` (Fig. 3), ``clip_loss`` (symmetric InfoNCE, §2.3)
Normalizing flows (RealNVP, Dinh et    ``dequantize`` (uniform dequantisation, Glow Eq. 2), ``gaussian_log_density`` (the
al. 2017; Glow, Kingma & Dhariwal      prior), ``flow_log_likelihood`` (change of variables, RealNVP Eq. 3 / Glow Eq. 7),
2018)                                  ``dequantized_bits_per_dim`` (bits/dim of the 8-bit data, Glow Eq. 2's constant)
GAN (Goodfellow et al. 2014)           ``gan_value`` (Eq. 1), ``optimal_discriminator`` (Prop. 1), ``gan_d_loss``
                                       (−Eq. 1), ``minimax_g_loss`` (Eq. 1's G side), ``non_saturating_g_loss``
                                       (§3) and the two losses' logit gradients; the hinge pair above;
                                       ``GAN_LOSSES`` names the (L_D, L_G) pairs the trainer can use
=====================================  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

Array = jax.Array
PyTree = Any
LIKELIHOODS = ("bernoulli", "gaussian")
RECONSTRUCTION_LOSSES = ("l1", "l2")


# ================================================================================================
# The VAE: the evidence lower bound, one function per term
# ================================================================================================

def sum_flat(a: Array) -> Array:
    """Σ over every axis but the batch axis: [B, ...] → [B] (a per-example total, as the ELBO needs)."""
    return a.reshape(a.shape[0], -1).sum(axis=-1)  # [B, ...] → [B]


def reparameterize(mu: Array, logvar: Array, key: Array) -> Array:
    """The reparameterisation trick (K&W §2.4, Eq. 10 with the Gaussian of Appendix C.2).

        z = μ + σ ⊙ ε,    ε ~ N(0, I),    σ = exp(½ log σ²)

    z has the law N(μ, diag σ²), but the randomness sits in ε, which does not depend on (μ, σ):
    ∇_{μ,σ} E[f(z)] = E[∇_{μ,σ} f(μ + σ ⊙ ε)], so gradients flow through the sample.

    Args:
      mu, logvar: [..., D] mean and log-variance of q_φ(z|x).
      key: PRNG key for ε.
    Returns:
      z, same shape as ``mu``.
    """
    eps = jax.random.normal(key, mu.shape, mu.dtype)
    return mu + jnp.exp(0.5 * logvar) * eps


def gaussian_kl(mu: Array, logvar: Array) -> Array:
    """Closed-form KL(N(μ, diag σ²) ‖ N(0, I)) (K&W Appendix B), summed over all but the batch axis.

        KL = −½ Σ_j (1 + log σ_j² − μ_j² − σ_j²)

    Args:
      mu, logvar: [B, ...].
    Returns:
      [B] KL in nats.
    """
    return -0.5 * sum_flat(1.0 + logvar - mu**2 - jnp.exp(logvar))


def bernoulli_log_likelihood(x: Array, logits: Array) -> Array:
    """log p_θ(x|z) for a Bernoulli decoder (K&W Appendix C.1), summed over pixels.

        log p(x|z) = Σ_i x_i log p_i + (1 − x_i) log(1 − p_i),    p = sigmoid(logits)

    computed stably as x·logits − softplus(logits). ``x`` lies in [0, 1] (grey levels are
    allowed, as is usual for MNIST).

    Returns:
      [B] log-likelihood in nats.
    """
    return sum_flat(x * logits - jax.nn.softplus(logits))


def gaussian_log_likelihood(x: Array, mean: Array, sigma: float | Array = 1.0) -> Array:
    """log p_θ(x|z) for a Gaussian decoder N(x; mean, σ² I) (K&W Appendix C.2), summed over pixels.

        log p(x|z) = −½ Σ_i [ (x_i − mean_i)² / σ² + log(2π σ²) ]

    With fixed σ this is −‖x − mean‖² / (2σ²) + const: the reconstruction term becomes an L2 loss
    whose weight against the KL is set by σ.

    Returns:
      [B] log-likelihood in nats.
    """
    var = jnp.asarray(sigma, x.dtype) ** 2
    return -0.5 * sum_flat((x - mean) ** 2 / var + jnp.log(2.0 * jnp.pi * var))


class ElboTerms(NamedTuple):
    """Per-example terms of the ELBO, each [B], in nats: ``elbo = reconstruction − kl``."""

    elbo: Array
    reconstruction: Array  # single-sample estimate of E_q[log p_θ(x|z)]
    kl: Array  # KL(q_φ(z|x) ‖ N(0, I)), closed form


def elbo(
    x: Array,
    decoder_output: Array,
    mu: Array,
    logvar: Array,
    *,
    likelihood: str = "bernoulli",
    sigma: float = 1.0,
) -> ElboTerms:
    """The ELBO with a one-sample reconstruction term and a closed-form KL (K&W Eq. 10, the "SGVB B" estimator).

        L(x) ≈ log p_θ(x | z)  −  KL(N(μ, diag σ²) ‖ N(0, I)),    z = μ + σ ⊙ ε

    Args:
      x: images [B, H, W, C] in [−1, 1] (the repository's convention). The Bernoulli likelihood
        models (x + 1) / 2 ∈ [0, 1]; the Gaussian one models x itself.
      decoder_output: p_θ(x|z)'s parameters at the sampled z: logits (Bernoulli) or mean (Gaussian).
      mu, logvar: q_φ(z|x)'s parameters.
      likelihood: "bernoulli" or "gaussian".
      sigma: the Gaussian decoder's fixed standard deviation (in [−1, 1] image units).
    """
    if likelihood == "bernoulli":
        reconstruction = bernoulli_log_likelihood((x + 1.0) / 2.0, decoder_output)
    elif likelihood == "gaussian":
        reconstruction = gaussian_log_likelihood(x, decoder_output, sigma)
    else:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    kl = gaussian_kl(mu, logvar)
    return ElboTerms(elbo=reconstruction - kl, reconstruction=reconstruction, kl=kl)


# ================================================================================================
# LDM's autoencoder: reconstruction, perceptual distance, the hinge GAN and its adaptive weight
# ================================================================================================

def psnr(x: Array, y: Array) -> Array:
    """Peak signal-to-noise ratio per image, [B], in dB, for images in [−1, 1] (peak-to-peak range 2).

        PSNR = 10 log₁₀(2² / mean((x − y)²)),   the same number as 10 log₁₀(1 / MSE) on [0, 1] images.
    """
    mse = jnp.mean((x - y) ** 2, axis=tuple(range(1, x.ndim)))  # [B]
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def pixel_loss(x: Array, recon: Array, kind: str = "l1") -> Array:
    """|x − x̂| ("l1", LDM's choice) or (x − x̂)² ("l2") per pixel, same shape as x."""
    if kind == "l1":
        return jnp.abs(x - recon)
    if kind == "l2":
        return (x - recon) ** 2
    raise ValueError(f"loss.reconstruction must be one of {RECONSTRUCTION_LOSSES}, got {kind!r}")


def normalize_channels(features: Array, eps: float = 1e-10) -> Array:
    """fˡ / ‖fˡ‖₂ over the channel axis, at every position (LPIPS's ``normalize_tensor``)."""
    return features / (jnp.sqrt(jnp.sum(features**2, axis=-1, keepdims=True)) + eps)


def perceptual_distance(features_x: Sequence[Array], features_y: Sequence[Array]) -> Array:
    """LPIPS-style distance, [B] (Zhang et al. 2018, Eq. 1 with uniform weights w_l = 1/√C_l).

        d(x, y) = Σ_l mean_{h,w} mean_c ( f̂ˡ(x)_{hwc} − f̂ˡ(y)_{hwc} )²

    Args:
      features_x, features_y: the feature maps [B, h_l, w_l, C_l] of the two images, layer by layer.
    """
    if len(features_x) != len(features_y) or not features_x:
        raise ValueError("perceptual_distance needs the same, non-empty list of feature maps for both images")
    total = 0.0
    for fx, fy in zip(features_x, features_y):
        diff = (normalize_channels(fx) - normalize_channels(fy)) ** 2  # [B, h, w, C]
        total = total + jnp.mean(diff, axis=(1, 2, 3))  # [B]
    return total


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
    """The discriminator's hinge loss (Lim & Ye 2017; taming's ``hinge_d_loss``), a scalar.

        L_D = ½ [ mean(relu(1 − D(x))) + mean(relu(1 + D(x̂))) ]

    Zero once real logits are ≥ 1 and fake ones ≤ −1: a confident discriminator stops being pushed.
    """
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake: Array) -> Array:
    """The generator's (here: the decoder's) side of the hinge GAN, a scalar: L_G = −mean D(x̂)."""
    return -jnp.mean(logits_fake)


def adaptive_weight(grad_rec: PyTree, grad_gan: PyTree, delta: float = 1e-4, max_weight: float = 1e4) -> Array:
    """The adaptive GAN weight of Esser et al. 2021, Eq. 7, clipped and with its gradient stopped (taming).

        λ = ‖∇_{G_L}[L_rec]‖ / (‖∇_{G_L}[L_GAN]‖ + δ),   clipped to [0, max_weight]

    Args:
      grad_rec, grad_gan: the gradients of the reconstruction loss and of the GAN (generator) loss with
        respect to the decoder's last layer G_L (arrays or pytrees; ‖·‖ is the global L2 norm).
      delta: δ (10⁻⁶ in the paper, 10⁻⁴ in taming's and LDM's code, used here).
    """
    ratio = optax.tree.norm(grad_rec) / (optax.tree.norm(grad_gan) + delta)
    return lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight))


# ================================================================================================
# CLIP: the symmetric contrastive loss
# ================================================================================================

MAX_LOGIT_SCALE = 100.0  # "clipped to prevent scaling the logits by more than 100" (§2.5)


def contrastive_logits(
    image_embeds: Array, text_embeds: Array, logit_scale: Array, max_logit_scale: float = MAX_LOGIT_SCALE
) -> Array:
    """Scaled cosine similarities of every image with every text (Figure 3):

        Î = I / ‖I‖,  T̂ = T / ‖T‖,   logits = min(exp(s), 100) · Î T̂ᵀ

    ``s = logit_scale`` is the learnable log inverse temperature (τ = 1/exp(s)).

    Args: image_embeds [N, E], text_embeds [M, E], logit_scale scalar.
    Returns: logits_per_image [N, M] (its transpose is logits_per_text).
    """
    image_embeds = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)
    text_embeds = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
    scale = jnp.minimum(jnp.exp(logit_scale), max_logit_scale)
    return scale * image_embeds @ text_embeds.T  # [N, M]


def clip_loss(
    image_embeds: Array, text_embeds: Array, logit_scale: Array, max_logit_scale: float = MAX_LOGIT_SCALE
) -> Array:
    """CLIP's symmetric contrastive (InfoNCE) loss (Radford et al. 2021, §2.3 and Figure 3).

    For a batch of N matching pairs, with L = contrastive_logits(I, T, s) ([N, N], row i = image i):

        loss = ½ · [ CE(L, labels) + CE(Lᵀ, labels) ],      labels = (0, 1, …, N−1)
        CE(L, y) = −1/N · Σ_i log softmax(L_i)_{y_i}

    i.e. each image must pick its caption among the N captions, and each caption its image among
    the N images. The temperature is learned through s = log(1/τ) (initialised to log(1/0.07)) and
    the scale exp(s) is clipped at 100; at the clip the gradient w.r.t. s is zero, which is what
    clipping the parameter after each step does.

    Args: image_embeds [N, E], text_embeds [N, E] (unnormalised), logit_scale scalar.
    Returns: scalar loss.
    """
    logits = contrastive_logits(image_embeds, text_embeds, logit_scale, max_logit_scale)  # [N, N]
    labels = jnp.arange(logits.shape[0])
    log_p_text_given_image = jax.nn.log_softmax(logits, axis=1)  # rows: images over texts
    log_p_image_given_text = jax.nn.log_softmax(logits, axis=0)  # columns: texts over images
    image_loss = -jnp.mean(log_p_text_given_image[labels, labels])
    text_loss = -jnp.mean(log_p_image_given_text[labels, labels])
    return (image_loss + text_loss) / 2


# ================================================================================================
# Normalizing flows (RealNVP, Dinh et al. 2017; Glow, Kingma & Dhariwal 2018)
# ================================================================================================

NUM_BINS = 256  # 8-bit images


def dequantize(x_uint8: Array, u: Array, num_bins: int = NUM_BINS) -> Array:
    """Uniform dequantisation, then the [−1, 1] scaling (Glow §2, Eq. 2; Theis et al. 2016).

        x̃ = (x + u) / 256 ∈ [0, 1),    u ~ U[0, 1)^D        (Glow: x̃ = x + u on the 256 levels)
        y  = 2 x̃ − 1 ∈ [−1, 1)                               (the library's image range)

    A continuous density p_Y fitted to y is then a bound on the discrete data's log-likelihood (see
    :func:`dequantized_bits_per_dim`).

    Args:
      x_uint8: [B, H, W, C] integer levels 0..num_bins−1 (any dtype).
      u: uniform noise of the same shape.
    Returns:
      y, float32 [B, H, W, C] in [−1, 1).
    """
    return 2.0 * (x_uint8.astype(jnp.float32) + u) / num_bins - 1.0


def gaussian_log_density(z: Array, mean: Array | float = 0.0, log_scale: Array | float = 0.0) -> Array:
    """log N(z; μ, diag σ²), σ = exp(log_scale), summed over all but the batch axis (the flow's prior p_Z).

        log p_Z(z) = −½ Σ_i [ log 2π + 2 log σ_i + (z_i − μ_i)² / σ_i² ]

    Returns:
      [B] in nats.
    """
    return -0.5 * sum_flat(jnp.log(2.0 * jnp.pi) + 2.0 * log_scale + (z - mean) ** 2 * jnp.exp(-2.0 * log_scale))


def flow_log_likelihood(log_pz: Array, logdet: Array) -> Array:
    """The exact log-likelihood of a flow by the change of variables (RealNVP Eqs. 2–3; Glow Eqs. 6–7).

        log p_X(x) = log p_Z(f(x)) + log |det ∂f(x)/∂xᵀ|
                   = log p_Z(z) + Σ_l log |det ∂h_l/∂h_{l−1}|,     h_0 = x, h_L = z

    The flow f is a composition of layers, so the log-determinant is accumulated layer by layer
    (``models/flow.py``: every layer's forward returns its own term).

    Args:
      log_pz: [B] log p_Z(f(x)).  logdet: [B] log |det J_f(x)|.
    Returns:
      [B] log p_X(x) in nats.
    """
    return log_pz + logdet


def dequantized_bits_per_dim(log_py: Array, num_dims: int, num_bins: int = NUM_BINS) -> Array:
    """Bits per dimension of 8-bit data from the density of its dequantised, [−1, 1]-scaled version.

    With y = 2 (x + u)/256 − 1 (:func:`dequantize`), w = x + u ∈ [0, 256)^D has the density
    p_W(w) = p_Y(y) · (2/256)^D (the affine map's Jacobian), and Jensen's inequality over u gives the
    discrete model P(x) = ∫_{[0,1)^D} p_W(x + u) du with

        −log P(x) ≤ E_u[ −log p_W(x + u) ] = E_u[ −log p_Y(y) ] + D · log(256/2)         (Glow Eq. 2's c)

        bits/dim = ( −log p_Y(y) / D + log(256/2) ) / log 2  = −log₂ p_Y(y) / D + 7

    (a uniform p_Y on [−1, 1]^D gives exactly 8 bits/dim). This is the scale of DDPM's bits/dim
    (its discretised decoder on the same [−1, 1] images) and of the VAE's.

    Args:
      log_py: [B] log p_Y(y) in nats.  num_dims: D = H·W·C.
    Returns:
      [B] bits/dim.
    """
    return (-log_py / num_dims + jnp.log(num_bins / 2.0)) / jnp.log(2.0)


# ================================================================================================
# GANs: the minimax game, its optimal discriminator, the generator's two losses
# ================================================================================================
#
# D outputs a logit l; D(x) = sigmoid(l). Everything is written with log_sigmoid, stably:
#     log D = log σ(l) = log_sigmoid(l),     log(1 − D) = log σ(−l) = log_sigmoid(−l).

def gan_value(logits_real: Array, logits_fake: Array) -> Array:
    """The minimax value V(D, G) of Goodfellow et al. 2014, Eq. 1, estimated by sample means, a scalar.

        V(D, G) = E_{x~p_data}[log D(x)] + E_{z~p_z}[log(1 − D(G(z)))]

    D maximises V, G minimises it. Its largest value over D is C(G) = −log 4 + 2·JSD(p_data ‖ p_g)
    (Theorem 1), so at p_g = p_data, where D* = ½ everywhere, V = 2 log ½ = −log 4.

    Args:
      logits_real: D's logits on data samples, any shape (all entries are averaged).
      logits_fake: D's logits on generated samples G(z), any shape.
    """
    return jnp.mean(jax.nn.log_sigmoid(logits_real)) + jnp.mean(jax.nn.log_sigmoid(-logits_fake))


def optimal_discriminator(p_data: Array, p_g: Array) -> Array:
    """The discriminator that maximises Eq. 1 for a fixed G (Goodfellow et al., Proposition 1), elementwise.

        D*_G(x) = p_data(x) / (p_data(x) + p_g(x))

    For each x, V's integrand a·log D + b·log(1 − D) (a = p_data(x), b = p_g(x)) is maximised at
    D = a / (a + b). Args: the two densities at the same points x, any (equal) shape.
    """
    return p_data / (p_data + p_g)


def gan_d_loss(logits_real: Array, logits_fake: Array) -> Array:
    """The discriminator's loss −V(D, G) (minimise it to maximise Eq. 1): binary cross-entropy, real = 1, fake = 0.

        L_D = −E[log D(x)] − E[log(1 − D(G(z)))] = mean softplus(−l_real) + mean softplus(l_fake)
    """
    return -gan_value(logits_real, logits_fake)


def minimax_g_loss(logits_fake: Array) -> Array:
    """The generator's side of Eq. 1 (the "saturating" loss), a scalar: L_G = E_z[log(1 − D(G(z)))].

    Its gradient per logit, d/dl log(1 − σ(l)) = −σ(l) = −D(G(z)) (:func:`minimax_g_logit_grad`), vanishes
    when D confidently rejects the fakes (D(G(z)) → 0), which is the case early in training: "Early in
    learning, when G is poor, D can reject samples with high confidence ... log(1 − D(G(z))) saturates" (§3).
    """
    return jnp.mean(jax.nn.log_sigmoid(-logits_fake))


def non_saturating_g_loss(logits_fake: Array) -> Array:
    """The non-saturating generator loss of Goodfellow et al. §3, a scalar: L_G = −E_z[log D(G(z))].

    "Rather than training G to minimize log(1 − D(G(z))) we can train G to maximize log D(G(z)). This
    objective function results in the same fixed point of the dynamics of G and D but provides much
    stronger gradients early in learning." Per logit, d/dl [−log σ(l)] = −(1 − D(G(z)))
    (:func:`non_saturating_g_logit_grad`): close to −1 exactly where the minimax loss's gradient is ≈ 0.
    """
    return -jnp.mean(jax.nn.log_sigmoid(logits_fake))


def minimax_g_logit_grad(logits_fake: Array) -> Array:
    """d/dl of log(1 − σ(l)) per example: −σ(l) = −D(G(z)) (the minimax G loss's gradient, before the 1/N)."""
    return -jax.nn.sigmoid(logits_fake)


def non_saturating_g_logit_grad(logits_fake: Array) -> Array:
    """d/dl of −log σ(l) per example: −(1 − σ(l)) = −(1 − D(G(z))) (the non-saturating loss's, before the 1/N)."""
    return -jax.nn.sigmoid(-logits_fake)


# The (L_D(logits_real, logits_fake), L_G(logits_fake)) pairs ``training/gan.py`` trains with (``loss.kind``).
GAN_LOSSES = {
    "non_saturating": (gan_d_loss, non_saturating_g_loss),  # Goodfellow §3; DCGAN's choice
    "minimax": (gan_d_loss, minimax_g_loss),  # Eq. 1 as written (saturates)
    "hinge": (hinge_d_loss, hinge_g_loss),  # Lim & Ye 2017, the loss the autoencoder's PatchGAN uses
}
