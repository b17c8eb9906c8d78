"""The loop every trainer shares: resume, step, check the loss, log, checkpoint, run periodic hooks.

The diffusion model (``training.py``), the autoencoders and the CLIP model each define their own state
and their own pure ``train_step(state, batch, key) -> (state, metrics)``; everything *around* the step
is the same and lives here, once:

1. **Compile** the step for ``parallel`` = "jit" (one program for the global batch, sharded over the
   mesh's "data" axis, state replicated and donated) or "pmap" (:func:`compile_step`).
2. **Resume**: restore the latest checkpoint of ``workdir`` into the freshly initialised state and drop
   the metrics lines a killed run wrote after it, so re-running the same command continues exactly.
3. **Step**: ``batch_fn(step)`` gives this host's share of the batch of step s (any pytree of arrays;
   ``data.get_batch`` is a pure function of s, which is what makes resumption exact), computed two
   steps ahead in a background thread (``data.Prefetcher``) while the device works.
4. **Check** every loss before anything is logged, saved or plotted: a non-finite loss raises
   FloatingPointError naming the step and the last good checkpoint, which stays intact.
5. **Log** every ``log_every`` steps a line of ``metrics.jsonl`` (step, steps_per_sec and the means of
   the step's metrics) and the tqdm bar (steps/s, loss, ETA); **checkpoint** every ``ckpt_every`` steps
   and at the end (orbax, async); call each :class:`Hook` (sample grids, reconstructions...).

The state is any ``flax.struct.dataclass`` with an integer ``step`` field; its pytree fields are what
gets checkpointed (``checkpoints.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddpm_jax import checkpoints, data, parallel
from ddpm_jax.progress import progress_bar

PyTree = Any
StepFn = Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, dict[str, jax.Array]]]
# Initialisation runs once: compile it without XLA's backend optimisations. On CPU the ~100 random
# initialisers of AutoencoderKL otherwise take ~50 s to compile (~6 s like this), the DCGAN's state ~14 s
# (~1 s); the speed of the program that runs once does not matter.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


# ================================================================================================
# Train state
# ================================================================================================

@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree), plus the code that changes it (static)."""

    step: jax.Array                 # int32 [], number of updates done
    params: PyTree                  # θ
    ema_params: PyTree              # EMA of θ, used for sampling
    opt_state: optax.OptState       # Adam moments (and clipping/schedule counters)
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


# ================================================================================================
# Optimizer and EMA
# ================================================================================================

def make_lr_schedule(lr: float, warmup_steps: int) -> optax.Schedule:
    """lr · min(step / warmup_steps, 1), as in Ho et al.'s code (0 at step 0)."""
    if warmup_steps <= 0:
        return optax.constant_schedule(lr)
    return optax.linear_schedule(init_value=0.0, end_value=lr, transition_steps=warmup_steps)


def make_optimizer(lr: float = 2e-4, warmup_steps: int = 5000, grad_clip: float | None = 1.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam with linear warm-up, after clipping the gradients to global norm ``grad_clip``."""
    adam = optax.adam(make_lr_schedule(lr, warmup_steps), b1=b1, b2=b2, eps=eps)
    if not grad_clip:
        return adam
    return optax.chain(optax.clip_by_global_norm(grad_clip), adam)


def ema_update(ema_params: PyTree, params: PyTree, decay: float | jax.Array) -> PyTree:
    """θ_ema ← decay · θ_ema + (1 − decay) · θ."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """The EMA decay used at update ``step`` (0-based).

    Without warm-up it is ``decay`` (Ho et al.). With warm-up it is min(decay, (1 + s)/(10 + s)), the
    ``num_updates`` rule of TensorFlow's ExponentialMovingAverage: a short run would otherwise keep
    decay^s of the random initialisation in θ_ema (0.999^1500 ≈ 22% after 1,500 steps).
    """
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    s = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + s) / (10.0 + s))


# ================================================================================================
# Held-out split
# ================================================================================================

def split_held_out(num_examples: int, num_held_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): a permutation from ``seed``; its first ``num_held_out`` are held out.

    Train indices are sorted; the held-out ones stay in permutation order (the bundled digits are sorted by
    class, so the first held-out digits, shown in figures, are a mix of classes). Every trainer uses this one.
    """
    if not 0 < num_held_out < num_examples:
        raise ValueError(f"data.num_held_out={num_held_out} must be between 1 and the number of examples "
                         f"minus one ({num_examples - 1})")
    perm = np.random.default_rng([seed, 7]).permutation(num_examples)
    return np.sort(perm[num_held_out:]), perm[:num_held_out]


@dataclasses.dataclass(frozen=True)
class Hook:
    """``fn(state, step)`` every ``every`` steps and after the last one (``every`` = 0: never).

    Called on every process (sampling is a collective in a multi-host run) with the state as one
    replicated global array; write files only where ``jax.process_index() == 0``.
    """

    every: int
    fn: Callable[[PyTree, int], None]

    def due(self, done: int, last: bool) -> bool:
        return bool(self.every) and (done % self.every == 0 or last)


def compile_step(train_step: StepFn, mesh: jax.sharding.Mesh, kind: str = "jit",
                 pmap_step: StepFn | None = None) -> Callable:
    """``train_step`` compiled once for ``kind``.

    "jit": ``train_step`` sees the global batch (a pytree whose leaves have the batch as axis 0), which
    is sharded over "data"; state and key are replicated; the state's buffers are donated.
    "pmap": ``pmap_step`` (the same body with ``axis_name="data"``, averaging with ``lax.pmean``) runs
    on each local device's [B/D] slice.
    """
    if kind == "jit":
        replicated = parallel.replicated_sharding(mesh)
        return jax.jit(train_step, in_shardings=(replicated, parallel.batch_sharding(mesh), replicated),
                       out_shardings=(replicated, replicated), donate_argnums=0)
    if kind == "pmap":
        if pmap_step is None:
            raise ValueError("train.parallel='pmap' is not available for this trainer; use 'jit'")
        return jax.pmap(pmap_step, axis_name=parallel.DATA_AXIS, in_axes=(0, 0, None), donate_argnums=0)
    raise ValueError(f"train.parallel must be 'jit' or 'pmap', got {kind!r}")


def first_local(x: jax.Array) -> np.ndarray:
    """A replicated global array's value on this host (works multi-host, where device_get may not)."""
    return np.asarray(x.addressable_data(0))


def truncate_metrics(path: str, step: int) -> None:
    """Keeps only the metrics.jsonl records with record["step"] <= step."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(lines)


def check_batch_split(batch_size: int, mesh: jax.sharding.Mesh, kind: str) -> None:
    """A clear ValueError unless the global batch splits over devices, processes (and local devices)."""
    parallel.check_batch_size(batch_size, mesh)
    if kind == "pmap" and (batch_size // jax.process_count()) % jax.local_device_count():
        raise ValueError(f"train.batch_size={batch_size} does not split over "
                         f"{jax.local_device_count()} local devices per process")


def run(state: PyTree, train_step: Callable, batch_fn: Callable[[int], PyTree], *, workdir: str | os.PathLike,
        num_steps: int, key: jax.Array, mesh: jax.sharding.Mesh, kind: str = "jit", log_every: int = 100,
        ckpt_every: int = 1000, keep_checkpoints: int = 3, hooks: Sequence[Hook] = (),
        loss_key: str = "loss", on_start: Callable[[int], None] | None = None, prefetch: int = 2) -> PyTree:
    """Runs (or resumes) ``train_step`` from ``state.step`` to ``num_steps``; returns the final state.

    ``state`` is freshly initialised and replicated over ``mesh``; the latest checkpoint in ``workdir``,
    if any, replaces its values. ``train_step`` is the compiled step (:func:`compile_step`);
    ``batch_fn(step)`` returns this host's share of step ``step``'s batch (a pytree of NumPy arrays).
    ``metrics[loss_key]`` is checked for finiteness (FloatingPointError) before anything is written.
    ``on_start(start_step)`` is called after the restore (e.g. to log the parameter count).
    ``prefetch``: batches computed ahead by a background thread (``data.Prefetcher``; 0 = none); as
    ``batch_fn`` is a pure function of the step, this changes no number.
    """
    workdir = os.fspath(workdir)
    is_chief = jax.process_index() == 0
    ckpt = checkpoints.Checkpointer(workdir, save_every=ckpt_every, keep=keep_checkpoints)
    state = ckpt.restore_latest(state)
    start_step = int(first_local(state.step))
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if is_chief:
        truncate_metrics(metrics_path, start_step)  # drop lines a killed run wrote after its last checkpoint
    if on_start is not None:
        on_start(start_step)

    # The two parallel formulations differ only in how state and batch are laid out.
    if kind == "jit":
        put_batch = lambda b: jax.tree.map(lambda x: parallel.shard_batch(x, mesh), b)   # [B/P] per host → [B]
        canonical = lambda s: s                                                         # replicated global
        host_metrics = lambda m: jax.tree.map(first_local, m)
    else:
        replicated = parallel.replicated_sharding(mesh)
        state = parallel.replicate(state)                                               # [D, ...] per leaf
        put_batch = lambda b: jax.tree.map(parallel.split_for_pmap, b)                   # [B/P] → [D, B/(P·D)]
        canonical = lambda s: jax.device_put(parallel.unreplicate(s), replicated)
        host_metrics = lambda m: jax.tree.map(lambda x: np.asarray(x[0]), m)

    window: list[dict[str, np.ndarray]] = []      # checked host metrics since the last log line
    pending: tuple[int, Any] | None = None        # (step, metrics) dispatched but not yet checked
    t_log, steps_at_log = time.time(), start_step

    def check_pending() -> None:
        """Waits for the last dispatched step; stops at a non-finite loss."""
        nonlocal pending
        if pending is None:
            return
        step, metrics = pending
        pending = None
        host = host_metrics(metrics)
        if not np.isfinite(host[loss_key]):
            raise FloatingPointError(
                f"{loss_key} is {host[loss_key]} at step {step} (the update from step {step} to {step + 1}); "
                f"stopping without saving it. The last good checkpoint is step {ckpt.latest_step()} in "
                f"{checkpoints.checkpoint_dir(workdir)}. Lower train.lr or check the data.")
        window.append(host)

    bar = progress_bar(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True,
                       disable=not is_chief, desc=os.path.basename(os.path.abspath(workdir)))
    prefetcher = data.Prefetcher(batch_fn, start_step, num_steps, prefetch) if prefetch else None
    batch_fn = prefetcher or batch_fn
    try:
        for step in range(start_step, num_steps):
            state, metrics = train_step(state, put_batch(batch_fn(step)), key)
            check_pending()  # the previous step: done by now, so this overlaps with the one just queued
            pending = (step, metrics)
            done = step + 1
            bar.update(1)
            last = done == num_steps
            log_now = done % log_every == 0 or last
            ckpt_now = done % ckpt_every == 0 or last
            due = [hook for hook in hooks if hook.due(done, last)]
            if not (log_now or ckpt_now or due):
                continue
            check_pending()  # never log, save or plot a state whose loss was not checked

            if log_now and window:
                now = time.time()
                record = {"step": done, "steps_per_sec": (done - steps_at_log) / max(now - t_log, 1e-9)}
                record.update({k: float(np.mean([w[k] for w in window])) for k in window[0]})
                t_log, steps_at_log, window = now, done, []
                bar.set_postfix({loss_key: f"{record[loss_key]:.4f}"})
                if is_chief:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
            if ckpt_now:
                ckpt.save(canonical(state), force=last)
            for hook in due:
                hook.fn(canonical(state), done)
    finally:
        if prefetcher is not None:
            prefetcher.close()
        bar.close()
        ckpt.close()  # waits for the last (good) checkpoint to be on disk
    return canonical(state)
