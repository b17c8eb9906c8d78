"""Read PyTorch ``torch.save`` files (.pth, .pt, .bin, .ckpt) into NumPy arrays without torch.

``torch.save`` has written two formats over the years:

* **zip** (the default since PyTorch 1.6): a zip archive holding ``<name>/data.pkl`` (the pickled
  object, in which every tensor refers to a storage by key) and one raw file ``<name>/data/<key>``
  per storage, plus ``<name>/byteorder`` (``little`` or ``big``; absent means little);
* **legacy** (``_use_new_zipfile_serialization=False``, and every release before 1.6, e.g. the 2019
  ``pt_inception-2015-12-05-6726825d.pth`` FID weights): five pickles in a row (the magic number
  0x1950a86a20f9469cfc6c, the protocol version 1001, system info, the object, the sorted list of
  storage keys) followed by each storage's bytes, each prefixed by its element count as a
  little-endian int64.

In both, a tensor is pickled as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``
and a storage as a *persistent id* ``("storage", torch.FloatStorage, key, location, numel[, view])``.
A pickle can call any importable function, so we never use ``pickle.load`` as is: our unpickler
(:class:`_RestrictedUnpickler`) resolves only a short list of names (OrderedDict, the tensor and
parameter rebuild functions, the storage types) to our own NumPy stand-ins, and refuses anything
else with an error that names it. Nothing from torch is imported or executed.

    state = load_state_dict("pt_inception-2015-12-05-6726825d.pth")  # {"Conv2d_1a_3x3.conv.weight": array, ...}

As a command, it converts a file to safetensors (no torch needed):

    python -m ddpm_jax.pretrained.torch_pickle pt_inception-2015-12-05-6726825d.pth pt_inception.safetensors
"""

from __future__ import annotations

import argparse
import collections
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # first pickle of a legacy file
PROTOCOL_VERSION = 1001  # second pickle of a legacy file

# torch's storage classes → NumPy element types
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}


# --------------------------------------------------------------------------------------------
# Stand-ins for what the pickle refers to
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StorageType:
    """What ``torch.FloatStorage`` etc. unpickle to: only its element type matters."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.name]


class _Storage:
    """A flat typed buffer, filled after unpickling (legacy) or read on first use (zip)."""

    def __init__(self, dtype: np.dtype, numel: int, read: Callable[[], np.ndarray] | None = None):
        self.dtype, self.numel, self._read, self._data = dtype, numel, read, None
        self._root, self._offset = None, 0  # a view: elements [offset, offset + numel) of root

    def view(self, offset: int, numel: int) -> _Storage:
        view = _Storage(self.dtype, numel)
        view._root, view._offset = self, offset
        return view

    @property
    def data(self) -> np.ndarray:  # [numel]
        if self._root is not None:
            return self._root.data[self._offset : self._offset + self.numel]
        if self._data is None:
            if self._read is None:
                raise ValueError("corrupt file: a storage's data was never read")
            self._data = self._read()
            if self._data.shape != (self.numel,):
                raise ValueError(f"corrupt file: storage holds {self._data.size} elements, expected {self.numel}")
        return self._data

    def set_data(self, data: np.ndarray) -> None:
        self._data = data


@dataclass
class _LazyTensor:
    """A tensor met while unpickling; its storage may not have been read yet."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialize(self) -> np.ndarray:
        data = self.storage.data
        if not self.size:  # a 0-d tensor
            return np.array(data[self.offset : self.offset + 1].reshape(()))
        if 0 in self.size:
            return np.zeros(self.size, data.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if self.offset < 0 or last >= data.size:
            raise ValueError(f"corrupt file: tensor of size {self.size} runs past its storage of {data.size} elements")
        strides = tuple(s * data.itemsize for s in self.stride)
        view = np.lib.stride_tricks.as_strided(data[self.offset :], self.size, strides, writeable=False)
        return np.array(view)  # a contiguous copy that owns its memory


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> _LazyTensor:
    """``torch._utils._rebuild_tensor_v2``: the tensor is a strided view of a storage."""
    return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None) -> _LazyTensor:
    """``torch._utils._rebuild_parameter[_with_state]``: an nn.Parameter is its tensor."""
    return data


class UnknownObject:
    """An instance of a class the file refers to that we do not rebuild (only with ``allow_unknown=True``).

    Holds the constructor arguments and the pickled state; no code of the original class runs.
    """

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> UnknownObject:
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"UnknownObject({self.qualname})"


def _unknown(qualname: str) -> type[UnknownObject]:
    return type(qualname.rsplit(".", 1)[-1], (UnknownObject,), {"qualname": qualname})


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only build containers, NumPy stand-ins for tensors, and plain values."""

    def __init__(self, file: BinaryIO, persistent_load: Callable[[tuple], Any] | None = None,
                 allow_unknown: bool = False):
        super().__init__(file, encoding="utf-8")
        self._persistent_load, self._allow_unknown = persistent_load, allow_unknown

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if self._allow_unknown:
            return _unknown(f"{module}.{name}")
        raise pickle.UnpicklingError(
            f"the file refers to {module}.{name}, which this torch-free reader does not rebuild (it only "
            "reads tensors, dicts, lists and plain values); pass allow_unknown=True to keep a placeholder"
        )

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_load is None:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return self._persistent_load(pid)


def _decode(value: Any) -> Any:
    return value.decode("ascii") if isinstance(value, bytes) else value


def _materialize(obj: Any) -> Any:
    """Replace every _LazyTensor in a nested structure by its array."""
    if isinstance(obj, _LazyTensor):
        return obj.materialize()
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for key, value in obj.items():
            out[key] = _materialize(value)
        return out
    if isinstance(obj, list):
        return [_materialize(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v) for v in obj)
    return obj


# --------------------------------------------------------------------------------------------
# The two file formats
# --------------------------------------------------------------------------------------------


def _load_zip(path: Path, allow_unknown: bool) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path} is a zip file but not a torch.save archive (no single data.pkl inside)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode().strip()
        storages: dict[str, _Storage] = {}

        def read_storage(key: str, dtype: np.dtype, numel: int) -> Callable[[], np.ndarray]:
            def read() -> np.ndarray:
                stored = dtype.newbyteorder("<" if byteorder == "little" else ">")
                array = np.empty(numel, stored)
                with archive.open(f"{prefix}data/{key}") as f:
                    f.readinto(memoryview(array.view(np.uint8)))
                return array.astype(dtype, copy=False)

            return read

        def persistent_load(pid: tuple) -> _Storage:
            kind, storage_type, key, numel = _decode(pid[0]), pid[1], pid[2], pid[4]  # pid[3]: device
            if kind != "storage":
                raise pickle.UnpicklingError(f"unknown persistent id type {kind!r} in {path}")
            key = _decode(key)
            if key not in storages:
                storages[key] = _Storage(storage_type.dtype, numel, read_storage(key, storage_type.dtype, numel))
            return storages[key]

        with archive.open(pickles[0]) as f:
            obj = _RestrictedUnpickler(f, persistent_load, allow_unknown).load()
        return _materialize(obj)  # reads the storages while the archive is open


def _load_legacy(path: Path, allow_unknown: bool) -> Any:
    with open(path, "rb") as f:
        try:
            magic = _RestrictedUnpickler(f).load()
        except Exception as err:
            raise ValueError(f"{path} is neither a torch.save zip archive nor a legacy torch pickle") from err
        if magic != MAGIC_NUMBER:
            raise ValueError(f"{path} is not a torch.save file (wrong magic number {magic!r})")
        version = _RestrictedUnpickler(f).load()
        if version != PROTOCOL_VERSION:
            raise ValueError(f"{path}: unsupported legacy torch.save protocol version {version}")
        sys_info = _RestrictedUnpickler(f).load()
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path} was saved on a big-endian machine: not supported")
        roots: dict[str, _Storage] = {}

        def persistent_load(pid: tuple) -> Any:
            if _decode(pid[0]) == "module":  # ("module", class, source file, source) of a pickled nn.Module
                return pid[1]  # the class, already resolved (or refused) by find_class
            kind, storage_type, root_key, numel, view_metadata = _decode(pid[0]), *pid[1:3], *pid[4:6]
            if kind != "storage":
                raise pickle.UnpicklingError(f"unknown persistent id type {kind!r} in {path}")
            root_key = _decode(root_key)
            if root_key not in roots:
                roots[root_key] = _Storage(storage_type.dtype, numel)
            if view_metadata is None:
                return roots[root_key]
            _view_key, offset, view_numel = view_metadata
            return roots[root_key].view(offset, view_numel)

        obj = _RestrictedUnpickler(f, persistent_load, allow_unknown).load()
        keys = [_decode(k) for k in _RestrictedUnpickler(f).load()]
        for key in keys:  # each storage: int64 element count, then the raw little-endian bytes
            storage = roots[key]
            numel = int(np.frombuffer(f.read(8), "<i8")[0])
            if numel != storage.numel:
                raise ValueError(f"corrupt file {path}: storage {key} has {numel} elements, expected {storage.numel}")
            array = np.empty(numel, storage.dtype.newbyteorder("<"))
            if f.readinto(memoryview(array.view(np.uint8))) != array.nbytes:
                raise ValueError(f"{path} is truncated (storage {key} is incomplete)")
            storage.set_data(array.astype(storage.dtype, copy=False))
    return _materialize(obj)


def load(path: str | Path, allow_unknown: bool = False) -> Any:
    """The object ``torch.save`` wrote to ``path``, with every tensor as a NumPy array.

    Reads both the zip and the legacy format (see the module docstring). Classes other than
    OrderedDict and tensors raise ``pickle.UnpicklingError`` naming the class, unless
    ``allow_unknown`` (then they become inert :class:`UnknownObject` placeholders; e.g. the
    PyTorch Lightning callbacks stored next to the weights in a Stable Diffusion ``.ckpt``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # as torch: the local-file-header magic at the start
    if is_zip:
        return _load_zip(path, allow_unknown)
    return _load_legacy(path, allow_unknown)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A flat ``{name: array}`` state dict from a ``torch.save`` file.

    Accepts a bare state dict or a checkpoint dict holding one under ``"state_dict"`` (PyTorch
    Lightning, Stable Diffusion ``.ckpt``); keeps only the array entries.
    """
    obj = load(path, allow_unknown=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    state = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if not state:
        raise ValueError(f"{path} holds a dict without tensors (keys: {list(obj)[:10]})")
    return state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ddpm_jax.pretrained.torch_pickle",
        description="Convert a torch.save state dict (.pth/.pt/.bin/.ckpt) to .safetensors without torch.",
    )
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    from safetensors.numpy import save_file

    state = load_state_dict(args.source)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(args.target))
    print(f"wrote {len(state)} tensors to {args.target}")


if __name__ == "__main__":
    main()


__all__ = ["MAGIC_NUMBER", "PROTOCOL_VERSION", "STORAGE_DTYPES", "UnknownObject", "load", "load_state_dict"]
