"""The one reader of weight files: a file or a model folder → a flat NumPy state dict.

Formats, chosen by the file's suffix:

* ``.safetensors``: safetensors' NumPy loader (``safetensors.numpy.load_file``);
* ``.bin`` / ``.pth`` / ``.pt`` / ``.ckpt``: a ``torch.save`` pickle, read without torch by
  :mod:`ddpm_jax.pretrained.torch_pickle` (a checkpoint dict's ``"state_dict"`` is unwrapped).

A model folder (diffusers ``diffusion_pytorch_model[.variant].safetensors``, transformers
``model[.variant].safetensors``) is resolved to one such file: ``{stem}[.{variant}].safetensors``,
else ``{stem}[.{variant}].bin``. Folders also hold a ``config.json`` (:func:`read_config_json`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from ddpm_jax.pretrained import torch_pickle

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
DIFFUSERS_STEM = "diffusion_pytorch_model"   # diffusers' weights file name
TRANSFORMERS_STEM = "model"                  # transformers' weights file name


def read_weights_file(path: str | Path) -> dict[str, np.ndarray]:
    """One weights file → {PyTorch name: array}: .safetensors (NumPy loader) or a torch pickle
    (.bin/.pth/.pt/.ckpt, :func:`torch_pickle.load_state_dict`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    if path.suffix == SAFETENSORS_SUFFIX:
        return load_file(path)
    if path.suffix in TORCH_PICKLE_SUFFIXES:
        return torch_pickle.load_state_dict(path)
    raise ValueError(f"{path}: unknown checkpoint format {path.suffix!r}; expected .safetensors or one of "
                     f"{', '.join(TORCH_PICKLE_SUFFIXES)} (a torch.save file)")


def weights_file(folder: str | Path, stem: str = DIFFUSERS_STEM, variant: str | None = None) -> Path:
    """The weights file of a model folder: ``{stem}[.{variant}].safetensors``, else ``.bin``.

    ``variant`` is diffusers'/transformers' file variant, e.g. "fp16" (``model.fp16.safetensors``) or
    "non_ema". FileNotFoundError naming the folder when neither file exists.
    """
    folder = Path(folder)
    name = f"{stem}.{variant}" if variant else stem
    for suffix in (SAFETENSORS_SUFFIX, ".bin"):
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    raise FileNotFoundError(f"no {name}.safetensors (or .bin) in {folder}")


def read_state_dict(path: str | Path, stem: str = DIFFUSERS_STEM, variant: str | None = None
                    ) -> dict[str, np.ndarray]:
    """A weights file, or a model folder's weights file, → {PyTorch name: NumPy array}.

    Args:
      path: a file (.safetensors, or .bin/.pth/.pt/.ckpt read by torch_pickle: a single-file CompVis
        checkpoint, the FID Inception weights) or a folder (a diffusers or transformers model).
      stem: for a folder, the file name without suffix: ``"diffusion_pytorch_model"`` (diffusers) or
        ``"model"`` (transformers).
      variant: for a folder, the file variant ("fp16", "non_ema", …): ``{stem}.{variant}.safetensors``.
    """
    path = Path(path)
    if path.is_dir():
        return read_weights_file(weights_file(path, stem, variant))
    if variant:
        raise ValueError(f"variant={variant!r} selects a file in a model folder, but {path} is not a folder")
    return read_weights_file(path)


def read_config_json(folder: str | Path) -> dict[str, Any]:
    """``folder/config.json`` (a diffusers or transformers model config) as a dict; FileNotFoundError
    naming the folder when it is missing."""
    config_file = Path(folder) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"no config.json in {folder}")
    return json.loads(config_file.read_text())


__all__ = ["DIFFUSERS_STEM", "SAFETENSORS_SUFFIX", "TORCH_PICKLE_SUFFIXES", "TRANSFORMERS_STEM", "read_config_json",
           "read_state_dict", "read_weights_file", "weights_file"]
