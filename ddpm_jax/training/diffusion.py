"""The diffusion trainer: the pure ``train_step`` (Algorithm 1 of Ho et al. 2020) and ``train``.

Algorithm 1 (Training), one step per batch::

    repeat
        x_0 ~ q(x_0)                          # a batch of training images   (data.get_batch)
        t ~ Uniform({1, ..., T})              # index 0..T-1 here             (diffusion.loss_simple)
        ε ~ N(0, I)
        take a gradient step on ∇_θ ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖²
    until converged

plus what the paper's experiments add (Section 4 and Appendix B): Adam (lr 2e-4, linear warm-up over
5000 steps), gradient clipping to global norm 1, dropout, random horizontal flips (CIFAR-10) and an
exponential moving average (EMA, decay 0.9999) of the parameters, which is what is sampled from.

Randomness: the loop holds ONE key (from ``train.seed``). Step s uses ``fold_in(key, s)``; example i of
the global batch uses ``fold_in(fold_in(key, s), i)``, split into its flip / (t, ε) / dropout / c ← ∅ keys.
So every random number is a function of (seed, step, example index) only: restarting at step s replays the
same stream, and the result does not depend on how many devices share the batch (jit or pmap). The
draws are made per example, the network runs once on the whole batch (its dropout masks from the
per-example dropout keys, ``layers.ExampleDropout``).

Parallelism (``train.parallel``): "jit" (default) compiles the global-batch step once with
``jax.jit`` over a ``Mesh`` (``parallel.py``): batch sharded on "data", state replicated, state buffers
donated. "pmap" runs the per-device body under ``jax.pmap`` and averages loss and gradients with
``lax.pmean`` over "data". Both call the same ``_loss_and_grads`` and ``_apply_gradients``. jit is the
default because pmap is in maintenance mode since JAX 0.8 (see ``parallel.py``).

Config (an ``ml_collections.ConfigDict``; the experiment files in ``experiments/`` fill it)::

    config.data.name            str    "mnist_bundled" | "tfds:<name>[:<split>]" | "folder:<path>"
    config.data.image_size      int    H = W
    config.data.channels        int    1 or 3
    config.data.random_flip     bool   random horizontal flips (done inside the step)
    config.data.*                      anything else data.open_dataset understands (data_dir, num_examples, cache:
                                       keep decoded images as uint8 in memory; images are read per batch)
    config.data.prefetch        int    batches prepared ahead in a background thread (default 2)
    config.model.*                     UNetConfig fields (models/unet.py): UNet(UNetConfig(**config.model))
    config.model.remat          str    "none" (default) | "blocks": recompute each ResNet /
                                       attention block in the backward pass instead of keeping its activations
                                       (same numbers, less memory on GPU/TPU; benchmarks/bench_memory.py)
    config.diffusion.schedule   str    "linear" | "cosine" | "scaled_linear"
    config.diffusion.num_timesteps int T (1000)
    config.diffusion.prediction str    "eps" | "x0" | "v"   (what the model predicts)
    config.diffusion.variance   str    "fixed_small" | "fixed_large"   (ancestral sampling)
    config.diffusion.min_snr_gamma float | None  Min-SNR-γ loss weighting (Hang et al. 2023,
                                       ``diffusion.min_snr_weight``; 5 is the paper's); None (default) or 0
                                       = L_simple (0 turns it off from the command line)
    config.train.batch_size     int    global batch (all devices, all hosts); divisible by the device count
    config.train.num_steps      int    total optimizer steps
    config.train.lr             float  peak learning rate (2e-4)
    config.train.warmup_steps   int    linear warm-up from 0 (5000); 0 = none
    config.train.grad_clip      float  global-norm clip (1.0); 0 or None = none
    config.train.ema_decay      float  0.9999 for CIFAR-10
    config.train.ema_warmup     bool   decay_s = min(ema_decay, (1+s)/(10+s)) (short runs; default False)
    config.train.seed           int    model init, data order and every random draw
    config.train.log_every      int    metrics.jsonl line + progress-bar update every N steps
    config.train.ckpt_every     int    checkpoint every N steps (and at the end)
    config.train.keep_checkpoints int  keep the last K
    config.train.sample_every   int    sample grid PNG every N steps (and at the end); 0 = never
    config.train.num_samples    int    images per grid
    config.train.parallel       str    "jit" | "pmap"
    config.train.compute_dtype  str    "float32" (default) | "bfloat16": the U-Net's activations and matmuls in
                                       bf16 (mixed precision, Micikevicius et al. 2018); parameters, gradients,
                                       Adam state and EMA stay float32, the loss is reduced in float32
    config.sample.sampler       str    one of samplers.SAMPLERS ("ddim", "ddpm", "pndm", "euler", …)
    config.sample.steps         int    DDIM steps
    config.sample.eta           float  DDIM η (0 = deterministic)

Outputs in ``workdir``: config.json, metrics.jsonl (step, loss, grad_norm, lr, steps_per_sec),
loss.png, samples/step_<N>.png, checkpoints/<step>/.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from ddpm_jax import config as config_lib
from ddpm_jax import data as data_lib
from ddpm_jax import diffusion, guidance, parallel, plotting
from ddpm_jax.guidance import CONDITION_KEYS, model_condition
from ddpm_jax.models.unet import UNet
from ddpm_jax.pipelines.generate import guided_sample, make_sample_fn
from ddpm_jax.pipelines.training_data import DiffusionData, check_model_fits, load_training_data
from ddpm_jax.schedules import Schedule
from ddpm_jax.training import loop
from ddpm_jax.training.loop import TrainState, ema_decay_at, ema_update, make_lr_schedule, make_optimizer
from ddpm_jax.workdir import diffusion_model_from_config, unet_config

PyTree = Any
Metrics = dict[str, jax.Array]


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                       sample_shape: tuple[int, ...], condition: dict[str, jax.Array] | None = None) -> TrainState:
    """Initializes the parameters from ``key`` with a dummy input x [sample_shape], t [sample_shape[0]]
    and, for a conditional U-Net, an example ``condition`` (its keyword arguments, batch 1)."""
    x = jnp.zeros(sample_shape, jnp.float32)                # [B, H, W, C]
    t = jnp.zeros(sample_shape[:1], jnp.int32)              # [B]
    params = model.init({"params": key}, x, t, **(condition or {}))["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),      # separate buffers (the state is donated)
        opt_state=tx.init(params),
        apply_fn=model.apply,
        tx=tx,
    )


# ================================================================================================
# The step: one body, two parallel formulations
# ================================================================================================

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_model(model: nn.Module, config: ml_collections.ConfigDict) -> nn.Module:
    """``model`` computing in ``config.train.compute_dtype`` (default "float32").

    Mixed precision (Micikevicius et al. 2018, without loss scaling: bf16 has float32's exponent range):
    the U-Net's convolutions, matmuls and activations run in bfloat16 (``UNetConfig.dtype``), while its
    parameters stay float32 (flax casts them per op), so the gradients, Adam's moments and the EMA are
    float32 too; the U-Net returns float32 and the loss is reduced in float32."""
    name = config.train.get("compute_dtype", "float32")
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"train.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {name!r} "
                         f"(set config.train.compute_dtype='bfloat16' for mixed precision)")
    dtype = COMPUTE_DTYPES[name]
    return model if model.config.dtype == dtype else model.clone(config=dataclasses.replace(model.config, dtype=dtype))


def _example_draws(example: dict[str, jax.Array], key: jax.Array, *, random_flip: bool, p_uncond: float,
                   null_condition: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
    """One example's own randomness, from its key alone: (example with x0 flipped and c ← ∅ applied,
    its (t, ε) key, its dropout key). Run under ``vmap`` over the batch's examples and keys."""
    flip_key, loss_key, dropout_key, cond_key = jax.random.split(key, 4)
    x = example["x0"]                                                         # [H, W, C]
    if random_flip:
        x = jnp.where(jax.random.bernoulli(flip_key), x[:, ::-1, :], x)
    cond = {k: example[k][None] for k in CONDITION_KEYS if k in example}      # a batch of one
    if cond and p_uncond > 0:                                                  # c ← ∅ with probability p_uncond
        cond = guidance.drop_condition(cond_key, cond, {k: null_condition[k] for k in cond}, p_uncond)
    return {"x0": x, **{k: v[0] for k, v in cond.items()}}, loss_key, dropout_key


def _loss_and_grads(params: PyTree, batch: dict[str, jax.Array], example_keys: jax.Array, *, model: nn.Module,
                    schedule: Schedule, prediction: str, random_flip: bool, p_uncond: float,
                    null_condition: dict[str, jax.Array], min_snr_gamma: float | None = None,
                    ) -> tuple[jax.Array, PyTree]:
    """Mean L_simple over the batch's examples and its gradient; one key per example [B].

    ``batch["x0"]`` [B, H, W, C] are the images (or scaled latents); a conditional model also gets
    ``batch["label"]`` [B] or ``batch["context"]`` [B, L, D], which each example replaces by
    ``null_condition[...]`` with probability ``p_uncond`` (conditioning dropout, Ho & Salimans 2021,
    Algorithm 1): one network learns ε(x_t, c) and ε(x_t, ∅) for classifier-free guidance.

    Every random draw is per example (flip, c ← ∅, t, ε and the dropout masks, each from example i's
    key only), but the network runs ONCE on the whole batch: ``loss_simple`` takes the [B] keys, and the
    U-Net's ``dropout_keys`` give each example its own masks (``layers.ExampleDropout``). The mean over
    all elements equals the mean of the per-example losses (equal-sized examples).
    """
    draws = functools.partial(_example_draws, random_flip=random_flip, p_uncond=p_uncond,
                              null_condition=null_condition)
    examples, loss_keys, dropout_keys = jax.vmap(draws)(batch, example_keys)  # [B, ...], [B], [B]
    kwargs = model_condition({k: examples[k] for k in CONDITION_KEYS if k in examples})

    def loss_fn(params: PyTree) -> jax.Array:
        def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:                # [B, H, W, C], [B]
            eps = model.apply({"params": params}, x_t, t, train=True, dropout_keys=dropout_keys, **kwargs)
            return eps.astype(jnp.float32)                    # the loss in float32 whatever the compute dtype

        return diffusion.loss_simple(schedule, model_fn, examples["x0"], loss_keys, prediction=prediction,
                                     min_snr_gamma=min_snr_gamma)

    return jax.value_and_grad(loss_fn)(params)


def _apply_gradients(state: TrainState, grads: PyTree, ema_decay: float | jax.Array) -> TrainState:
    """Adam (+ clipping, warm-up) update of θ, then the EMA."""
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema_update(state.ema_params, params, ema_decay))


def make_train_step(model: nn.Module, schedule: Schedule, config: ml_collections.ConfigDict, *,
                    axis_name: str | None = None, null_condition: dict[str, Any] | None = None,
                    ) -> Callable[[TrainState, Any, jax.Array], tuple[TrainState, Metrics]]:
    """The pure ``train_step(state, batch, key) -> (state, metrics)``.

    ``batch`` is the images x_0 [B, H, W, C], or a dict with "x0" and the condition ("label" [B] or
    "context" [B, L, D]); conditional training needs ``null_condition`` (the ∅ label or context, see
    ``_loss_and_grads``) and reads ``config.condition.p_uncond`` (default 0.1).
    ``axis_name=None``: ``batch`` is the global batch (run it under ``jax.jit``, sharded or not).
    ``axis_name="data"``: ``batch`` is this device's B/D examples and the step averages loss and
    gradients over the named axis (run it under ``jax.pmap(axis_name="data")``). ``key`` never changes;
    the step derives its keys from it and ``state.step``. Metrics: loss, grad_norm (before clipping), lr.
    ``config.train.compute_dtype`` picks the U-Net's computation dtype (``compute_model``).
    """
    model = compute_model(model, config)
    lr_schedule = make_lr_schedule(config.train.lr, config.train.warmup_steps)
    loss_and_grads = functools.partial(
        _loss_and_grads, model=model, schedule=schedule, prediction=config.diffusion.prediction,
        random_flip=bool(config.data.get("random_flip", False)),
        min_snr_gamma=config.diffusion.get("min_snr_gamma") or None,          # None or 0: L_simple
        p_uncond=float(config.get("condition", {}).get("p_uncond", 0.1)),
        null_condition={k: jnp.asarray(v) for k, v in (null_condition or {}).items()})
    ema_decay = float(config.train.ema_decay)
    ema_warmup = bool(config.train.get("ema_warmup", False))

    def train_step(state: TrainState, batch: Any, key: jax.Array) -> tuple[TrainState, Metrics]:
        batch = batch if isinstance(batch, dict) else {"x0": batch}
        missing = [k for k in batch if k in CONDITION_KEYS and k not in (null_condition or {})]
        if missing:
            raise ValueError(f"the batch has a condition {missing} but make_train_step got no null_condition "
                             f"for it (needed for conditioning dropout)")
        local_batch = batch["x0"].shape[0]                                                     # B (jit) or B/D (pmap)
        first = 0 if axis_name is None else lax.axis_index(axis_name) * local_batch
        example_ids = first + jnp.arange(local_batch)                                    # [B_local] global indices
        step_key = jax.random.fold_in(key, state.step)
        example_keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(example_ids)  # [B_local]
        loss, grads = loss_and_grads(state.params, batch, example_keys)
        if axis_name is not None:
            loss, grads = lax.pmean((loss, grads), axis_name)                            # equal shard sizes
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_schedule(state.step)}
        decay = ema_decay_at(state.step, ema_decay, ema_warmup)
        return _apply_gradients(state, grads, decay), metrics

    return train_step


def compile_train_step(model: nn.Module, schedule: Schedule, config: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh, null_condition: dict[str, Any] | None = None) -> Callable:
    """``make_train_step`` compiled once for ``config.train.parallel`` ("jit" over ``mesh`` or "pmap")."""
    kind = config.train.get("parallel", "jit")
    if kind not in ("jit", "pmap"):
        raise ValueError(f"train.parallel must be 'jit' or 'pmap', got {kind!r}")
    step = functools.partial(make_train_step, model, schedule, config, null_condition=null_condition)
    return loop.compile_step(step(), mesh, kind, step(axis_name=parallel.DATA_AXIS) if kind == "pmap" else None)


# ================================================================================================
# The loop
# ================================================================================================

def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
          images: np.ndarray | None = None, data: Any | None = None) -> TrainState:
    """Trains (or resumes) the run described by ``config`` in ``workdir``; returns the final state.

    The training arrays come from ``load_training_data(config)`` (images, or an autoencoder's
    latents; class labels or caption contexts for a conditional model); ``images`` [N, H, W, C] in
    [-1, 1] or a ``DiffusionData`` ``data`` overrides that. Re-running the same call after a
    crash resumes from the latest checkpoint with the same data order and random numbers.
    Raises FloatingPointError at the first non-finite loss (nothing is saved after the last good
    checkpoint) and ValueError when the batch does not split over the devices or the model does not
    fit the data.
    """
    cfg = config.train
    workdir = os.fspath(workdir)
    is_chief = jax.process_index() == 0
    mesh = parallel.make_mesh()
    kind = cfg.get("parallel", "jit")
    loop.check_batch_split(cfg.batch_size, mesh, kind)

    # ---------------------------------------------------------------------------------------------
    # Data, model, diffusion, optimizer
    # ---------------------------------------------------------------------------------------------
    num_samples = cfg.get("num_samples", 64)
    if data is None:
        data = (load_training_data(config, num_samples) if images is None
                else DiffusionData({"x0": np.asarray(images, np.float32)}))
    check_model_fits(config, data)
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    if is_chief:
        config_lib.save_config(config, os.path.join(workdir, config_lib.CONFIG_FILENAME))
    arrays = {k: v if isinstance(v, data_lib.ImageSource) else np.asarray(v)   # "x0" [N, h, w, c], ...
              for k, v in data.arrays.items()}
    sampling = diffusion_model_from_config(config, UNet(unet_config(config)), None, codec=data.codec,
                                           null_condition=data.null_condition)
    model, schedule = sampling.unet, sampling.schedule
    tx = make_optimizer(cfg.lr, cfg.warmup_steps, cfg.grad_clip)
    init_key, train_key, sample_key = jax.random.split(jax.random.key(cfg.seed), 3)

    # ---------------------------------------------------------------------------------------------
    # State (initialized replicated over the mesh; loop.run restores the latest checkpoint)
    # ---------------------------------------------------------------------------------------------
    replicated = parallel.replicated_sharding(mesh)
    example = model_condition({k: v[:1] for k, v in arrays.items() if k in CONDITION_KEYS})
    state = jax.jit(functools.partial(create_train_state, model, tx, sample_shape=(1, *data.x0_shape),
                                      condition=example), out_shardings=replicated)(init_key)

    def log_start(start_step: int) -> None:
        num_params = sum(x.size for x in jax.tree.leaves(state.params))
        logging.info("%s params; %s at step %d", f"{num_params:,}", "resuming" if start_step else "starting",
                     start_step)

    # ---------------------------------------------------------------------------------------------
    # Sample grids during training (conditioned on data.grid_condition, guided with sample.guidance)
    # ---------------------------------------------------------------------------------------------
    sample_fn = make_sample_fn(sampling, (num_samples, *data.x0_shape))
    grid_uncond = {k: np.broadcast_to(data.null_condition[k], v.shape) for k, v in data.grid_condition.items()}
    w = float(config.sample.get("guidance", 1.0))
    sample_grid = jax.jit(lambda params, key: data.decode(guided_sample(
        sample_fn, params, key, data.grid_condition, grid_uncond, w)), out_shardings=replicated)
    metrics_path = os.path.join(workdir, "metrics.jsonl")

    def save_samples(state: TrainState, step: int) -> None:
        samples = loop.first_local(sample_grid(state.ema_params, sample_key))   # [n, H, W, C]
        if is_chief:
            plotting.save_image_grid(samples, os.path.join(workdir, "samples", f"step_{step:07d}.png"))
            plotting.plot_loss_curve(metrics_path, os.path.join(workdir, "loss.png"))

    # ---------------------------------------------------------------------------------------------
    # Loop (loop.run: resume, step, check, log, checkpoint, hooks)
    # ---------------------------------------------------------------------------------------------
    def batch_fn(step: int) -> dict[str, np.ndarray]:                         # {"x0": [B/P, h, w, c], ...}
        return {k: data_lib.get_batch(v, step, cfg.batch_size, cfg.seed, jax.process_index(), jax.process_count())
                for k, v in arrays.items()}

    return loop.run(
        state, compile_train_step(model, schedule, config, mesh, data.null_condition), batch_fn, workdir=workdir, num_steps=cfg.num_steps, key=train_key, mesh=mesh, kind=kind,
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, keep_checkpoints=cfg.get("keep_checkpoints", 3),
        hooks=[loop.Hook(cfg.get("sample_every", 0), save_samples)], on_start=log_start,
        prefetch=config.data.get("prefetch", 2))
