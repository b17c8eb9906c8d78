"""The normalizing-flow trainer: maximum likelihood of the dequantised digits (RealNVP / Glow, ``models/flow.py``).

One step, on a batch of 8-bit images x ∈ {0, …, 255}^D (D = H·W·C)::

    u ~ U[0, 1)^D,   y = 2 (x + u)/256 − 1                              (objectives.dequantize, Glow Eq. 2)
    log p_Y(y) = log p_Z(f(y)) + Σ_l log |det ∂h_l/∂h_{l−1}|             (objectives.flow_log_likelihood)
    loss = mean over the batch of  −log₂ p_Y(y)/D + 7                    (objectives.dequantized_bits_per_dim)

i.e. the loss is the bits/dim itself, an upper bound on the discrete data's −log₂ P(x)/D on the same scale as
DDPM's bound and the VAE's. Adam (``loop.make_optimizer``), optional EMA, and the loop every trainer shares
(``training.loop.run``: resume from the latest checkpoint, non-finite-loss stop, metrics.jsonl + progress bar,
orbax checkpoints, periodic hooks; one sharded ``jax.jit`` step). The actnorm layers are initialised from the
first ``train.init_batch`` training digits (Glow's data-dependent initialisation).

Randomness: u of example i at step s comes from ``fold_in(fold_in(key, s), i)``, so a resumed run repeats the
same numbers. The held-out digits are ``loop.split_held_out`` (the same split as the VAE's and DDPM's).

Outputs in ``workdir``: config.json, metrics.jsonl (loss = bits/dim, grad_norm), loss.png, checkpoints/,
samples/step_N_T<temperature>.png (the same ε at every step, one grid per ``sample.temperatures``), and
eval.json: held-out bits/dim (one dequantisation draw per digit), the train bits/dim of as many training
digits (evenly spaced: the bundled digits are sorted by class), the time to draw ``train.num_samples``
samples, the parameter count.

Config (``experiments/flow_mnist.py``)::

    data.name, image_size, channels, num_examples, num_held_out       as for the VAE (data.load_dataset)
    model.kind = "flow"; num_levels, num_checkerboard, num_steps, hidden_channels   (models/flow.FlowConfig)
    train.batch_size, num_steps, lr, warmup_steps, grad_clip, ema_decay (0 = none), ema_warmup, seed,
          init_batch, log_every, ckpt_every, keep_checkpoints, sample_every (0 = only at the end), num_samples
    sample.temperatures   tuple of T for the sample grids (z_l = μ_l + T σ_l ε)
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddpm_jax import config as config_lib
from ddpm_jax import data as data_lib
from ddpm_jax import parallel, plotting
from ddpm_jax.models.flow import Flow, latent_shapes
from ddpm_jax.objectives import dequantize, dequantized_bits_per_dim
from ddpm_jax.training import loop
from ddpm_jax.training.loop import TrainState, ema_decay_at, ema_update, make_optimizer, split_held_out
from ddpm_jax.workdir import EVAL_FILENAME, flow_config

PyTree = Any
Metrics = dict[str, jax.Array]
# Initialisation runs once (and holds the LU decompositions): compile it without XLA's backend optimisations.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Every check that needs no data, so a bad config fails in a second with one line."""
    flow_config(config)
    if config.train.get("parallel", "jit") != "jit":
        raise ValueError(f"train.parallel={config.train.parallel!r}: the flow trainer runs as one sharded jit; use 'jit'")
    if not config.sample.get("temperatures", (1.0,)):
        raise ValueError("sample.temperatures is empty; give at least one temperature, e.g. (0.7, 1.0)")


def bits_per_dim(flow: Flow, params: PyTree, x_uint8: jax.Array, u: jax.Array) -> jax.Array:
    """[B] bits/dim of the 8-bit images ``x_uint8`` [B, H, W, C] with the dequantisation noise ``u``."""
    y = dequantize(x_uint8, u)                                                       # [B, H, W, C] in [−1, 1)
    log_py = flow.apply({"params": params}, y, method=Flow.log_likelihood)          # [B] nats
    return dequantized_bits_per_dim(log_py, int(np.prod(x_uint8.shape[1:])))


def example_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """u ~ U[0, 1) [B, ...], example i from ``fold_in(key, i)`` (independent of how the batch is sharded)."""
    return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), shape[1:]))(jnp.arange(shape[0]))


def create_train_state(flow: Flow, tx: optax.GradientTransformation, key: jax.Array, init_images: jax.Array) -> TrainState:
    """Parameters from ``key``; the actnorms initialised from the dequantised ``init_images`` (uint8 [N, H, W, C])."""
    u_key, init_key = jax.random.split(key)
    y = dequantize(init_images, jax.random.uniform(u_key, init_images.shape))
    params = flow.init(init_key, y, method=Flow.log_likelihood)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                      opt_state=tx.init(params), apply_fn=flow.apply, tx=tx)


def make_train_step(flow: Flow, config: ml_collections.ConfigDict) -> Callable:
    """``train_step(state, batch uint8 [B, H, W, C], key) -> (state, metrics)``: one Adam step on mean bits/dim."""
    decay, warmup = float(config.train.get("ema_decay", 0.0)), bool(config.train.get("ema_warmup", False))

    def train_step(state: TrainState, batch: jax.Array, key: jax.Array) -> tuple[TrainState, Metrics]:
        u = example_noise(jax.random.fold_in(key, state.step), batch.shape)
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(bits_per_dim(flow, p, batch, u)))(state.params)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, ema_decay_at(state.step, decay, warmup))
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics

    return train_step


def evaluate_bits_per_dim(flow: Flow, params: PyTree, images: np.ndarray, key: jax.Array,
                          batch_size: int = 500) -> np.ndarray:
    """[N] bits/dim of uint8 ``images`` [N, H, W, C], one dequantisation draw per image (one compile)."""
    fn = jax.jit(lambda p, x, k: bits_per_dim(flow, p, x, example_noise(k, x.shape)))
    values = [np.asarray(fn(params, jnp.asarray(images[i:i + batch_size]), jax.random.fold_in(key, i)))
              for i in range(0, len(images), batch_size)]
    return np.concatenate(values)


def make_sampler(flow: Flow, n: int, key: jax.Array) -> Callable[[PyTree, float], jax.Array]:
    """``sample(params, T)`` → n images [n, H, W, C] in [−1, 1] from the same ε at every call."""
    keys = jax.random.split(key, len(latent_shapes(flow.config)))
    eps = [jax.random.normal(k, (n, *s)) for k, s in zip(keys, latent_shapes(flow.config))]
    fn = jax.jit(lambda p, t: jnp.clip(flow.apply({"params": p}, eps, t, method=Flow.sample), -1.0, 1.0))
    return fn


def load_levels(config: ml_collections.ConfigDict, images: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) uint8 levels [N, H, W, C] of ``config.data`` (or of ``images`` in [−1, 1])."""
    images = data_lib.check_images(data_lib.load_dataset(config.data) if images is None else images, config.data)
    levels = plotting.to_uint8(images)                                      # x ∈ {0, …, 255}
    train_idx, held_idx = split_held_out(len(levels), int(config.data.get("num_held_out", 500)), config.train.seed)
    return levels[train_idx], levels[held_idx]


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, images: np.ndarray | None = None) -> TrainState:
    """Trains (or resumes) the flow of ``config`` in ``workdir`` on bits/dim; sample grids; eval.json at the end."""
    validate_config(config)
    cfg, workdir = config.train, os.fspath(workdir)
    mesh = parallel.make_mesh()
    loop.check_batch_split(cfg.batch_size, mesh, "jit")
    train_levels, held_levels = load_levels(config, images)
    if jax.process_index() == 0:
        config_lib.save_config(config, os.path.join(workdir, config_lib.CONFIG_FILENAME))
    flow = Flow(flow_config(config))
    tx = make_optimizer(cfg.lr, cfg.warmup_steps, cfg.grad_clip)
    init_key, train_key, sample_key, eval_key = jax.random.split(jax.random.key(cfg.seed), 4)
    init_images = jnp.asarray(train_levels[: int(cfg.get("init_batch", 256))])
    state = jax.jit(lambda k: create_train_state(flow, tx, k, init_images), out_shardings=parallel.replicated_sharding(mesh),
                    compiler_options=INIT_COMPILER_OPTIONS)(init_key)
    num_samples, temperatures = int(cfg.get("num_samples", 64)), tuple(config.sample.get("temperatures", (1.0,)))
    sample = make_sampler(flow, num_samples, sample_key)
    metrics_path = os.path.join(workdir, "metrics.jsonl")

    def figures(state: TrainState, step: int) -> None:
        params = jax.tree.map(loop.first_local, state.ema_params)
        if jax.process_index() != 0:
            return
        for t in temperatures:
            plotting.save_image_grid(np.asarray(sample(params, t)),
                                     os.path.join(workdir, "samples", f"step_{step:07d}_T{t:g}.png"))
        if os.path.exists(metrics_path):
            plotting.plot_loss_curve(metrics_path, os.path.join(workdir, "loss.png"))

    num_params = int(sum(np.size(x) for x in jax.tree.leaves(state.params)))
    state = loop.run(state, loop.compile_step(make_train_step(flow, config), mesh),
                     lambda step: data_lib.get_batch(train_levels, step, cfg.batch_size, cfg.seed, jax.process_index(),
                                                     jax.process_count()),
                     workdir=workdir, num_steps=cfg.num_steps, key=train_key, mesh=mesh, log_every=cfg.log_every,
                     ckpt_every=cfg.ckpt_every, keep_checkpoints=cfg.get("keep_checkpoints", 3),
                     hooks=[loop.Hook(int(cfg.get("sample_every", 0)) or int(cfg.num_steps), figures)],
                     on_start=lambda s: logging.info("%s params; %s at step %d", f"{num_params:,}",
                                                     "resuming" if s else "starting", s))
    step = int(loop.first_local(state.step))
    if not os.path.exists(os.path.join(workdir, "samples", f"step_{step:07d}_T{temperatures[-1]:g}.png")):
        figures(state, step)                                    # a re-run of a finished run: the last grids
    write_evaluation(flow, state, train_levels, held_levels, sample, eval_key, workdir, num_params)
    return state


def write_evaluation(flow: Flow, state: TrainState, train_levels: np.ndarray, held_levels: np.ndarray,
                     sample: Callable, key: jax.Array, workdir: str, num_params: int) -> dict[str, Any]:
    """eval.json: held-out and train bits/dim (EMA parameters), the sampling time, the parameter count."""
    params = jax.tree.map(loop.first_local, state.ema_params)
    jax.block_until_ready(sample(params, 1.0))                                # compiled by the hooks already
    start = time.perf_counter()
    num_samples = int(jax.block_until_ready(sample(params, 1.0)).shape[0])
    sample_seconds = time.perf_counter() - start
    n = len(held_levels)
    train_sample = train_levels[np.linspace(0, len(train_levels) - 1, n).astype(int)]  # spread over the classes
    bpd = evaluate_bits_per_dim(flow, params, np.concatenate([held_levels, train_sample]), key)
    record = {
        "bits_per_dim": float(bpd[:n].mean()),
        "train_bits_per_dim": float(bpd[n:].mean()),
        "sample_seconds": sample_seconds,
        "num_samples": num_samples,
        "num_params": num_params,
        "step": int(loop.first_local(state.step)),
        "num_held_out": len(held_levels),
        "protocol": ("bits/dim = (−log p_Y(y)/D + log 128)/log 2 of y = 2(x + u)/256 − 1, one u ~ U[0,1)^D per "
                     "held-out digit (an upper bound on −log₂ P(x)/D of the 8-bit digits); EMA parameters"),
    }
    if jax.process_index() == 0:
        pathlib.Path(workdir, EVAL_FILENAME).write_text(json.dumps(record, indent=2) + "\n")
    logging.info("held-out %.3f bits/dim (train %.3f); %d samples in %.2f s", record["bits_per_dim"],
                 record["train_bits_per_dim"], record["num_samples"], sample_seconds)
    return record
