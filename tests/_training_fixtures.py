"""Tiny configs and data shared by the training tests and their subprocess workers (not a test file)."""

from __future__ import annotations

import ml_collections
import numpy as np


def tiny_config(**train_overrides) -> ml_collections.ConfigDict:
    """A one-level U-Net (8 channels, cheap to compile) on 8×8 grayscale images, T = 100."""
    config = ml_collections.ConfigDict()
    config.data = ml_collections.ConfigDict(dict(name="test_array", image_size=8, channels=1, random_flip=True))
    config.model = ml_collections.ConfigDict(dict(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
        down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
        add_attention=False, norm_num_groups=4, dropout=0.1))
    config.diffusion = ml_collections.ConfigDict(dict(
        schedule="linear", num_timesteps=100, prediction="eps", variance="fixed_small"))
    config.train = ml_collections.ConfigDict(dict(
        batch_size=8, num_steps=20, lr=2e-3, warmup_steps=2, grad_clip=1.0, ema_decay=0.9, seed=0,
        log_every=5, ckpt_every=10, keep_checkpoints=2, sample_every=0, num_samples=4, parallel="jit"))
    config.sample = ml_collections.ConfigDict(dict(sampler="ddim", steps=5, eta=0.0))
    config.train.update(train_overrides)
    return config


def tiny_images(n: int = 8, size: int = 8, seed: int = 0) -> np.ndarray:
    """[n, size, size, 1] float32 in [-1, 1]: simple blocky patterns (easy to memorise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.choice([-1.0, 1.0], size=(n, size // 2, size // 2, 1))
    return np.repeat(np.repeat(coarse, 2, axis=1), 2, axis=2).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Compilation cache: the tests compile the same tiny programs in several processes; a persistent
# cache shared by them turns every compile after the first into a lookup.
# ------------------------------------------------------------------------------------------------

import os
import tempfile

CACHE_DIR = os.environ.get("DDPM_JAX_TEST_CACHE_DIR",
                           os.path.join(tempfile.gettempdir(), "ddpm_jax_test_compilation_cache"))
CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": CACHE_DIR,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def subprocess_env(**extra: str) -> dict[str, str]:
    """The current environment plus the shared compilation cache, the repo on PYTHONPATH and ``extra``
    (``XLA_FLAGS`` in ``extra`` is added to the current flags, e.g. the suite's optimisation level)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if "XLA_FLAGS" in extra:
        extra = dict(extra, XLA_FLAGS=" ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), extra["XLA_FLAGS"]])))
    env = dict(os.environ, **CACHE_ENV, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
    return env


def in_process_compilation_cache():
    """Context manager: the shared persistent cache for compiles in this (pytest) process, then restore."""
    import contextlib

    import jax

    @contextlib.contextmanager
    def cache():
        try:
            from jax._src import compilation_cache as cc
        except ImportError:  # private module moved: run uncached
            yield
            return
        values = {"jax_compilation_cache_dir": CACHE_DIR, "jax_persistent_cache_min_compile_time_secs": 0,
                  "jax_persistent_cache_min_entry_size_bytes": 0}
        old = {name: getattr(jax.config, name) for name in values}
        for name, value in values.items():
            jax.config.update(name, value)
        cc.reset_cache()
        try:
            yield
        finally:
            for name, value in old.items():
                jax.config.update(name, value)
            cc.reset_cache()

    return cache()


# ------------------------------------------------------------------------------------------------
# SIGKILL mid-run: the fault the exact-resume tests inject
# ------------------------------------------------------------------------------------------------

def sigkill_when(command: list[str], ready, timeout: float) -> None:
    """Starts ``command`` (with :func:`subprocess_env`) and SIGKILLs it as soon as ``ready()`` is true (or it
    ends, or ``timeout`` seconds pass): no clean shutdown, no final checkpoint."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
