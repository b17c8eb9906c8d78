"""JAX's persistent compilation cache for the ``ddpm-jax`` command: compile once, reuse in the next run.

Every ``ddpm-jax`` call is a new process, and XLA compiles its programs again each time (Stable Diffusion's
U-Net and decoder: minutes on a CPU before the first step). JAX can store each compiled executable on disk,
keyed by the program, its shapes, the JAX/XLA version and the device, and load it instead of compiling
the same program in a later process. ``cli.main`` turns that on; importing the library never does (a
notebook or a test keeps JAX's own settings).

Where the cache goes (``cache_dir``), first match wins:

    --no-compile-cache                         off
    DDPM_JAX_COMPILE_CACHE=off (or 0, none)    off
    DDPM_JAX_COMPILE_CACHE=<dir>               <dir>
    $XDG_CACHE_HOME/ddpm_jax/jax_cache         when XDG_CACHE_HOME is set
    ~/.cache/ddpm_jax/jax_cache                otherwise

A cache folder already given to JAX (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) is left as it is.
Every program is stored, however short its compile (``jax_persistent_cache_min_compile_time_secs = 0``):
a second run then compiles nothing it compiled before. Delete the folder to empty the cache.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

ENV_VAR = "DDPM_JAX_COMPILE_CACHE"
OFF = ("off", "0", "none", "false", "no")


def cache_dir(enabled: bool = True, environ: Mapping[str, str] | None = None) -> str | None:
    """The folder the CLI's compilation cache uses, or None when it is off (see the module docstring).

    ``enabled=False`` is ``--no-compile-cache``; ``environ`` defaults to ``os.environ``.
    """
    environ = os.environ if environ is None else environ
    setting = environ.get(ENV_VAR, "").strip()
    if not enabled or setting.lower() in OFF:
        return None
    if setting:
        return os.path.abspath(os.path.expanduser(setting))
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ddpm_jax", "jax_cache")


def enable(enabled: bool = True, environ: Mapping[str, str] | None = None) -> str | None:
    """Points JAX's persistent compilation cache at ``cache_dir(enabled, environ)``; returns the folder in use.

    Call it before the first compilation of the process (``cli.main`` does). Returns None when the cache
    is off, or JAX's folder when one was already configured (then nothing is changed).
    """
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return configured
    folder = cache_dir(enabled, environ)
    if folder is None:
        return None
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the compilation cache folder {folder} ({err.strerror}); set "
                         f"{ENV_VAR}=<a writable folder>, or {ENV_VAR}=off / --no-compile-cache") from None
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
