"""Read PyTorch checkpoints written by `torch.save` into numpy arrays, without importing torch.

Pretrained backbone weights (METHOD.md section 2) are published as torch pickles. Unpickling runs
whatever globals the file names, so this reader admits only the few globals a plain state dict
needs (tensor rebuilders, storage types, OrderedDict) and refuses anything else by name. Tensors are
rebuilt with torch's `as_strided` semantics (size, stride, storage offset) into owning, C-contiguous
numpy arrays.

Both layouts torch has written are read:
  * zip (torch >= 1.6): `<prefix>/data.pkl`, one `<prefix>/data/<key>` record per storage and an
    optional `<prefix>/byteorder` ("little" when absent).
  * legacy: a stream of pickles (magic number, protocol, system info, the object, storage keys)
    followed by each storage as a little-endian int64 element count and its raw bytes.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

# torch's storage classes -> element dtype. bfloat16 has no numpy builtin; ml_dtypes ships with jax.
_STORAGE_DTYPES: dict[str, np.dtype] = {
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

# First pickle of a legacy (pre-zip) torch file.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class ForbiddenGlobalError(pickle.UnpicklingError):
    """The checkpoint names a global outside the allow-list (its message names the global)."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: np.dtype


class _Storage:
    """A flat typed buffer; `flat` is set once its bytes are read (after unpickling, in legacy)."""

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype = dtype
        self.numel = numel
        self.flat: np.ndarray | None = None

    def set_bytes(self, raw: bytes, byteorder: str) -> None:
        need = self.numel * self.dtype.itemsize
        if len(raw) < need:
            raise pickle.UnpicklingError(f"storage holds {len(raw)} bytes, expected {need}")
        flat = np.frombuffer(
            raw, dtype=self.dtype.newbyteorder("<" if byteorder == "little" else ">")
        )
        # astype to the native dtype so big-endian files come out in native order; a no-op copy
        # otherwise, which also detaches the array from the (read-only) bytes.
        self.flat = flat[: self.numel].astype(self.dtype)

    def view(self) -> np.ndarray:
        if self.flat is None:
            raise pickle.UnpicklingError("a tensor refers to a storage whose bytes were never read")
        return self.flat


@dataclasses.dataclass(frozen=True)
class _StorageView:
    """A legacy-format view into a root storage (element offset and length)."""

    root: _Storage
    start: int
    numel: int

    @property
    def dtype(self) -> np.dtype:
        return self.root.dtype

    def view(self) -> np.ndarray:
        return self.root.view()[self.start : self.start + self.numel]


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    """A tensor awaiting its storage bytes; materialised after the whole pickle is read."""

    storage: _Storage | _StorageView
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialise(self) -> np.ndarray:
        flat = self.storage.view()
        dtype = self.storage.dtype
        if len(self.size) != len(self.stride):
            raise pickle.UnpicklingError(f"tensor size {self.size} and stride {self.stride} differ")
        if any(n < 0 for n in self.size) or any(s < 0 for s in self.stride) or self.offset < 0:
            raise pickle.UnpicklingError(f"negative size/stride/offset in tensor {self}")
        if 0 in self.size:
            return np.empty(self.size, dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if last >= flat.shape[0]:
            # A corrupt or hostile file must not make as_strided read past the buffer.
            raise pickle.UnpicklingError(
                f"tensor (offset {self.offset}, size {self.size}, stride {self.stride}) "
                f"reaches element {last} of a storage with {flat.shape[0]}"
            )
        strided = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.size,
            strides=tuple(s * dtype.itemsize for s in self.stride),
            writeable=False,
        )
        return np.array(strided, order="C", copy=True)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, *_unused):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad, backward_hooks, *_state):
    # A Parameter is its data for our purposes; grads and hooks do not survive into numpy.
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED_GLOBALS`; storages come from `storage_for(persistent id)`."""

    def __init__(self, file: BinaryIO, storage_for=None):
        super().__init__(file)
        self._storage_for = storage_for

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ForbiddenGlobalError(
                f"refusing to load global {module}.{name}: only plain tensor state dicts are "
                f"accepted (allowed: {sorted(f'{m}.{n}' for m, n in _ALLOWED_GLOBALS)})"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._storage_for is None:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return self._storage_for(pid)


def _materialise(obj: Any) -> Any:
    if isinstance(obj, _TensorRef):
        return obj.materialise()
    if isinstance(obj, dict):
        return {k: _materialise(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialise(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v) for v in obj)
    return obj


def _storage_type(pid: tuple, kind: str) -> _StorageType:
    if not pid or pid[0] != "storage":
        raise pickle.UnpicklingError(f"unsupported persistent id {pid[:1]!r} in {kind} checkpoint")
    if not isinstance(pid[1], _StorageType):
        raise pickle.UnpicklingError(f"unsupported storage type {pid[1]!r}")
    return pid[1]


def _load_zip(archive: zipfile.ZipFile) -> Any:
    pkl_names = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if not pkl_names:
        raise ValueError("zip file has no data.pkl: not a torch.save checkpoint")
    prefix = pkl_names[0][: -len("data.pkl")]
    names = set(archive.namelist())
    byteorder = "little"
    if f"{prefix}byteorder" in names:
        byteorder = archive.read(f"{prefix}byteorder").decode().strip()
    if byteorder not in ("little", "big"):
        raise ValueError(f"unknown byteorder record {byteorder!r}")
    storages: dict[str, _Storage] = {}

    def storage_for(pid: tuple) -> _Storage:
        stype = _storage_type(pid, "zip")
        key, numel = str(pid[2]), int(pid[4])
        if key not in storages:
            storage = _Storage(stype.dtype, numel)
            storage.set_bytes(archive.read(f"{prefix}data/{key}"), byteorder)
            storages[key] = storage
        return storages[key]

    with archive.open(pkl_names[0]) as f:
        return _materialise(_RestrictedUnpickler(f, storage_for).load())


def _load_legacy(f: BinaryIO) -> Any:
    def plain() -> Any:
        return _RestrictedUnpickler(f).load()

    try:
        magic = plain()
    except ForbiddenGlobalError:
        raise
    except Exception as e:
        raise ValueError(f"not a torch checkpoint (neither zip nor legacy pickle): {e}") from e
    if magic != _LEGACY_MAGIC:
        raise ValueError(
            "not a torch checkpoint: legacy magic number missing (tar format unsupported)"
        )
    plain()  # protocol version
    sys_info = plain()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise ValueError("big-endian legacy torch checkpoints are not supported")
    roots: dict[str, _Storage] = {}
    views: dict[str, _StorageView] = {}

    def storage_for(pid: tuple) -> _Storage | _StorageView:
        stype = _storage_type(pid, "legacy")
        root_key, numel, view_meta = str(pid[2]), int(pid[4]), pid[5]
        if root_key not in roots:
            roots[root_key] = _Storage(stype.dtype, numel)
        if view_meta is None:
            return roots[root_key]
        view_key, start, length = view_meta
        views.setdefault(str(view_key), _StorageView(roots[root_key], int(start), int(length)))
        return views[str(view_key)]

    result = _RestrictedUnpickler(f, storage_for).load()
    for key in plain():
        storage = roots[str(key)]
        (numel,) = struct.unpack("<q", f.read(8))
        storage.numel = numel
        storage.set_bytes(f.read(numel * storage.dtype.itemsize), "little")
    return _materialise(result)


def load_pickle(path: str | os.PathLike) -> Any:
    """The object `torch.save` wrote to `path`, with every tensor as a numpy array.

    Raises:
      ForbiddenGlobalError (a pickle.UnpicklingError): the file names a global outside the
        tensor-rebuilding allow-list.
      ValueError: the file is not a torch checkpoint in a supported layout.
    """
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if head.startswith(b"PK"):
            with zipfile.ZipFile(f) as archive:
                return _load_zip(archive)
        return _load_legacy(f)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A torch state dict file (`torch.save(model.state_dict(), path)`) as {name: np.ndarray}.

    Arrays keep torch's dtype (float16/bfloat16/int64 ...) and shape; no torch import is needed.

    Raises:
      ForbiddenGlobalError (a pickle.UnpicklingError): the file names a disallowed global.
      ValueError: the file is not a flat mapping of names to tensors.
    """
    obj = load_pickle(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict (mapping), got {type(obj).__name__}")
    bad = [
        str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)
    ]
    if bad:
        raise ValueError(f"{path}: entries that are not name -> tensor: {bad[:10]}")
    return dict(obj)
