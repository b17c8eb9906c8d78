"""The one torch → Flax converter: a flat PyTorch state dict (NumPy arrays) → nested Flax params.

Two rules, for every model:

1. names: ``down_blocks.0.resnets.1.conv1.weight`` → ``("down_blocks_0", "resnets_1", "conv1", "kernel")``
   (our modules are named like diffusers'/transformers' with ``.N`` written ``_N``; PyTorch's
   ``weight`` is a Flax ``kernel`` (Dense, Conv), ``scale`` (GroupNorm, LayerNorm) or ``embedding``
   (Embed), whichever the target has);
2. layouts: conv weights are OIHW in PyTorch and HWIO in Flax; linear weights are [out, in] in
   PyTorch and [in, out] in Flax.

A format's loader adds only a key rename (checkpoint name → the PyTorch name our module mirrors).
Every missing, unexpected or mis-shaped key is reported in one ValueError.

The same two rules read backwards are the exporter's (``ddpm-jax export``): :func:`torch_key` inverts
:func:`flax_path` and the leaf naming, :func:`to_torch_layout` inverts :func:`to_flax_layout`, and
:func:`export_state_dict` inverts :func:`convert_state_dict`, so that
``convert_state_dict(export_state_dict(params), params) == params`` exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Params = dict[str, Any]


def flax_path(torch_key: str) -> tuple[str, ...]:
    """``"down_blocks.0.resnets.1.conv1.weight"`` → ``("down_blocks_0", "resnets_1", "conv1", "weight")``."""
    path: list[str] = []
    for part in torch_key.split("."):
        if part.isdigit() and path:
            path[-1] += f"_{part}"  # a PyTorch ModuleList index becomes a name suffix
        else:
            path.append(part)
    return tuple(path)


# Flax leaf name → PyTorch's: Dense/Conv kernels, norm scales and embedding tables are all ``weight``.
TORCH_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# Module names whose "_N" is part of the name, not a ModuleList index (diffusers' TimestepEmbedding):
# the one place where the ``.N`` → ``_N`` rule cannot be read backwards without being told.
LITERAL_SUFFIX_NAMES = frozenset({"linear_1", "linear_2"})


def torch_key(path: tuple[str, ...]) -> str:
    """The inverse of :func:`flax_path` and the leaf naming:
    ``("down_blocks_0", "resnets_1", "conv1", "kernel")`` → ``"down_blocks.0.resnets.1.conv1.weight"``
    (``time_embedding/linear_1`` stays ``linear_1``: ``LITERAL_SUFFIX_NAMES``)."""
    *parents, leaf = path
    parts = []
    for name in parents:
        stem, _, index = name.rpartition("_")
        if stem and index.isdigit() and name not in LITERAL_SUFFIX_NAMES:
            parts += [stem, index]  # a name suffix becomes a PyTorch ModuleList index
        else:
            parts.append(name)
    return ".".join([*parts, TORCH_LEAF_NAMES.get(leaf, leaf)])


def to_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """The inverse of :func:`to_flax_layout`: a conv ``kernel`` [kh, kw, I, O] → [O, I, kh, kw]; a linear
    ``kernel`` [in, out] → [out, in]; anything else unchanged."""
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def export_state_dict(params: Params, rename: Callable[[str], str] = lambda key: key) -> dict[str, np.ndarray]:
    """Flax params → a flat PyTorch state dict (float32 NumPy, C-contiguous, as safetensors writes it):
    the inverse of :func:`convert_state_dict`. ``rename`` maps our PyTorch-style key to the format's
    (the inverse of the loader's ``rename``, e.g. ``to_q`` → ``q_proj`` for transformers CLIP)."""
    state = {}
    for path, value in traverse_util.flatten_dict(params).items():
        array = to_torch_layout(np.asarray(value, np.float32), path[-1])
        state[rename(torch_key(path))] = np.require(array, requirements="C")  # (ascontiguousarray makes 0-d 1-d)
    return state


def to_flax_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """The layout rule: a conv ``kernel`` [O, I, kh, kw] → [kh, kw, I, O]; a linear ``kernel``
    [out, in] → [in, out]; anything else unchanged."""
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def param_shapes(module: Any, *example_inputs: Any) -> Params:
    """A Flax module's params as ``ShapeDtypeStruct``s (the ``target`` of :func:`convert_state_dict`),
    from ``module.init`` traced on ``example_inputs`` (arrays or ``ShapeDtypeStruct``s): nothing runs
    or is allocated."""
    return jax.eval_shape(module.init, jax.random.key(0), *example_inputs)["params"]


def random_params(module: Any, *example_inputs: Any, seed: int | list[int] = 0, spread: float = 0.0) -> Params:
    """Random params of ``module`` drawn in NumPy on :func:`param_shapes` (traced, never compiled: a jitted
    ``module.init`` of a small U-Net takes seconds to compile on a CPU, this takes milliseconds).

    Kernels N(0, 1/fan_in) (LeCun normal, Flax's default for Dense and Conv; fan_in = all axes but the last),
    embeddings N(0, 1/features) (Flax's Embed), norm scales 1, everything else 0; each of the last two plus
    ``spread`` · N(0, 1) (a test's "every leaf drawn", so that no one- or zero-initialised leaf hides a mapping
    bug). Returns float32 NumPy arrays; ``seed`` is NumPy's (an int or a list of ints).
    """
    rng = np.random.default_rng(seed)

    def draw(path: tuple[str, ...], shape: jax.ShapeDtypeStruct) -> np.ndarray:
        noise = rng.standard_normal(shape.shape).astype(np.float32)
        if path[-1] in ("kernel", "embedding") and len(shape.shape) > 1:
            fan_in = np.prod(shape.shape[:-1]) if path[-1] == "kernel" else shape.shape[-1]
            return (noise / np.sqrt(fan_in)).astype(np.float32)
        return (noise * spread + (1.0 if path[-1] == "scale" else 0.0)).astype(np.float32)

    flat = traverse_util.flatten_dict(param_shapes(module, *example_inputs))
    return traverse_util.unflatten_dict({path: draw(path, shape) for path, shape in flat.items()})


class StateDictMismatch(ValueError):
    """:func:`convert_state_dict`'s error, with its three lists for a caller that words its own message:
    ``missing`` (Flax paths, "a/b/kernel"), ``unexpected`` (checkpoint keys), ``misshaped`` (checkpoint keys)."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str], misshaped: list[str]):
        super().__init__(message)
        self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    target: Params,
    rename: Callable[[str], str] = lambda key: key,
) -> Params:
    """Convert a flat PyTorch state dict into Flax params shaped like ``target``.

    Args:
      state_dict: PyTorch names → NumPy arrays (e.g. ``state_dict.read_state_dict(...)``).
      target: the model's params, or their shapes (:func:`param_shapes`).
      rename: maps a checkpoint key to the PyTorch key our module naming mirrors (e.g. an old
        attention name to its current diffusers name); applied before :func:`flax_path`.
    Returns:
      nested params with target's structure, as jax arrays of target's dtypes.
    Raises:
      StateDictMismatch (a ValueError) listing every key missing from the checkpoint, unexpected in it,
      or mis-shaped.
    """
    wanted = traverse_util.flatten_dict(target)  # {("down_blocks_0", ..., "kernel"): ShapeDtypeStruct}
    params, unexpected, misshaped, misshaped_keys = {}, [], {}, []  # misshaped: Flax path → message
    for key, array in state_dict.items():
        *parent, leaf = flax_path(rename(key))
        parent = tuple(parent)
        if leaf == "weight":  # which kind of layer decides the Flax name
            leaf = next((n for n in TORCH_LEAF_NAMES if parent + (n,) in wanted), "weight")
        path = parent + (leaf,)
        if path not in wanted:
            unexpected.append(key)
            continue
        value = to_flax_layout(np.asarray(array), leaf)
        if value.shape != tuple(wanted[path].shape):
            misshaped[path] = (
                f"{key}: checkpoint {tuple(array.shape)} -> {value.shape}, model {'/'.join(path)} expects "
                f"{tuple(wanted[path].shape)}"
            )
            misshaped_keys.append(key)
            continue
        params[path] = jnp.asarray(value, dtype=wanted[path].dtype)
    missing = ["/".join(path) for path in wanted if path not in params and path not in misshaped]
    if missing or unexpected or misshaped:
        lines = ["checkpoint does not match the model:"]
        if missing:
            lines.append(f"  missing from the checkpoint ({len(missing)}): {', '.join(sorted(missing))}")
        if unexpected:
            lines.append(f"  unexpected in the checkpoint ({len(unexpected)}): {', '.join(sorted(unexpected))}")
        if misshaped:
            lines.append(f"  wrong shape ({len(misshaped)}): {'; '.join(sorted(misshaped.values()))}")
        raise StateDictMismatch("\n".join(lines), sorted(missing), sorted(unexpected), sorted(misshaped_keys))
    return traverse_util.unflatten_dict(params)


__all__ = ["LITERAL_SUFFIX_NAMES", "Params", "StateDictMismatch", "TORCH_LEAF_NAMES", "convert_state_dict", "export_state_dict", "flax_path",
           "param_shapes", "random_params", "to_flax_layout", "to_torch_layout", "torch_key"]
