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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ddpm_jax import parallel, plotting
from ddpm_jax.diffusion import EpsFn, prior_bpd, q_sample, vlb_term_bpd
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


__all__ = ["VLBResult", "DatasetBPD", "vlb_bpd", "dataset_bpd", "plot_vlb_terms"]
