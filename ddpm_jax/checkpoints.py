"""Orbax checkpoints of the training state under ``<workdir>/checkpoints/<step>/``.

What is saved is the pytree part of ``training.TrainState``: ``{"step", "params", "ema_params",
"opt_state"}`` (the model's ``apply_fn`` and the optimizer ``tx`` are code, rebuilt from config.json).

    ckpt = Checkpointer(workdir, save_every=1000, keep=3)
    state = ckpt.restore_latest(state)      # unchanged if there is no checkpoint yet
    ...
    ckpt.save(state)                        # writes when state.step % save_every == 0 (async)
    ckpt.close()                            # waits for the last write

Restoration reads into the structure, dtypes and *shardings* of the state it is given, so a state
replicated over a mesh (or over all hosts of a pod) is restored replicated, with each device reading
what it needs. Only steps whose directory was completely written count (orbax writes to a temporary
directory and renames it when done), so a run killed while saving resumes from the previous one.

For sampling, :func:`load_params` reads just the parameters (EMA by default) without a model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_DIR)


def _state_tree(state: Any) -> dict[str, Any]:
    """The saved part of a train state (a ``flax.struct.dataclass``): its pytree fields as a plain dict.

    The diffusion TrainState saves step, params, ema_params, opt_state; the autoencoder's state adds the
    discriminator's params and optimizer state; functions and optimizers (static fields) are not saved.
    """
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
            if f.metadata.get("pytree_node", True)}


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silences orbax's "Given directory is read only" warnings while a read-only manager is made."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _manager(workdir: str | os.PathLike, *, save_every: int = 1, keep: int | None = None,
             read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=0 if read_only else save_every, max_to_keep=keep, create=not read_only,
        read_only=read_only, cleanup_tmp_directories=not read_only)
    with _quiet_absl() if read_only else contextlib.nullcontext():
        return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def _missing(workdir: str | os.PathLike) -> FileNotFoundError:
    return FileNotFoundError(
        f"no checkpoint in {checkpoint_dir(workdir)}: train first, e.g. "
        f"`ddpm-jax train --config experiments/mnist.py --workdir {os.fspath(workdir)}`")


# ================================================================================================
# During training
# ================================================================================================

class Checkpointer:
    """Saves every ``save_every`` steps keeping the last ``keep``; restores the latest."""

    def __init__(self, workdir: str | os.PathLike, *, save_every: int, keep: int | None = 3):
        if save_every < 1:
            raise ValueError(f"train.ckpt_every must be >= 1, got {save_every}")
        self.workdir = workdir
        self.save_every = save_every
        self._mgr = _manager(workdir, save_every=save_every, keep=keep)

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, state: Any, *, force: bool = False) -> bool:
        """Starts writing ``state`` at step ``state.step`` if it is a save step (or ``force``); async."""
        step = int(jax.device_get(state.step))
        if step in self._mgr.all_steps():
            return False
        return self._mgr.save(step, args=ocp.args.StandardSave(_state_tree(state)), force=force)

    def restore_latest(self, state: Any) -> Any:
        """``state`` with the latest checkpoint's values (same structure and shardings), or ``state``."""
        step = self._mgr.latest_step()
        if step is None:
            return state
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(state))
        restored = self._mgr.restore(step, args=ocp.args.StandardRestore(target))
        return state.replace(**restored)

    def wait(self) -> None:
        """Blocks until the last save is on disk."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()


# ================================================================================================
# After training
# ================================================================================================

def latest_step(workdir: str | os.PathLike) -> int | None:
    """The step of the newest complete checkpoint in ``workdir``, or None."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        return None
    mgr = _manager(workdir, read_only=True)
    try:
        return mgr.latest_step()
    finally:
        mgr.close()


def load_params(workdir: str | os.PathLike, ema: bool = True, step: int | None = None) -> Any:
    """The (EMA by default) parameters of the latest (or given) checkpoint, as host numpy arrays.

    Raises FileNotFoundError naming the directory when there is no checkpoint.
    """
    return load_state_tree(workdir, step)["ema_params" if ema else "params"]


def load_state_tree(workdir: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """Everything the latest (or given) checkpoint saved (step, params, ema_params, opt_state and a trainer's
    extra fields, e.g. the GAN's disc_params and disc_opt_state) as nested dicts of host numpy arrays.

    Raises FileNotFoundError naming the directory when there is no checkpoint.
    """
    if not os.path.isdir(checkpoint_dir(workdir)):
        raise _missing(workdir)
    mgr = _manager(workdir, read_only=True)
    try:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise _missing(workdir)
        if step not in mgr.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoint_dir(workdir)}; "
                                    f"available: {sorted(mgr.all_steps())}")
        restored = mgr.restore(step, args=ocp.args.StandardRestore())
    finally:
        mgr.close()
    return jax.device_get(restored)
