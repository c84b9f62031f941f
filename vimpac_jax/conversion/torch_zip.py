"""A writer of PyTorch's zip checkpoint format that never imports torch.

The inverse of `torch_pickle.py`'s reader: `save_state_dict` writes what `torch.save(state_dict)`
writes, so that PyTorch code (the released VIMPAC trainer, torch's loader with weights_only=True)
reads our arrays as tensors.

Archive layout (torch >= 1.6, as torch 2.x writes it; `<top>` is the file's stem):
  <top>/data.pkl              protocol-2 pickle of an OrderedDict {name: tensor}
  <top>/.format_version       b"1"
  <top>/.storage_alignment    b"64"
  <top>/byteorder             b"little"
  <top>/data/<key>            raw little-endian bytes of one storage
  <top>/version               b"3\\n"
Entries are stored uncompressed, their data aligned to 64 bytes (torch pads the local header
with an extra field 'FB' so that torch's memory-mapped loading can map the storages in place).

In the pickle a tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, backward_hooks)` and a storage is the persistent id
`('storage', torch.<Type>Storage, key, 'cpu', numel)`. Those names must appear as GLOBAL opcodes,
but pickle only writes a global after importing it to check that it resolves, which would need
torch. `_TorchPickler` therefore writes the GLOBAL opcodes of `_Global` markers itself.

Public API:
  save_state_dict(state_dict, path)      {name: np.ndarray} -> classifier.pt
  save_namespace(fields, path)           {field: value} -> args.pickle (an argparse.Namespace)
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Mapping

import numpy as np

from vimpac_jax.conversion.torch_pickle import _STORAGE_DTYPES

ALIGNMENT = 64
# torch writes every entry with this timestamp, so files of equal content are equal bytes.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
# numpy dtype -> torch storage class name, the inverse of the reader's table.
_STORAGE_NAMES = {np.dtype(dtype): name for name, dtype in _STORAGE_DTYPES.items()}


class _Global:
    """A marker pickled as the GLOBAL opcode `module.name`, without importing `module`.

    Callable only so that pickle accepts it as the function of a reduce; calling it is a bug.
    """

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args, **kwargs):
        raise TypeError(f"{self.module}.{self.name} is a pickling marker, not callable")

    def __repr__(self):
        return f"_Global({self.module}.{self.name})"


_REBUILD_TENSOR_V2 = _Global("torch._utils", "_rebuild_tensor_v2")
# One marker per storage type, so that repeated references are memoised (BINGET) as torch does.
_STORAGE_GLOBALS = {name: _Global("torch", name) for name in _STORAGE_DTYPES}


class _StorageRef:
    """A storage to be written as a persistent id; its bytes go to `data/<key>`."""

    def __init__(self, key: str, array: np.ndarray):
        self.key = key
        self.array = array  # 1-d, contiguous, little-endian

    def persistent_id(self) -> tuple:
        dtype_name = _STORAGE_NAMES[np.dtype(self.array.dtype.newbyteorder("="))]
        return ("storage", _STORAGE_GLOBALS[dtype_name], self.key, "cpu", int(self.array.size))


class _TensorRef:
    """A contiguous tensor over a whole storage; pickles as `_rebuild_tensor_v2(...)`."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
        self.storage = storage
        self.shape = shape

    def __reduce__(self):
        stride = tuple(int(np.prod(self.shape[i + 1:], dtype=np.int64)) for i in range(len(self.shape)))
        # (storage, storage_offset, size, stride, requires_grad, backward_hooks)
        return _REBUILD_TENSOR_V2, (self.storage, 0, self.shape, stride, False, collections.OrderedDict())


class _TorchPickler(pickle._Pickler):
    """Protocol-2 pickler that writes `_Global` markers as GLOBAL opcodes and storages as pids.

    Built on the pure-Python pickler because only it has a per-type dispatch table into which
    a raw-opcode writer can be added; the C pickler always verifies globals by importing them.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_marker(self, obj: _Global):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
        self.memoize(obj)

    dispatch[_Global] = _save_marker

    def persistent_id(self, obj):
        return obj.persistent_id() if isinstance(obj, _StorageRef) else None


def _storage_array(value: np.ndarray, name: str) -> np.ndarray:
    """The flat, contiguous, little-endian copy of `value` that becomes its storage."""
    array = np.asarray(value)
    native = np.dtype(array.dtype.newbyteorder("="))
    if native not in _STORAGE_NAMES:
        raise TypeError(f"{name}: dtype {array.dtype} has no torch storage type "
                        f"(supported: {sorted(str(d) for d in _STORAGE_NAMES)})")
    return np.ascontiguousarray(array.reshape(-1)).astype(native.newbyteorder("<"), copy=False)


def _aligned_info(archive: zipfile.ZipFile, name: str, size: int) -> zipfile.ZipInfo:
    """A ZipInfo whose `size` bytes of data will start at a multiple of ALIGNMENT in the file."""
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_STORED
    # Local header = 30 bytes + name + extra; our extra field has a 4-byte header, and zipfile
    # appends a 20-byte zip64 field after it for entries near 2 GiB or more (its own rule).
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT
    offset = archive.fp.tell() + 30 + len(name.encode("utf-8")) + 4 + (20 if zip64 else 0)
    pad = (-offset) % ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return info


def save_state_dict(state_dict: Mapping[str, np.ndarray], path, *, archive_name: str | None = None) -> None:
    """Write {name: array} as `torch.save(OrderedDict(...), path)` would, without torch.

    Values that are the same Python object share one storage, as tied parameters do in a torch
    state_dict (`torch.load` returns tensors that share memory). Entries keep the mapping's
    order. 0-d arrays become 0-d tensors. `archive_name` is the archive's top folder (torch
    uses the file stem).
    """
    path = os.fspath(path)
    top = archive_name or os.path.splitext(os.path.basename(path))[0] or "archive"
    storages: dict[int, _StorageRef] = {}
    tensors = collections.OrderedDict()
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"state_dict keys must be str, got {name!r}")
        if id(value) not in storages:
            storages[id(value)] = _StorageRef(str(len(storages)), _storage_array(value, name))
        tensors[name] = _TensorRef(storages[id(value)], tuple(int(s) for s in np.shape(value)))

    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump(tensors)
    records = [("data.pkl", buffer.getvalue()), (".format_version", b"1"),
               (".storage_alignment", str(ALIGNMENT).encode()), ("byteorder", b"little")]
    records += [(f"data/{s.key}", s.array.tobytes()) for s in storages.values()]
    records.append(("version", b"3\n"))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, data in records:
            archive.writestr(_aligned_info(archive, f"{top}/{name}", len(data)), data)


def save_namespace(fields: Mapping[str, Any], path) -> None:
    """Pickle `argparse.Namespace(**fields)` (protocol 2), as the released trainer saves its args."""
    with open(os.fspath(path), "wb") as f:
        pickle.dump(argparse.Namespace(**fields), f, protocol=2)
