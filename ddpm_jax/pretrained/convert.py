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
      ValueError listing every key missing from the checkpoint, unexpected in it, or mis-shaped.
    """
    wanted = traverse_util.flatten_dict(target)  # {("down_blocks_0", ..., "kernel"): ShapeDtypeStruct}
    params, unexpected, misshaped = {}, [], {}  # misshaped: Flax path → message
    for key, array in state_dict.items():
        *parent, leaf = flax_path(rename(key))
        parent = tuple(parent)
        if leaf == "weight":  # which kind of layer decides the Flax name
            leaf = next((n for n in ("kernel", "scale", "embedding") if parent + (n,) in wanted), "weight")
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
        raise ValueError("\n".join(lines))
    return traverse_util.unflatten_dict(params)


__all__ = ["Params", "convert_state_dict", "flax_path", "param_shapes", "to_flax_layout"]
