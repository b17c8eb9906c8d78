"""The autoencoder trainers: the lecture's Gaussian VAE and LDM's AutoencoderKL.

Both use the loop every trainer shares (``training.loop.run``: resume from the latest checkpoint, NaN stop,
metrics.jsonl + tqdm, orbax checkpoints, periodic hooks; the step is one ``jax.jit`` over the device
mesh, batch sharded on "data"). ``train(config, workdir)`` dispatches on ``config.model.kind``.

**Gaussian VAE** (``kind = "gaussian_vae"``, ``models/vae.py`` part 1). Minimise the negative ELBO
(Kingma & Welling 2014, Eq. 10) with Adam::

    loss(x) = −[ log p_θ(x | z) − KL(q_φ(z|x) ‖ N(0, I)) ],   z = μ_φ(x) + σ_φ(x) ⊙ ε

**AutoencoderKL** (``kind = "autoencoder_kl"``, ``models/vae.py`` part 2), trained as LDM trains its
"KL-reg." first stage (Rombach et al. 2022, §3 and Appendix G; the loss is taming-transformers'
``LPIPSWithDiscriminator``, Esser et al. 2021, Eqs. 6–7). With x̂ = D(z), z ~ q(z|x)::

    L_rec  = Σ_pixels [ |x − x̂|  (or (x − x̂)²)  +  w_p · d_perc(x, x̂) ]      per example, mean over the batch
    L_AE   = L_rec  +  w_KL · KL(q(z|x) ‖ N(0, I))  +  [s ≥ s_disc] · w_d · λ · L_G
    L_G    = −mean D_ψ(x̂)                                                       (hinge generator loss)
    λ      = ‖∇_{G_L} L_rec‖ / (‖∇_{G_L} L_G‖ + δ),  clipped to [0, 10⁴], no gradient   (Esser et al. Eq. 7)
    L_D    = [s ≥ s_disc] · ½ ( mean relu(1 − D_ψ(x)) + mean relu(1 + D_ψ(x̂)) )     (hinge loss)

G_L is the decoder's last layer (``decoder/conv_out/kernel``): λ balances the two gradients where they
meet the image, so the GAN term neither vanishes nor swamps the reconstruction. The perceptual distance
d_perc is added to every pixel's loss before the sum (as LDM does), so w_p is a per-pixel weight. Before
the discriminator start step s_disc the GAN terms are absent (and the discriminator is not run or updated;
``lax.cond`` picks the branch); LDM starts it late (step 50,001) so that the autoencoder first learns to
reconstruct. LDM also learns a scalar log-variance dividing L_rec; it is fixed at 0 here.

Two optimisers, each with its own optax state in :class:`AutoencoderState`: Adam for the autoencoder
(``params``, with optional EMA ``ema_params``) and Adam for the discriminator (``disc_params``); one
compiled step updates both (the discriminator sees the reconstructions of the same forward pass).

**Perceptual distance** ("LPIPS-style", Zhang et al. 2018, Eq. 1 with uniform channel weights)::

    d_perc(x, y) = Σ_l mean_{h,w} mean_c ( f̂ˡ(x) − f̂ˡ(y) )²,     f̂ˡ = fˡ / ‖fˡ‖₂ over channels

for the feature maps fˡ of a pluggable feature network ``feature_fn(images) -> [maps]``. LPIPS uses VGG
features with learned channel weights; those weights cannot be downloaded here, so the library ships two
offline choices (``loss.perceptual_network``): ``"random"``, a fixed random 3-layer conv network
(:class:`RandomConvFeatures`; random features still compare local structure rather than single pixels,
but they are a weak prior, documented as such), and ``"judge"``, the conv feature maps of the library's
MNIST judge CNN (``evaluation/judge.py``, trained once and cached; grayscale only). Pass any other
``feature_fn`` to :func:`train_autoencoder_kl`.

Outputs in ``workdir``: config.json, metrics.jsonl, loss.png, checkpoints/, reconstructions/step_N.png
(held-out originals in odd rows, their reconstructions below), eval.json; for the Gaussian VAE also
samples/step_N.png (decoded z ~ N(0, I)) and, for a 2-D latent, latent_map.png (decoded grid over the
latent plane, K&W Fig. 4) and latent_scatter.png (held-out digits' μ coloured by class). The
AutoencoderKL's eval.json holds the held-out reconstruction PSNR and the latent ``scaling_factor``
(1 / std of the latents, LDM's ``scale_by_std``); :func:`load_autoencoder` returns the model with it.

Config (``experiments/vae_mnist.py``, ``experiments/autoencoder_kl_mnist.py``)::

    data.name, image_size, channels, num_examples          as for diffusion (data.load_dataset)
    data.num_held_out       int    digits kept out of training (reconstruction grids, eval.json)
    model.kind              str    "gaussian_vae" | "autoencoder_kl"
    model.*                        GaussianVAEConfig fields (hidden_dims, latent_dim, likelihood, sigma;
                                   image_shape comes from data) | AutoencoderKLConfig fields
    loss.reconstruction     str    "l1" | "l2"                                   (autoencoder_kl)
    loss.kl_weight          float  w_KL (LDM: 1e-6)
    loss.perceptual_weight  float  w_p (LDM: 1.0); 0 = no perceptual term
    loss.perceptual_network str    "random" | "judge"
    loss.disc_weight        float  w_d (LDM: 0.5); 0 = no discriminator at all
    loss.disc_start         int    s_disc
    discriminator.ndf, n_layers, use_norm                 models/discriminator.py
    train.batch_size, num_steps, lr, warmup_steps, grad_clip, adam_b1, adam_b2, disc_lr,
          ema_decay (0 = none), ema_warmup, seed, log_every, ckpt_every, keep_checkpoints,
          sample_every (grids every N steps; 0 = only at the end), num_samples, parallel ("jit")
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from ddpm_jax import config as config_lib
from ddpm_jax import data as data_lib
from ddpm_jax import parallel, plotting
from ddpm_jax.evaluation import judge as judge_lib
from ddpm_jax.models.discriminator import NLayerDiscriminator, output_size
from ddpm_jax.models.vae import (
    AutoencoderKL,
    GaussianVAE,
    decoder_mean_image,
)
from ddpm_jax.objectives import (
    adaptive_weight,
    elbo,
    hinge_d_loss,
    hinge_g_loss,
    perceptual_distance,
    pixel_loss,
    psnr,
)
from ddpm_jax.training import loop
from ddpm_jax.training.loop import INIT_COMPILER_OPTIONS, ema_decay_at, ema_update, make_optimizer, split_held_out
from ddpm_jax.workdir import EVAL_FILENAME, autoencoder_kind, autoencoder_kl_config, gaussian_vae_config

PyTree = Any
Metrics = dict[str, jax.Array]
FeatureFn = Callable[[jax.Array], Sequence[jax.Array]]

PERCEPTUAL_NETWORKS = ("random", "judge")
LAST_LAYER = ("decoder", "conv_out", "kernel")  # G_L of Esser et al. Eq. 7


# ================================================================================================
# Feature networks for the perceptual term
# ================================================================================================


class RandomConvFeatures(nn.Module):
    """A fixed random conv network: [Conv3×3 → ReLU] ×3 with 2×2 average pooling between, He-normal weights.

    Returns the three ReLU feature maps. Never trained: a weak, dataset-free perceptual prior that
    compares local edge/blob structure at three scales instead of single pixels.
    """

    channels: tuple[int, ...] = (16, 32, 64)

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:  # x [B, H, W, C]
        features, h = [], x
        for i, c in enumerate(self.channels):
            if i:
                h = nn.avg_pool(h, (2, 2), strides=(2, 2))  # [B, H/2ⁱ, W/2ⁱ, ·]
            h = nn.relu(nn.Conv(c, (3, 3), kernel_init=nn.initializers.he_normal(), name=f"conv_{i}")(h))
            features.append(h)
        return features


def random_feature_fn(channels: int, seed: int = 0) -> FeatureFn:
    """``feature_fn`` of a :class:`RandomConvFeatures` network for ``channels``-channel images, weights from ``seed``."""
    net = RandomConvFeatures()
    params = jax.jit(net.init, compiler_options=INIT_COMPILER_OPTIONS)(jax.random.key(seed),
                                                                        jnp.zeros((1, 16, 16, channels)))["params"]
    return lambda images: net.apply({"params": params}, images)


def judge_feature_fn(image_size: int, seed: int = 0) -> FeatureFn:
    """``feature_fn`` of the MNIST judge CNN (``evaluation/judge.py``): its four conv layers' ReLU maps.

    Trains the judge once for ``image_size`` (~20 s on 2 cores) and caches it (see ``get_judge``).
    """
    judge = judge_lib.get_judge(image_size, seed)
    net = judge_lib.JudgeCNN()

    def feature_fn(images: jax.Array) -> list[jax.Array]:
        _, state = net.apply({"params": judge.params}, images,
                             capture_intermediates=lambda module, _: module.name is not None
                             and module.name.startswith("conv_"), mutable=["intermediates"])
        inter = state["intermediates"]
        return [jax.nn.relu(inter[name]["__call__"][0]) for name in sorted(inter) if name.startswith("conv_")]

    return feature_fn


def make_feature_fn(config: ml_collections.ConfigDict) -> FeatureFn | None:
    """The perceptual network named by ``config.loss.perceptual_network`` (None when its weight is 0)."""
    if not config.loss.get("perceptual_weight", 0.0):
        return None
    name = config.loss.get("perceptual_network", "random")
    if name == "random":
        return random_feature_fn(config.data.channels, config.train.seed)
    if name == "judge":
        if config.data.channels != 1:
            raise ValueError("loss.perceptual_network='judge' is the MNIST judge, for grayscale images "
                             f"(data.channels=1), but data.channels={config.data.channels}; use 'random'")
        return judge_feature_fn(config.data.image_size)
    raise ValueError(f"loss.perceptual_network must be one of {PERCEPTUAL_NETWORKS}, got {name!r}")


# ================================================================================================
# Configs → models, with the checks that give one-line errors
# ================================================================================================


def make_discriminator(config: ml_collections.ConfigDict) -> NLayerDiscriminator:
    """The PatchGAN of ``config.discriminator``, checked against the image size."""
    dc, size = config.discriminator, config.data.image_size
    if output_size(size, dc.n_layers) < 1:
        raise ValueError(f"discriminator.n_layers={dc.n_layers} is too deep for data.image_size={size} (it needs "
                         f"at least {3 * 2 ** dc.n_layers} pixels); use fewer layers")
    return NLayerDiscriminator(ndf=dc.ndf, n_layers=dc.n_layers, use_norm=dc.use_norm)


def validate_config(config: ml_collections.ConfigDict) -> str:
    """Every check that needs no data, so a bad config fails in a second with one line; returns the kind."""
    kind = autoencoder_kind(config)
    if config.train.get("parallel", "jit") != "jit":
        raise ValueError(f"train.parallel={config.train.parallel!r}: the autoencoder trainers run as one sharded "
                         "jit; use 'jit'")
    if int(config.data.get("num_held_out", 500)) < 1:
        raise ValueError(f"data.num_held_out must be at least 1, got {config.data.num_held_out}")
    if kind == "gaussian_vae":
        gaussian_vae_config(config)
        return kind
    autoencoder_kl_config(config)
    pixel_loss(jnp.zeros(()), jnp.zeros(()), config.loss.get("reconstruction", "l1"))
    if config.loss.get("perceptual_network", "random") not in PERCEPTUAL_NETWORKS:
        raise ValueError(f"loss.perceptual_network must be one of {PERCEPTUAL_NETWORKS}, "
                         f"got {config.loss.perceptual_network!r}")
    make_discriminator(config)
    return kind


# ================================================================================================
# Gaussian VAE: state and step
# ================================================================================================


def vae_loss(module: GaussianVAE, params: Any, x: jax.Array, key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Negative ELBO per example, averaged over the batch: the loss to minimise. Also returns the mean terms."""
    out, mu, logvar = module.apply({"params": params}, x, key)
    terms = elbo(x, out, mu, logvar, likelihood=module.config.likelihood, sigma=module.config.sigma)
    metrics = {name: value.mean() for name, value in terms._asdict().items()}
    return -metrics["elbo"], metrics


@flax.struct.dataclass
class VAEState:
    """What changes while the Gaussian VAE trains (a pytree; ``tx`` is code)."""

    step: jax.Array  # int32 []
    params: PyTree  # θ, φ
    ema_params: PyTree  # EMA of (θ, φ); = params when train.ema_decay = 0
    opt_state: optax.OptState
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def create_vae_state(module: GaussianVAE, tx: optax.GradientTransformation, key: jax.Array) -> VAEState:
    x = jnp.zeros((1, *module.config.image_shape), jnp.float32)  # [1, H, W, C]
    params = module.init(key, x, jax.random.key(0))["params"]
    return VAEState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=tx.init(params), tx=tx)


def make_vae_train_step(module: GaussianVAE, config: ml_collections.ConfigDict) -> Callable:
    """``train_step(state, batch [B, H, W, C], key) -> (state, metrics)``: one Adam step on −ELBO (K&W Eq. 10).

    ε of the reparameterisation comes from ``fold_in(key, step)``; metrics: loss (= −elbo), elbo,
    reconstruction (log p(x|z), nats), kl (nats), grad_norm, all means over the batch.
    """
    decay, warmup = float(config.train.get("ema_decay", 0.0)), bool(config.train.get("ema_warmup", False))

    def train_step(state: VAEState, batch: jax.Array, key: jax.Array) -> tuple[VAEState, Metrics]:
        step_key = jax.random.fold_in(key, state.step)
        (loss, terms), grads = jax.value_and_grad(vae_loss, argnums=1, has_aux=True)(module, state.params, batch,
                                                                                   step_key)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, ema_decay_at(state.step, decay, warmup))
        metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics

    return train_step


# ================================================================================================
# AutoencoderKL: state and step
# ================================================================================================


@flax.struct.dataclass
class AutoencoderState:
    """What changes while AutoencoderKL trains: the autoencoder and the discriminator, each with its own Adam."""

    step: jax.Array  # int32 []
    params: PyTree  # autoencoder
    ema_params: PyTree  # EMA of the autoencoder; = params when train.ema_decay = 0
    opt_state: optax.OptState
    disc_params: PyTree  # PatchGAN discriminator
    disc_opt_state: optax.OptState
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    disc_tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def create_autoencoder_state(model: AutoencoderKL, disc: NLayerDiscriminator, tx: optax.GradientTransformation,
                             disc_tx: optax.GradientTransformation, key: jax.Array,
                             image_shape: tuple[int, int, int]) -> AutoencoderState:
    ae_key, disc_key = jax.random.split(key)
    x = jnp.zeros((2, *image_shape), jnp.float32)  # [2, H, W, C]
    params = model.init(ae_key, x)["params"]
    disc_params = disc.init(disc_key, x)["params"]
    return AutoencoderState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                            opt_state=tx.init(params), disc_params=disc_params, disc_opt_state=disc_tx.init(disc_params),
                            tx=tx, disc_tx=disc_tx)


def _replace(tree: PyTree, path: Sequence[str], value: Any) -> PyTree:
    """A copy of the nested dict ``tree`` with ``tree[path[0]][path[1]]…`` set to ``value``."""
    if not path:
        return value
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}


def _get(tree: PyTree, path: Sequence[str]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


GAN_METRICS = ("g_loss", "adaptive_weight", "d_loss", "logits_real", "logits_fake", "disc_grad_norm")


def make_autoencoder_kl_train_step(model: AutoencoderKL, disc: NLayerDiscriminator, config: ml_collections.ConfigDict,
                                   feature_fn: FeatureFn | None = None) -> Callable:
    """``train_step(state, batch [B, H, W, C], key) -> (state, metrics)`` for LDM's autoencoder loss (module docstring).

    Metrics (batch means): loss (L_AE), rec_loss (Σ_pixels |x − x̂| or (x − x̂)²), perceptual (d_perc), kl,
    g_loss, adaptive_weight (w_d · λ), d_loss, logits_real, logits_fake, psnr (dB), grad_norm,
    disc_grad_norm; the GAN metrics are 0 before ``loss.disc_start``.
    """
    lc = config.loss
    kind = lc.get("reconstruction", "l1")
    pixel_loss(jnp.zeros(()), jnp.zeros(()), kind)  # a bad name fails here, not inside jit
    kl_weight = float(lc.get("kl_weight", 1e-6))
    perceptual_weight = float(lc.get("perceptual_weight", 0.0)) if feature_fn is not None else 0.0
    disc_weight = float(lc.get("disc_weight", 0.0))
    disc_start = int(lc.get("disc_start", 0))
    decay, warmup = float(config.train.get("ema_decay", 0.0)), bool(config.train.get("ema_warmup", False))

    def rec_terms(x: jax.Array, recon: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(L_rec, mean pixel part, mean perceptual part): L_rec = mean_B Σ_pixels [pixel + w_p · d_perc]."""
        pixel = jnp.sum(pixel_loss(x, recon, kind), axis=(1, 2, 3))  # [B]
        perceptual = jnp.zeros_like(pixel)
        if perceptual_weight:
            perceptual = perceptual_distance(feature_fn(x), feature_fn(recon))  # [B]
        num_pixels = np.prod(x.shape[1:])
        return jnp.mean(pixel + perceptual_weight * num_pixels * perceptual), jnp.mean(pixel), jnp.mean(perceptual)

    def logits(disc_params: PyTree, images: jax.Array) -> jax.Array:
        return disc.apply({"params": disc_params}, images)  # [B, h, w, 1]

    def autoencoder_loss(params: PyTree, disc_params: PyTree, x: jax.Array, key: jax.Array, use_gan: bool):
        def recon_from_last_layer(w: jax.Array):  # x̂ as a function of G_L, everything else fixed
            recon, posterior = model.apply({"params": _replace(params, LAST_LAYER, w)}, x, key)
            return recon, posterior

        last = _get(params, LAST_LAYER)
        if use_gan:  # keep the pull-back through G_L: ∇_{G_L} L = (∂x̂/∂G_L)ᵀ ∇_x̂ L
            recon, pullback, posterior = jax.vjp(recon_from_last_layer, last, has_aux=True)
        else:
            recon, posterior = recon_from_last_layer(last)
        rec_loss, pixel, perceptual = rec_terms(x, recon)
        kl = jnp.mean(posterior.kl())
        loss = rec_loss + kl_weight * kl
        metrics = {"rec_loss": pixel, "perceptual": perceptual, "kl": kl,
                   "psnr": jnp.mean(psnr(x, lax.stop_gradient(recon)))}
        if use_gan:
            g_loss = hinge_g_loss(logits(disc_params, recon))
            fixed = lax.stop_gradient(recon)
            grad_rec = pullback(jax.grad(lambda r: rec_terms(x, r)[0])(fixed))[0]  # ∇_{G_L} L_rec
            grad_gan = pullback(jax.grad(lambda r: hinge_g_loss(logits(disc_params, r)))(fixed))[0]  # ∇_{G_L} L_G
            weight = disc_weight * adaptive_weight(grad_rec, grad_gan)
            loss = loss + weight * g_loss
            metrics.update(g_loss=g_loss, adaptive_weight=weight)
        metrics["loss"] = loss
        return loss, (metrics, recon)

    def disc_loss(disc_params: PyTree, x: jax.Array, recon: jax.Array):
        real, fake = logits(disc_params, x), logits(disc_params, lax.stop_gradient(recon))
        return hinge_d_loss(real, fake), {"logits_real": jnp.mean(real), "logits_fake": jnp.mean(fake)}

    def body(state: AutoencoderState, x: jax.Array, key: jax.Array, use_gan: bool):
        step_key = jax.random.fold_in(key, state.step)
        loss_fn = functools.partial(autoencoder_loss, use_gan=use_gan)
        (_, (metrics, recon)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.disc_params, x,
                                                                                 step_key)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, ema_decay_at(state.step, decay, warmup))
        metrics["grad_norm"] = optax.tree.norm(grads)
        disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
        if use_gan:  # the discriminator's own Adam step on L_D, against this step's reconstructions
            (d_loss, d_metrics), d_grads = jax.value_and_grad(disc_loss, has_aux=True)(disc_params, x, recon)
            d_updates, disc_opt_state = state.disc_tx.update(d_grads, disc_opt_state, disc_params)
            disc_params = optax.apply_updates(disc_params, d_updates)
            metrics.update(d_loss=d_loss, disc_grad_norm=optax.tree.norm(d_grads), **d_metrics)
        for name in GAN_METRICS:
            metrics.setdefault(name, jnp.zeros((), jnp.float32))
        new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                            disc_params=disc_params, disc_opt_state=disc_opt_state)
        return new, metrics

    def train_step(state: AutoencoderState, batch: jax.Array, key: jax.Array) -> tuple[AutoencoderState, Metrics]:
        if not disc_weight or disc_start <= 0:  # no GAN, or the GAN from step 0: one branch, nothing to choose
            return body(state, batch, key, bool(disc_weight))  # (lax.cond would compile both: about twice the time)
        return lax.cond(state.step >= disc_start, functools.partial(body, use_gan=True),
                        functools.partial(body, use_gan=False), state, batch, key)

    return train_step


# ================================================================================================
# Evaluation helpers (also used by notebooks and the latent-diffusion code)
# ================================================================================================


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct_batch(model: AutoencoderKL, params: PyTree, x: jax.Array) -> jax.Array:
    return model.apply({"params": params}, x)[0]  # D(mode of q(z|x)), [B, H, W, C]


@functools.partial(jax.jit, static_argnums=0)
def _sample_latents(model: AutoencoderKL, params: PyTree, x: jax.Array, key: jax.Array) -> jax.Array:
    return model.apply({"params": params}, x, method=AutoencoderKL.encode).sample(key)  # z ~ q(z|x), [B, h, w, c]


def reconstruct(model: AutoencoderKL, params: PyTree, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """D(mode of q(z|x)): deterministic reconstructions [N, H, W, C] of images [N, H, W, C]."""
    return np.concatenate([np.asarray(_reconstruct_batch(model, params, jnp.asarray(images[i:i + batch_size])))
                           for i in range(0, len(images), batch_size)])


def reconstruction_psnr(model: AutoencoderKL, params: PyTree, images: np.ndarray, batch_size: int = 250) -> float:
    """Mean per-image PSNR (dB) of :func:`reconstruct` against ``images``."""
    recon = reconstruct(model, params, images, batch_size)
    return float(np.mean(np.asarray(jax.jit(psnr)(images, recon))))


def measure_scaling_factor(model: AutoencoderKL, params: PyTree, images: np.ndarray, key: jax.Array,
                           batch_size: int = 250) -> tuple[float, np.ndarray]:
    """LDM's ``scale_by_std``: 1 / std of latents z ~ q(z|x) over ``images`` (all elements together).

    Returns (scaling_factor, all the latents [N, h, w, c]). The diffusion model then sees
    scaling_factor · z, of unit variance, which the noise schedule was designed for.
    """
    latents = np.concatenate([np.asarray(_sample_latents(model, params, jnp.asarray(images[i:i + batch_size]),
                                                         jax.random.fold_in(key, i)))
                              for i in range(0, len(images), batch_size)])
    return float(1.0 / latents.std()), latents


# ================================================================================================
# Figures
# ================================================================================================


def save_reconstruction_grid(originals: np.ndarray, recons: np.ndarray, path: str | os.PathLike,
                             nrow: int = 8) -> pathlib.Path:
    """Rows of ``nrow`` originals, each followed by the row of their reconstructions."""
    n = (len(originals) // nrow) * nrow or len(originals)
    nrow = min(nrow, n)
    rows = []
    for start in range(0, n, nrow):
        rows += [originals[start:start + nrow], recons[start:start + nrow]]
    return plotting.save_image_grid(np.concatenate(rows), path, nrow=nrow)


def latent_map(module: GaussianVAE, params: PyTree, n: int = 15) -> np.ndarray:
    """Decoded means over an n×n grid of the 2-D latent plane at N(0, 1) quantiles 0.05…0.95 (K&W Fig. 4).

    Returns images [n·n, H, W, C], row-major with z₂ decreasing downwards and z₁ increasing rightwards.
    """
    from scipy.stats import norm

    if module.config.latent_dim != 2:
        raise ValueError(f"the latent map needs a 2-D latent, this VAE has latent_dim={module.config.latent_dim}")
    q = norm.ppf(np.linspace(0.05, 0.95, n)).astype(np.float32)
    z = np.stack(np.meshgrid(q, q[::-1]), axis=-1).reshape(-1, 2)  # [n·n, 2]
    out = module.apply({"params": params}, jnp.asarray(z), method=GaussianVAE.decode)
    return np.asarray(decoder_mean_image(module.config, out))


def save_latent_scatter(mu: np.ndarray, labels: np.ndarray | None, path: str | os.PathLike) -> pathlib.Path:
    """The held-out digits' posterior means μ (2-D), coloured by class."""
    fig = plotting.new_figure(figsize=(5, 4.5))
    ax = fig.subplots()
    points = ax.scatter(mu[:, 0], mu[:, 1], c=labels if labels is not None else "C0", cmap="tab10", s=6)
    if labels is not None:
        fig.colorbar(points, ax=ax, label="digit")
    ax.set_xlabel("μ₁")
    ax.set_ylabel("μ₂")
    ax.set_title("q(z|x) means of held-out digits")
    fig.tight_layout()
    return plotting.save_figure(fig, path)


# ================================================================================================
# The trainers
# ================================================================================================


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, images: np.ndarray | None = None,
          labels: np.ndarray | None = None, feature_fn: FeatureFn | None = None) -> Any:
    """Trains (or resumes) the autoencoder of ``config.model.kind`` in ``workdir``; returns the final state."""
    if validate_config(config) == "gaussian_vae":
        return train_gaussian_vae(config, workdir, images, labels)
    return train_autoencoder_kl(config, workdir, images, feature_fn=feature_fn)


def _prepare(config: ml_collections.ConfigDict, workdir: str | os.PathLike, images: np.ndarray | None,
             labels: np.ndarray | None):
    """Checks, config.json, data split, mesh: what both trainers start with."""
    cfg = config.train
    validate_config(config)
    mesh = parallel.make_mesh()
    loop.check_batch_split(cfg.batch_size, mesh, "jit")
    if images is None:
        dataset = data_lib.load_dataset_with_labels(config.data)
        images, labels = dataset.images, dataset.labels
    images = data_lib.check_images(images, config.data)  # [N, H, W, C]
    train_idx, held_idx = split_held_out(len(images), int(config.data.get("num_held_out", 500)), cfg.seed)
    workdir = os.fspath(workdir)
    if jax.process_index() == 0:
        config_lib.save_config(config, os.path.join(workdir, config_lib.CONFIG_FILENAME))
    held_labels = None if labels is None else np.asarray(labels)[held_idx]
    return workdir, mesh, images[train_idx], images[held_idx], held_labels


def _run(config, workdir, mesh, state, step_fn, train_images, key, hooks, num_params_of) -> Any:
    cfg = config.train

    def batch_fn(step: int) -> np.ndarray:  # [B/P, H, W, C]
            return data_lib.get_batch(train_images, step, cfg.batch_size, cfg.seed, jax.process_index(),
                                  jax.process_count())

    def log_start(start_step: int) -> None:
        logging.info("%s params; %s at step %d", f"{num_params_of(state):,}", "resuming" if start_step else "starting",
                     start_step)

    return loop.run(state, loop.compile_step(step_fn, mesh), batch_fn, workdir=workdir,
                          num_steps=cfg.num_steps, key=key, mesh=mesh, log_every=cfg.log_every,
                          ckpt_every=cfg.ckpt_every, keep_checkpoints=cfg.get("keep_checkpoints", 3), hooks=hooks,
                          on_start=log_start)


def _every(config: ml_collections.ConfigDict) -> int:
    """Hook period: train.sample_every, or only at the end when 0."""
    return int(config.train.get("sample_every", 0)) or int(config.train.num_steps)


def _count(tree: PyTree) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def _host(tree: PyTree) -> PyTree:
    return jax.tree.map(loop.first_local, tree)


def _write_json(path: str, record: dict[str, Any]) -> None:
    if jax.process_index() == 0:
        pathlib.Path(path).write_text(json.dumps(record, indent=2) + "\n")


def train_gaussian_vae(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                       images: np.ndarray | None = None, labels: np.ndarray | None = None) -> VAEState:
    """Trains the lecture's Gaussian VAE on −ELBO; hooks write reconstructions, prior samples, the latent map.

    eval.json: the held-out digits' mean ELBO, reconstruction term and KL (nats, one posterior sample each).
    """
    workdir, mesh, train_images, held_out, held_labels = _prepare(config, workdir, images, labels)
    cfg = config.train
    module = GaussianVAE(gaussian_vae_config(config))
    tx = make_optimizer(cfg.lr, cfg.warmup_steps, cfg.grad_clip, b1=cfg.get("adam_b1", 0.9), b2=cfg.get("adam_b2", 0.999))
    init_key, train_key, sample_key = jax.random.split(jax.random.key(cfg.seed), 3)
    state = jax.jit(lambda k: create_vae_state(module, tx, k), out_shardings=parallel.replicated_sharding(mesh),
                    compiler_options=INIT_COMPILER_OPTIONS)(init_key)

    shown = held_out[: cfg.get("num_samples", 32)]
    n_samples = int(cfg.get("num_samples", 32))
    z_prior = jax.random.normal(sample_key, (n_samples, module.config.latent_dim))  # the same z at every step
    decode = jax.jit(lambda p, z: decoder_mean_image(module.config, module.apply({"params": p}, z, method=GaussianVAE.decode)))
    encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method=GaussianVAE.encode))
    metrics_path = os.path.join(workdir, "metrics.jsonl")

    def figures(state: VAEState, step: int) -> None:
        params = _host(state.ema_params)
        if jax.process_index() != 0:
            return
        mu, _ = encode(params, shown)
        save_reconstruction_grid(shown, np.asarray(decode(params, mu)),
                                 os.path.join(workdir, "reconstructions", f"step_{step:07d}.png"))
        plotting.save_image_grid(np.asarray(decode(params, z_prior)),
                                 os.path.join(workdir, "samples", f"step_{step:07d}.png"))
        if module.config.latent_dim == 2:
            plotting.save_image_grid(latent_map(module, params), os.path.join(workdir, "latent_map.png"), nrow=15,
                                     min_tile=28)
            mu_all = np.concatenate([np.asarray(encode(params, held_out[i:i + 500])[0])
                                     for i in range(0, len(held_out), 500)])
            save_latent_scatter(mu_all, held_labels, os.path.join(workdir, "latent_scatter.png"))
        if os.path.exists(metrics_path):
            plotting.plot_loss_curve(metrics_path, os.path.join(workdir, "loss.png"))

    state = _run(config, workdir, mesh, state, make_vae_train_step(module, config), train_images, train_key,
                 [loop.Hook(_every(config), figures)], lambda s: _count(s.params))

    params = _host(state.ema_params)
    terms_fn = jax.jit(lambda p, x, k: elbo(x, *module.apply({"params": p}, x, k), likelihood=module.config.likelihood,
                                            sigma=module.config.sigma))
    terms = [terms_fn(params, jnp.asarray(held_out[i:i + 500]), jax.random.fold_in(sample_key, i))
             for i in range(0, len(held_out), 500)]
    record = {name: float(np.mean(np.concatenate([np.asarray(getattr(t, name)) for t in terms])))
              for name in ("elbo", "reconstruction", "kl")}
    record.update(step=int(loop.first_local(state.step)), num_held_out=len(held_out),
                  protocol="mean over the held-out digits of the one-sample ELBO (K&W Eq. 10), nats per image")
    _write_json(os.path.join(workdir, EVAL_FILENAME), record)
    logging.info("held-out ELBO %.2f nats (reconstruction %.2f, KL %.2f)", record["elbo"], record["reconstruction"],
                 record["kl"])
    return state


def train_autoencoder_kl(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                         images: np.ndarray | None = None, *, feature_fn: FeatureFn | None = None) -> AutoencoderState:
    """Trains AutoencoderKL with LDM's loss (module docstring); then measures PSNR and the scaling factor.

    ``feature_fn`` overrides ``config.loss.perceptual_network`` (any ``images -> [feature maps]``).
    eval.json: ``psnr`` (mean per-image PSNR of the mode reconstructions of the held-out digits, dB),
    ``scaling_factor`` (1 / std of sampled latents of up to 2,000 training digits), the latents' mean
    and per-channel std, and the latent shape.
    """
    workdir, mesh, train_images, held_out, _ = _prepare(config, workdir, images, None)
    cfg = config.train
    model = AutoencoderKL(autoencoder_kl_config(config))
    disc = make_discriminator(config)
    if feature_fn is None:
        feature_fn = make_feature_fn(config)
    betas = dict(b1=cfg.get("adam_b1", 0.5), b2=cfg.get("adam_b2", 0.9))  # LDM/taming: Adam(0.5, 0.9)
    tx = make_optimizer(cfg.lr, cfg.warmup_steps, cfg.grad_clip, **betas)
    disc_tx = make_optimizer(cfg.get("disc_lr", cfg.lr), cfg.warmup_steps, cfg.grad_clip, **betas)
    init_key, train_key, eval_key = jax.random.split(jax.random.key(cfg.seed), 3)
    image_shape = train_images.shape[1:]
    state = jax.jit(lambda k: create_autoencoder_state(model, disc, tx, disc_tx, k, image_shape),
                    out_shardings=parallel.replicated_sharding(mesh), compiler_options=INIT_COMPILER_OPTIONS)(init_key)
    step_fn = make_autoencoder_kl_train_step(model, disc, config, feature_fn)

    shown = held_out[: cfg.get("num_samples", 32)]
    metrics_path = os.path.join(workdir, "metrics.jsonl")

    def figures(state: AutoencoderState, step: int) -> None:
        params = _host(state.ema_params)
        if jax.process_index() != 0:
            return
        save_reconstruction_grid(shown, reconstruct(model, params, shown),
                                 os.path.join(workdir, "reconstructions", f"step_{step:07d}.png"))
        if os.path.exists(metrics_path):
            plotting.plot_loss_curve(metrics_path, os.path.join(workdir, "loss.png"))

    state = _run(config, workdir, mesh, state, step_fn, train_images, train_key,
                 [loop.Hook(_every(config), figures)], lambda s: _count(s.params) + _count(s.disc_params))

    params = _host(state.ema_params)
    scale_images = train_images[:2000]
    scaling_factor, latents = measure_scaling_factor(model, params, scale_images, eval_key)
    record = {
        "psnr": reconstruction_psnr(model, params, held_out),
        "scaling_factor": scaling_factor,
        "latent_mean": float(latents.mean()),
        "latent_std_per_channel": [float(s) for s in latents.std(axis=(0, 1, 2))],
        "latent_shape": list(latents.shape[1:]),
        "step": int(loop.first_local(state.step)),
        "num_held_out": len(held_out),
        "protocol": ("psnr: mean per-image PSNR (dB, peak-to-peak 2 on [-1, 1]) of D(mode q(z|x)) on the held-out "
                     f"digits, EMA params; scaling_factor: 1/std of z ~ q(z|x) over {len(scale_images)} training "
                     "digits (LDM scale_by_std)"),
    }
    _write_json(os.path.join(workdir, EVAL_FILENAME), record)
    logging.info("held-out PSNR %.2f dB; latent scaling factor %.5f (latents %s)", record["psnr"], scaling_factor,
                 "×".join(map(str, record["latent_shape"])))
    return state
