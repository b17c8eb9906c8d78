"""Experiment configs: load one from a file, change fields from the command line, save it.

An experiment is a Python file with a ``get_config() -> ml_collections.ConfigDict`` function
(``experiments/mnist.py``, ``experiments/ddpm_cifar10.py``). Its groups are::

    config.data       name, image_size, channels, random_flip, data_dir
    config.model      the fields of ddpm_jax.models.unet.UNetConfig
    config.diffusion  schedule, num_timesteps, prediction, variance
    config.train      batch_size, num_steps, lr, warmup_steps, grad_clip, ema_decay, seed, log_every,
                      ckpt_every, keep_checkpoints, sample_every, num_samples, parallel
    config.sample     sampler, steps, eta

Overrides are ``"group.field=value"`` strings, e.g. ``train.num_steps=100``,
``model.block_out_channels=(32,64)``, ``data.name=tfds:cifar10``. The value is read as a Python
literal (``ast.literal_eval``) and must fit the type of the field it replaces; a string field also
takes bare text. Mistakes give a one-line ``ValueError`` that names the field.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import pathlib
from collections.abc import Iterable, Iterator
from typing import Any

import ml_collections

__all__ = [
    "load_config",
    "apply_overrides",
    "parse_override",
    "save_config",
    "load_workdir_config",
    "dataclass_to_config",
    "CONFIG_FILENAME",
]

CONFIG_FILENAME = "config.json"  # written into a workdir by training; read back by `ddpm-jax sample`


def load_config(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Imports the experiment file at ``path`` and returns its ``get_config()``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_ddpm_jax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {str(path)!r} defines no get_config() function")
    return module.get_config()


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Iterable[str]
) -> ml_collections.ConfigDict:
    """Applies ``"a.b=value"`` overrides to ``config`` in place (and returns it).

    Raises:
      ValueError: a malformed override, an unknown key (the message lists close matches), or a
        value whose type does not fit the field.
    """
    for override in overrides:
        key, value = parse_override(config, override)
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def parse_override(config: ml_collections.ConfigDict, override: str) -> tuple[str, Any]:
    """``"train.lr=2e-4"`` -> ``("train.lr", 0.0002)``, checked against ``config``."""
    key, sep, text = override.partition("=")
    key, text = key.strip(), text.strip()
    if not sep or not key:
        raise ValueError(f"override {override!r} is not of the form group.field=value")
    keys = dict(_flatten(config))
    if key not in keys:
        groups = {k.rsplit(".", 1)[0] for k in keys if "." in k}
        if key in groups:
            raise ValueError(f"config key {key!r} is a group; set one of its fields, e.g. {key}.<field>=...")
        close = difflib.get_close_matches(key, list(keys), n=3, cutoff=0.6)
        if not close:  # a right field in the wrong group: match on the last part alone
            leaf = key.rsplit(".", 1)[-1]
            close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:3]
        hint = f"; did you mean {', '.join(close)}?" if close else "; see the experiment file for the fields"
        raise ValueError(f"unknown config key {key!r}{hint}")
    return key, _coerce(key, keys[key], text)


def _flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """("group.field", value) for every leaf of a nested ConfigDict."""
    for k, v in node.items():
        name = f"{prefix}{k}"
        if isinstance(v, (ml_collections.ConfigDict, dict)):
            yield from _flatten(v, name + ".")
        else:
            yield name, v


def _coerce(key: str, current: Any, text: str) -> Any:
    """Parses ``text`` into a value of the same type as ``current`` (the field's present value)."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = {"true": True, "false": False, "none": None}.get(text.lower(), text)  # bare word

    def bad(expected: str) -> ValueError:
        return ValueError(f"config field {key!r} expects {expected}, got {text!r}")

    if current is None:
        return value  # an optional field (e.g. data.data_dir=None): anything goes
    if value is None:
        raise bad(type(current).__name__)
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise bad("a bool (True/False)")
        return value
    if isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an int")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a float")
        return float(value)
    if isinstance(current, str):
        return value if isinstance(value, str) else text  # bare text is a string
    if isinstance(current, (tuple, list)):
        if not isinstance(value, (tuple, list)):
            value = (value,)  # `model.block_out_channels=64` -> (64,)
        kinds = {type(v) for v in current}
        if len(kinds) == 1:
            (kind,) = kinds
            for v in value:
                ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
                ok |= kind is float and isinstance(v, int) and not isinstance(v, bool)
                if not ok:
                    raise bad(f"a tuple of {kind.__name__}")
            value = [float(v) if kind is float else v for v in value]
        return type(current)(value)
    if not isinstance(value, type(current)):
        raise bad(type(current).__name__)
    return value


def dataclass_to_config(obj: Any, exclude: Iterable[str] = ("dtype",)) -> ml_collections.ConfigDict:
    """A frozen config dataclass (e.g. ``UNetConfig``) as a ConfigDict of its fields.

    So an experiment can write ``config.model = dataclass_to_config(UNetConfig.ddpm_cifar10())`` and
    its fields can be overridden from the command line; rebuild with ``UNetConfig(**config.model)``.
    ``exclude`` drops fields that are not plain values (``dtype`` is a NumPy type, not JSON).
    """
    return ml_collections.ConfigDict(
        {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name not in set(exclude)}
    )


def save_config(config: ml_collections.ConfigDict, path: str | pathlib.Path) -> pathlib.Path:
    """Writes ``config`` as JSON (so a workdir records the exact config it was trained with)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_json(indent=2, sort_keys=True) + "\n")
    return path


def load_workdir_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (``<workdir>/config.json``), tuples restored."""
    import json

    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {str(workdir)!r} does not exist; train first (ddpm-jax train ...)")
    path = workdir / CONFIG_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"workdir {str(workdir)!r} has no {CONFIG_FILENAME}; was it written by ddpm-jax train?")

    def tuples(x: Any) -> Any:  # JSON has no tuples; configs use them for per-level fields
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        return tuple(tuples(v) for v in x) if isinstance(x, list) else x

    return ml_collections.ConfigDict(tuples(json.loads(path.read_text())))
