"""Negative log-likelihood in bits/dim from the variational bound of DDPM (Ho et al. 2020, Eq. 5).

Eq. 5 bounds the negative log-likelihood of x_0 by a sum of T + 1 terms:

    −log p_θ(x_0) ≤ L = L_T + Σ_{t>1} L_{t−1} + L_0,   with
    L_T     = KL(q(x_T | x_0) ‖ p(x_T))                          (no parameters; ≈ 0),
    L_{t−1} = E_{q(x_t|x_0)} KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)),   t = 2..T,
    L_0     = E_{q(x_1|x_0)} [−log p_θ(x_0 | x_1)]                (the discretized decoder, Eq. 13).

This is the original code's ``calc_bpd_loop`` (diffusion_utils_2.py): for every timestep draw one
x_t ~ q(x_t | x_0) (Eq. 4), call the model once, and evaluate the term with
:func:`ddpm_jax.diffusion.vlb_term_bpd`; add :func:`ddpm_jax.diffusion.prior_bpd`. Each term is an
unbiased one-sample estimate of the expectation over x_t, so the total is an unbiased estimate of the
bound (and an upper bound on the NLL in expectation). Units are bits/dim: nats / (log 2 · #dims).

Timestep convention: index t = 0..T−1 is the paper's t + 1 (see ``schedules.py``); so ``terms[0]`` is
L_0 (the decoder) and ``terms[t]`` for t > 0 is the paper's L_t (= KL at paper step t + 1).

Randomness: the x_t of timestep t is ``q_sample(schedule, x0, t, ε)`` with
``ε = jax.random.normal(jax.random.fold_in(key, t), x0.shape, x0.dtype)``, so the result does not
depend on how the loop is compiled (this is what ``tests/test_likelihood.py`` checks).

The second half is the VAE's counterpart (Burda, Grosse & Salakhutdinov 2016, "Importance Weighted
Autoencoders", Eq. 8): the k-sample importance-weighted bound L_k on log p_θ(x), with the VAE's Gaussian
decoder discretised onto the same 256 bins as DDPM's L_0 (Ho Eq. 13), so that −L_k/(D log 2) bounds the
same discrete −log₂ P(x)/D as DDPM's Eq. 5 and the flow's dequantised bits/dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ddpm_jax import parallel, plotting
from ddpm_jax.diffusion import EpsFn, discretized_gaussian_log_likelihood, prior_bpd, q_sample, vlb_term_bpd
from ddpm_jax.models.vae import GaussianVAE
from ddpm_jax.objectives import gaussian_log_density, sum_flat
from ddpm_jax.progress import progress_bar
from ddpm_jax.schedules import Schedule


class VLBResult(NamedTuple):
    """The bound of Eq. 5 per example, in bits/dim."""

    total: jax.Array  # [B]     L_T + Σ_t terms[t]
    prior: jax.Array  # [B]     L_T
    terms: jax.Array  # [T, B]  terms[0] = L_0 (decoder), terms[t] = KL term at index t


def vlb_bpd(
    eps_fn: EpsFn,
    schedule: Schedule,
    x0: jax.Array,
    key: jax.Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = True,
) -> VLBResult:
    """The full variational bound of Eq. 5 in bits/dim for a batch x0 [B, ...] in [−1, 1].

    One ``lax.scan`` over t = T−1 … 0 (T model calls ``eps_fn(x_t, t)``, t int32 [B]); traceable, so
    ``jax.jit`` it to get ONE compiled program (``dataset_bpd`` does)::

        bpd = jax.jit(lambda params, x0, key: vlb_bpd(lambda x, t: unet.apply(params, x, t), schedule, x0, key))

    ``clip_denoised=True`` clips x̂_0 to [−1, 1] before forming μ_θ, as ``calc_bpd_loop`` does.
    """
    batch = x0.shape[0]

    def body(carry, t):
        t_batch = jnp.full((batch,), t, dtype=jnp.int32)                          # [B]
        eps = jax.random.normal(jax.random.fold_in(key, t), x0.shape, x0.dtype)   # ε ~ N(0, I)
        x_t = q_sample(schedule, x0, t_batch, eps)                                 # Eq. 4
        model_output = eps_fn(x_t, t_batch)
        term = vlb_term_bpd(schedule, model_output, x0, x_t, t_batch, prediction=prediction,
                            variance=variance, clip_denoised=clip_denoised)        # [B]
        return carry, term

    timesteps = jnp.arange(schedule.num_timesteps - 1, -1, -1, dtype=jnp.int32)     # T−1, …, 0
    _, terms_rev = jax.lax.scan(body, None, timesteps)                              # [T, B], t descending
    terms = terms_rev[::-1]                                                         # [T, B], terms[t]
    prior = prior_bpd(schedule, x0)                                                 # [B]
    return VLBResult(total=prior + jnp.sum(terms, axis=0), prior=prior, terms=terms)


class DatasetBPD(NamedTuple):
    """Dataset averages of the bound (Table 2 of Ho et al. reports ``bpd`` as NLL ≤ …)."""

    bpd: float           # mean over examples of the total bound, bits/dim
    prior: float         # mean L_T
    terms: np.ndarray    # [T] mean of each term (terms[0] = L_0); bpd = prior + terms.sum()
    num_examples: int
    totals: np.ndarray | None = None  # [N] the bound of each example (float64)

    @property
    def std_error(self) -> float:
        """Standard error of ``bpd`` over examples (std of ``totals`` / √N; NaN for N < 2)."""
        if self.totals is None or self.totals.shape[0] < 2:
            return float("nan")
        return float(np.std(self.totals, ddof=1) / np.sqrt(self.totals.shape[0]))


def dataset_bpd(
    eps_fn: EpsFn | Callable[[Any, jax.Array, jax.Array], jax.Array],
    schedule: Schedule,
    images: np.ndarray | jax.Array,
    key: jax.Array,
    batch_size: int,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = True,
    params: Any = None,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> DatasetBPD:
    """Average :func:`vlb_bpd` over ``images`` [N, ...] in batches of ``batch_size``, sharded over a mesh.

    One compiled program for all batches: the last batch is padded to ``batch_size`` (repeating its
    first image) and the padding is masked out of the averages. Batch i uses ``fold_in(key, i)``.

    Parallelism: each batch is split along the "data" axis of ``mesh`` (default
    ``parallel.make_mesh()``: every device), so ``batch_size`` must be a multiple of the number of
    devices; the model is replicated. The noise depends only on (key, i, t, shape), not on the devices,
    so 1 and 8 devices give the same numbers (``tests/test_likelihood.py``). Every process of a
    multi-host run passes the same ``images`` and gets the same result.

    Model: ``eps_fn(x_t, t)`` may close over parameters (they become constants of the compiled
    program: fine for small models). For large ones pass ``params`` and an ``eps_fn(params, x_t, t)``:
    the parameters are then an argument of the program, replicated over the mesh.
    """
    images = np.asarray(images, dtype=np.float32)
    n = images.shape[0]
    if n == 0 or batch_size < 1:
        raise ValueError(f"need at least one image and batch_size >= 1, got N={n}, batch_size={batch_size}")
    mesh = parallel.make_mesh() if mesh is None else mesh
    num_devices = mesh.devices.size
    if batch_size % num_devices:
        raise ValueError(f"batch_size={batch_size} is not divisible by the number of devices ({num_devices}); "
                         f"use a multiple of {num_devices}")
    replicated, sharded = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)

    def bound(p, x0, k):
        fn = eps_fn if params is None else (lambda x_t, t: eps_fn(p, x_t, t))
        return vlb_bpd(fn, schedule, x0, k, prediction=prediction, variance=variance, clip_denoised=clip_denoised)

    compiled = jax.jit(bound, in_shardings=(replicated, sharded, replicated), out_shardings=replicated)
    p = None if params is None else jax.device_put(params, replicated)
    totals, prior_sum = [], 0.0
    terms_sum = np.zeros((schedule.num_timesteps,), np.float64)
    starts = range(0, n, batch_size)
    if progress:
        starts = progress_bar(starts, desc=f"bits/dim ({schedule.num_timesteps} terms per image)",
                              unit="batch", dynamic_ncols=True)
    for i, start in enumerate(starts):
        batch = images[start:start + batch_size]
        real = batch.shape[0]
        if real < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - real, axis=0)], axis=0)
        x0 = jax.make_array_from_callback(batch.shape, sharded, lambda index, b=batch: b[index])
        res = jax.device_get(compiled(p, x0, jax.random.fold_in(key, i)))
        totals.append(np.asarray(res.total, np.float64)[:real])
        prior_sum += float(np.sum(np.asarray(res.prior, np.float64)[:real]))
        terms_sum += np.sum(np.asarray(res.terms, np.float64)[:, :real], axis=1)
    totals = np.concatenate(totals)
    return DatasetBPD(bpd=float(totals.mean()), prior=prior_sum / n, terms=terms_sum / n, num_examples=n,
                      totals=totals)


def plot_vlb_terms(terms: np.ndarray | jax.Array, path: str, *, title: str | None = None) -> str:
    """PNG of the per-timestep terms L_t (bits/dim, log scale) against the paper's t = index + 1.

    ``terms`` is [T] (e.g. ``DatasetBPD.terms``) or [T, B] (averaged over B). Returns ``path``.
    """
    terms = np.asarray(terms, np.float64)
    if terms.ndim == 2:
        terms = terms.mean(axis=1)
    if terms.ndim != 1:
        raise ValueError(f"terms must be [T] or [T, B], got shape {terms.shape}")
    t = np.arange(1, terms.shape[0] + 1)
    fig = plotting.new_figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(t, np.maximum(terms, 1e-12), lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("t (paper's timestep; t = 1 is the decoder L_0)")
    ax.set_ylabel("term of the bound (bits/dim)")
    ax.set_title(title or f"variational bound terms, total {terms.sum():.3f} bits/dim (excl. L_T)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return plotting.save_figure(fig, path, dpi=100)


# ================================================================================================
# The VAE: the importance-weighted bound (IWAE, Burda et al. 2016)
# ================================================================================================


def importance_weighted_bound(log_weights: jax.Array, k: int) -> jax.Array:
    """The k-sample importance-weighted bound L_k (Burda et al. 2016, Eq. 8), estimated from K ≥ k log-weights.

        L_k(x) = E_{z_1..z_k ~ q(z|x)} [ log (1/k) Σ_{i=1..k} w_i ],    w_i = p(x, z_i) / q(z_i | x)

    L_1 is the ELBO (K&W Eq. 3); log p(x) ≥ L_{k+1} ≥ L_k (Burda Theorem 1), and L_k → log p(x) as k → ∞
    when w is bounded. The K draws are cut into K/k disjoint groups of k; each group's
    ``logsumexp(log w) − log k`` is one unbiased estimate of L_k, and their mean is returned (so every k
    reuses the same K draws, and small k get a low-variance average).

    Args:
      log_weights: [K, B] log w_i = log p(x, z_i) − log q(z_i | x), z_i ~ q(z | x) independent (nats).
      k: samples per bound, 1 ≤ k ≤ K, dividing K.
    Returns:
      [B] the estimate of L_k in nats.
    """
    log_weights = jnp.asarray(log_weights)
    if log_weights.ndim != 2:
        raise ValueError(f"log_weights must be [K, B] (samples first), got shape {log_weights.shape}")
    num = log_weights.shape[0]
    if not 1 <= k <= num or num % k:
        raise ValueError(f"k={k} must be between 1 and K={num} and divide it; draw a multiple of k samples")
    groups = log_weights.reshape(num // k, k, log_weights.shape[1])                 # [K/k, k, B]
    return jnp.mean(jax.nn.logsumexp(groups, axis=1) - jnp.log(float(k)), axis=0)  # [B]


def vae_log_weights(module: GaussianVAE, params: Any, x0: jax.Array, key: jax.Array, num_samples: int) -> jax.Array:
    """[K, B] log-weights log p(z_i) + log P_θ(x | z_i) − log q_φ(z_i | x) of the Gaussian VAE, z_i ~ q_φ(z | x).

    The decoder N(x; μ_θ(z), σ² I) is read as a distribution over the 256 levels of x ∈ [−1, 1] by
    integrating it over each level's bin (Ho et al. 2020, Eq. 13: bins x ± 1/255, the outer ones extended
    to ∓∞), the same discretisation as DDPM's decoder L_0; log p(z) = log N(z; 0, I).

    Args:
      module: a ``GaussianVAE`` with ``likelihood="gaussian"`` (a Bernoulli on grey levels is not a
        distribution over the 256 levels: it has no bits/dim on this scale).
      x0: [B, H, W, C] images on the 8-bit grid in [−1, 1] (level/127.5 − 1).
      key: z_i of example b is μ + σ ⊙ ε with ε from ``fold_in(fold_in(key, i), b)`` (K&W's reparameterisation):
        an example's draws do not depend on the batch it is in.
    """
    cfg = module.config
    if cfg.likelihood != "gaussian":
        raise ValueError(f"the importance-weighted bits/dim needs a Gaussian decoder (model.likelihood=gaussian), "
                         f"got likelihood={cfg.likelihood!r}, which is not a distribution over the 256 levels")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    mu, logvar = module.apply({"params": params}, x0, method=GaussianVAE.encode)     # q_φ(z|x): [B, L] each
    log_std = 0.5 * logvar
    log_sigma = jnp.log(jnp.float32(cfg.sigma))

    def one(i):
        key_i = jax.random.fold_in(key, i)
        eps = jax.vmap(lambda b: jax.random.normal(jax.random.fold_in(key_i, b), mu.shape[1:]))(
            jnp.arange(mu.shape[0]))                                                 # [B, L], example b's own stream
        z = mu + jnp.exp(log_std) * eps                                              # z ~ q_φ(z|x) [B, L]
        mean = module.apply({"params": params}, z, method=GaussianVAE.decode)       # μ_θ(z) [B, H, W, C]
        log_px = sum_flat(discretized_gaussian_log_likelihood(x0, means=mean, log_scales=log_sigma))  # Eq. 13
        return log_px + gaussian_log_density(z) - gaussian_log_density(z, mu, log_std)          # [B]

    return jax.lax.map(one, jnp.arange(num_samples), batch_size=min(num_samples, 50))  # [K, B], 50 draws at a time


class IWAEBPD(NamedTuple):
    """The importance-weighted bound over a dataset, as bits/dim (−L_k / (D log 2)): an upper bound on −log₂ P(x)/D."""

    bpd: dict[int, float]              # k → mean over examples
    totals: dict[int, np.ndarray]      # k → [N] per example
    num_samples: int                   # K draws per example (every k uses the same draws)
    num_examples: int

    def std_error(self, k: int) -> float:
        """Standard error of ``bpd[k]`` over examples (std / √N)."""
        values = self.totals[k]
        return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def dataset_iwae_bpd(module: GaussianVAE, params: Any, images: np.ndarray | jax.Array, key: jax.Array,
                     ks: tuple[int, ...] = (1, 10, 100, 1000), batch_size: int = 100) -> IWAEBPD:
    """:func:`importance_weighted_bound` of a Gaussian VAE for every k in ``ks``, in bits/dim, over ``images``.

    K = max(ks) draws per image, one compiled program for all batches (the last one padded and trimmed);
    batch j uses ``fold_in(key, j)``. bits/dim = −L_k / (D log 2), D = H·W·C, on the 256 levels of
    :func:`vae_log_weights`: comparable with :func:`dataset_bpd` and the flow's dequantised bits/dim.
    """
    images = np.asarray(images, np.float32)
    n, num = images.shape[0], max(ks)
    if n == 0 or batch_size < 1:
        raise ValueError(f"need at least one image and batch_size >= 1, got N={n}, batch_size={batch_size}")
    bad = [k for k in ks if k < 1 or num % k]
    if bad:
        raise ValueError(f"every k must divide the largest, {num} (K draws are split into groups of k); got {bad}")
    dims = int(np.prod(images.shape[1:]))

    @jax.jit
    def fn(p, x, kk):                                                                         # → [len(ks), B]
        log_w = vae_log_weights(module, p, x, kk, num)                                        # [K, B], drawn once
        return jnp.stack([importance_weighted_bound(log_w, k) for k in ks])
    out = []
    for j, start in enumerate(range(0, n, batch_size)):
        batch = images[start:start + batch_size]
        real = batch.shape[0]
        if real < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - real, axis=0)], axis=0)
        out.append(np.asarray(fn(params, jnp.asarray(batch), jax.random.fold_in(key, j)), np.float64)[:, :real])
    bounds = np.concatenate(out, axis=1)                                                      # [len(ks), N] nats
    totals = {k: -bounds[i] / (dims * np.log(2.0)) for i, k in enumerate(ks)}
    return IWAEBPD(bpd={k: float(v.mean()) for k, v in totals.items()}, totals=totals, num_samples=num, num_examples=n)


__all__ = ["VLBResult", "DatasetBPD", "vlb_bpd", "dataset_bpd", "plot_vlb_terms",
           "importance_weighted_bound", "vae_log_weights", "IWAEBPD", "dataset_iwae_bpd"]
