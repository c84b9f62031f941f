"""A restricted reader for PyTorch files that never runs code from the file.

`torch.load` unpickles with the full power of pickle: any global the file names is imported
and called. The files we import (released VIMPAC checkpoints, the published DALL-E
`encoder.pkl`/`decoder.pkl`) only need a handful of names, so this module reads them with a
`pickle.Unpickler` whose `find_class` maps each allowed name to an inert local stand-in and
refuses every other name *before* anything is called. torch itself is never imported.

File format (torch >= 1.6 "zip" format): a zip whose single top folder (its name varies with
the file name it was saved under) holds `data.pkl` (the pickle), `byteorder` and one blob
`data/<key>` per storage. The pickle refers to storages by persistent id
`('storage', storage_type, key, location, numel)`; tensors are rebuilt from a storage with
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`.

Public API:
  load_state_dict(path) -> {name: np.ndarray}
  load_module(path) -> ModuleRecord          (a whole pickled nn.Module, as `torch.save(module)`)
  load_plain_pickle(path) -> object          (e.g. args.pickle; argparse.Namespace -> dict)
  named_tensors(record) -> {dotted.name: np.ndarray}
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import zipfile
import zlib
from typing import Any, Callable

import numpy as np

try:  # bfloat16 for numpy; ml_dtypes ships with jax.
    from ml_dtypes import bfloat16 as _np_bfloat16
except ImportError:  # pragma: no cover - jax always brings it
    _np_bfloat16 = None


class UnsafePickleError(ValueError):
    """The file names a global outside the allow-list (or misuses an allowed one)."""


@dataclasses.dataclass
class ModuleRecord:
    """An inert stand-in for a pickled `torch.nn.Module`.

    class_name: the dotted class the file names, e.g. 'dall_e.encoder.Encoder'.
    state: the module's __dict__ as the pickle's BUILD set it; `_parameters`, `_buffers` and
      `_modules` are plain dicts whose values are np.ndarray / ModuleRecord / None.
    """

    class_name: str
    state: dict


# ---------------------------------------------------------------------------------------------
# Storages and tensors


# Storage class name (the part after 'torch.' / 'torch.cuda.') -> numpy element type.
_STORAGE_DTYPES: dict[str, Any] = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}
if _np_bfloat16 is not None:
    _STORAGE_DTYPES["BFloat16Storage"] = _np_bfloat16


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """What `torch.FloatStorage` & co. unpickle to: only a dtype, never callable."""

    name: str
    dtype: Any


@dataclasses.dataclass(frozen=True)
class _Storage:
    """A storage read from the archive: a flat 1-d array of `numel` elements."""

    key: str
    array: np.ndarray


class _Tensor:
    """A rebuilt tensor while unpickling; turned into its ndarray by `_finalize`, which knows
    its name. `problem` says why the view cannot be read (then nothing was allocated).

    Boxing keeps a malicious BUILD opcode from reaching `np.ndarray.__setstate__`.
    """

    __slots__ = ("storage", "offset", "size", "stride", "problem")

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple, problem: str | None):
        self.storage, self.offset, self.size, self.stride, self.problem = storage, offset, size, stride, problem

    def __setstate__(self, state):
        raise UnsafePickleError("a tensor may not receive pickle state (BUILD)")

    def array(self, source: str, name: str) -> np.ndarray:
        if self.problem:
            raise ValueError(f"{source}: tensor {name or '(top level)'} (storage {self.storage.key}): {self.problem}")
        return _strided_copy(self.storage.array, self.offset, self.size, self.stride)


def _view_problem(numel: int, offset: int, size: tuple, stride: tuple) -> str | None:
    """Why the view `flat[offset + sum(i_k * stride_k)]` of shape `size` cannot be read out of a
    storage of `numel` elements, or None. Checked before anything is allocated: `as_strided`
    would read memory outside the storage, and a view of more elements than its storage (a
    zero or overlapping stride, as an `expand()`ed tensor has) would make a 1 KB file allocate
    gigabytes when materialised. The checkpoints read here hold no such views."""
    if len(size) != len(stride):
        return f"size {list(size)} and stride {list(stride)} differ in rank"
    if any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        return f"negative size/stride/offset: size {list(size)}, stride {list(stride)}, offset {offset}"
    count = math.prod(size)
    if count == 0:
        return None
    last = offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= numel:
        return (f"the view (offset {offset}, size {list(size)}, stride {list(stride)}) reaches element {last} "
                f"of a storage of {numel} elements")
    if count > numel:
        return (f"size {list(size)} is {count} elements, more than its storage's {numel} "
                f"(stride {list(stride)} repeats elements)")
    return None


def _strided_copy(flat: np.ndarray, offset: int, size: tuple, stride: tuple) -> np.ndarray:
    """Copy the view `flat[offset + sum(i_k * stride_k)]` of shape `size` out of a storage.

    flat: 1-d storage array [numel]. offset, size, stride: in elements, as torch stores them,
    already checked by `_view_problem`.
    """
    if 0 in size:
        return np.empty(size, dtype=flat.dtype)
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(st * item for st in stride), writeable=False)
    return np.array(view, copy=True)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    """Stand-in for `torch._utils._rebuild_tensor_v2`: a boxed, checked view (see `_Tensor`)."""
    if not isinstance(storage, _Storage):
        raise UnsafePickleError("_rebuild_tensor_v2 called without a storage")
    try:
        size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(storage_offset)
    except (TypeError, ValueError) as e:
        raise UnsafePickleError(f"_rebuild_tensor_v2: size/stride/offset are not integers ({e})") from e
    return _Tensor(storage, offset, size, stride, _view_problem(len(storage.array), offset, size, stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """Stand-in for `torch._utils._rebuild_parameter[_with_state]`: a Parameter is its data."""
    if not isinstance(data, _Tensor):
        raise UnsafePickleError("_rebuild_parameter called without a tensor")
    return data


def _device(*args):
    """Stand-in for `torch.device(...)`: the device as a string such as 'cpu' or 'cuda:0'."""
    if not args or not all(isinstance(a, (str, int)) for a in args):
        raise UnsafePickleError(f"torch.device called with {args!r}")
    return ":".join(str(a) for a in args)


class _OrderedDict(dict):
    """Stand-in for `collections.OrderedDict` (plain dicts keep order too).

    torch attaches a `_metadata` attribute to state_dicts, which pickle restores with BUILD;
    it only holds version numbers, so it is accepted and dropped.
    """

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise UnsafePickleError("OrderedDict: BUILD state is not a dict")


def _safe_set(items=()):
    """`builtins.set` restricted to hashable scalars (torch pickles sets of buffer names)."""
    items = list(items)
    if not all(isinstance(i, (str, int, float, bool, type(None))) for i in items):
        raise UnsafePickleError("builtins.set called with non-scalar items")
    return set(items)


def _safe_frozenset(items=()):
    return frozenset(_safe_set(items))


# ---------------------------------------------------------------------------------------------
# Placeholders for classes instantiated with NEWOBJ + BUILD (modules, argparse.Namespace)


class _Pending:
    """Base of per-class placeholder types; NEWOBJ needs a real type to call `__new__` on."""

    _class_name = "?"

    def __new__(cls, *args, **kwargs):
        if args or kwargs:
            raise UnsafePickleError(f"{cls._class_name} constructed with arguments")
        obj = object.__new__(cls)
        obj.state = {}
        return obj

    def __init__(self, *args, **kwargs):  # REDUCE would call cls(); keep it inert
        pass

    def __setstate__(self, state):
        # torch modules BUILD with their __dict__ (protocol 2); a (dict, slots) pair is the
        # other form pickle may write.
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise UnsafePickleError(f"{self._class_name}: BUILD state is not a dict")
        self.state.update(state)


_PLACEHOLDERS: dict[str, type] = {}


def _placeholder(class_name: str) -> type:
    """One placeholder type per dotted class name (cached so memo'd references agree)."""
    if class_name not in _PLACEHOLDERS:
        _PLACEHOLDERS[class_name] = type(
            "Pending_" + class_name.replace(".", "_"), (_Pending,), {"_class_name": class_name})
    return _PLACEHOLDERS[class_name]


# ---------------------------------------------------------------------------------------------
# Allow-lists: dotted name -> the local stand-in.

_TENSOR_GLOBALS: dict[str, Any] = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "collections.OrderedDict": _OrderedDict,
    "torch.device": _device,
    "builtins.set": _safe_set,
}
for _name, _dtype in _STORAGE_DTYPES.items():
    _TENSOR_GLOBALS[f"torch.{_name}"] = _StorageType(_name, _dtype)
    # Files saved from GPU (as the 2021 DALL-E files may be) name the CUDA class.
    _TENSOR_GLOBALS[f"torch.cuda.{_name}"] = _StorageType(_name, _dtype)
# torch 2.x untyped storages hold raw bytes; the tensor's own dtype is not recoverable from
# `_rebuild_tensor_v2`'s arguments, so they are read as uint8.
_TENSOR_GLOBALS["torch.UntypedStorage"] = _StorageType("UntypedStorage", np.uint8)
_TENSOR_GLOBALS["torch.storage.UntypedStorage"] = _StorageType("UntypedStorage", np.uint8)

# Module classes a published DALL-E encoder.pkl / decoder.pkl names (the modules of openai/DALL-E,
# `dall_e/encoder.py` and `dall_e/decoder.py`, and the torch.nn ones they hold).
MODULE_CLASSES: tuple[str, ...] = (
    "dall_e.encoder.Encoder",
    "dall_e.encoder.EncoderBlock",
    "dall_e.decoder.Decoder",
    "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.linear.Identity",
    "torch.nn.modules.upsampling.Upsample",
)

_PLAIN_GLOBALS: dict[str, Any] = {
    "argparse.Namespace": _placeholder("argparse.Namespace"),
    "builtins.set": _safe_set,
    "builtins.frozenset": _safe_frozenset,
}

# Python 2 module names that protocol-2 pickles (torch's default) still write.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and storages from a zip archive.

    allowed: dotted name -> stand-in object. read_blob: storage key -> bytes (None for plain
    pickles, which then refuse persistent ids).
    """

    def __init__(self, file, *, source: str, allowed: dict[str, Any],
                 read_blob: Callable[[str], bytes] | None = None, byteorder: str = "little"):
        super().__init__(file)
        self._source = source
        self._allowed = allowed
        self._read_blob = read_blob
        self._byteorder = byteorder
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        module = _PY2_MODULES.get(module, module)
        full = f"{module}.{name}"
        if full not in self._allowed:
            raise UnsafePickleError(f"{self._source}: refused global {full!r}")
        return self._allowed[full]

    def persistent_load(self, pid):
        if self._read_blob is None:
            raise UnsafePickleError(f"{self._source}: unexpected persistent id in a plain pickle")
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"{self._source}: unsupported persistent id {pid!r:.200}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"{self._source}: storage of unknown type {storage_type!r:.100}")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = self._load_storage(storage_type, key, int(numel))
        return self._storages[key]

    def _load_storage(self, storage_type: _StorageType, key: str, numel: int) -> _Storage:
        dtype = np.dtype(storage_type.dtype)
        blob = self._read_blob(key)
        if numel < 0 or numel * dtype.itemsize > len(blob):
            raise ValueError(f"{self._source}: storage {key} has {len(blob)} bytes, "
                             f"needs {numel} x {dtype.itemsize}")
        flat = np.frombuffer(blob, dtype=dtype, count=numel)
        if self._byteorder == "big" and dtype.itemsize > 1:
            flat = flat.byteswap()
        return _Storage(key, flat)


# ---------------------------------------------------------------------------------------------
# Reading archives


# What a truncated or garbled archive or pickle raises (TypeError: an allowed stand-in called
# with arguments of the wrong kind).
_DAMAGED = (zipfile.BadZipFile, zlib.error, EOFError, pickle.UnpicklingError, TypeError)


def _unpickle_zip(path, allowed: dict[str, Any]) -> Any:
    """Unpickle `<top>/data.pkl` of a torch zip archive with the given allow-list; a damaged
    archive or pickle is a ValueError naming the file."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a torch zip-format file (the legacy pre-1.6 tar/pickle "
                         "format is not supported; re-save it with a recent torch)")
    try:
        return _unpickle_archive(path, allowed)
    except _DAMAGED as e:
        raise ValueError(f"{path}: damaged file ({type(e).__name__}: {e})") from e


def _unpickle_archive(path: str, allowed: dict[str, Any]) -> Any:
    with zipfile.ZipFile(path) as archive:
        pkls = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise ValueError(f"{path}: expected one <folder>/data.pkl, found {pkls}")
        prefix = pkls[0][: -len("data.pkl")]
        names = set(archive.namelist())
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode("ascii").strip()

        def read_blob(key: str) -> bytes:
            member = f"{prefix}data/{key}"
            if member not in names:
                raise ValueError(f"{path}: missing storage blob {member}")
            return archive.read(member)

        unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pkls[0])), source=path,
                                         allowed=allowed, read_blob=read_blob, byteorder=byteorder)
        return unpickler.load()


def _finalize(obj: Any, source: str, memo: dict[int, Any] | None = None, name: str = "") -> Any:
    """Replace the unpickling stand-ins by their public forms, recursively.

    _Tensor -> np.ndarray (errors name `source` and the tensor's path of keys, `name`); module
    placeholders -> ModuleRecord; argparse.Namespace -> dict; OrderedDict was already a dict.
    Shared objects stay shared (memo by id).
    """
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    child = lambda key: f"{name}.{key}" if name else str(key)  # noqa: E731
    if isinstance(obj, _Tensor):
        out = obj.array(source, name)
    elif isinstance(obj, _Pending):
        if obj._class_name == "argparse.Namespace":
            out = {}
            memo[id(obj)] = out
            out.update({k: _finalize(v, source, memo, child(k)) for k, v in obj.state.items()})
            return out
        out = ModuleRecord(obj._class_name, {})
        memo[id(obj)] = out
        out.state.update({k: _finalize(v, source, memo, child(k)) for k, v in obj.state.items()})
        return out
    elif isinstance(obj, dict):
        out = {}
        memo[id(obj)] = out
        out.update({k: _finalize(v, source, memo, child(k)) for k, v in obj.items()})
        return out
    elif isinstance(obj, list):
        out = []
        memo[id(obj)] = out
        out.extend(_finalize(v, source, memo, child(i)) for i, v in enumerate(obj))
        return out
    elif isinstance(obj, tuple):
        out = tuple(_finalize(v, source, memo, child(i)) for i, v in enumerate(obj))
    else:
        out = obj
    memo[id(obj)] = out
    return out


def load_state_dict(path) -> dict[str, np.ndarray]:
    """Read a `torch.save`d state_dict (zip format) as {name: np.ndarray} without torch.

    Each array is a fresh copy with the tensor's dtype, shape and values (views with
    strides/offsets are materialised; 0-d tensors become 0-d arrays). Tensors that shared a
    storage (tied weights) come back as separate copies.
    """
    obj = _finalize(_unpickle_zip(path, _TENSOR_GLOBALS), os.fspath(path))
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: top-level object is {type(obj).__name__}, not a state_dict")
    bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise ValueError(f"{path}: not a flat state_dict; non-tensor entries {bad[:5]}")
    return obj


def load_module(path) -> ModuleRecord:
    """Read a whole pickled nn.Module (`torch.save(module)`, e.g. DALL-E encoder.pkl).

    Only the classes in MODULE_CLASSES (plus tensor machinery) may appear; the result is an
    inert ModuleRecord tree (see its docstring).
    """
    allowed = dict(_TENSOR_GLOBALS)
    allowed.update({name: _placeholder(name) for name in MODULE_CLASSES})
    obj = _finalize(_unpickle_zip(path, allowed), os.fspath(path))
    if not isinstance(obj, ModuleRecord):
        raise ValueError(f"{path}: top-level object is {type(obj).__name__}, not a module")
    return obj


def load_plain_pickle(path) -> Any:
    """Read a plain pickle of builtin containers/scalars; argparse.Namespace becomes a dict.

    Used for the released `args.pickle`. Any other global is refused.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, source=path, allowed=_PLAIN_GLOBALS).load()
    except _DAMAGED as e:
        raise ValueError(f"{path}: damaged file ({type(e).__name__}: {e})") from e
    return _finalize(obj, path)


def named_tensors(record: ModuleRecord, prefix: str = "") -> dict[str, np.ndarray]:
    """Flatten a ModuleRecord's parameters and persistent buffers, torch `state_dict` style.

    Returns {'blocks.group_1.block_1.res_path.conv_1.w': array, ...}; None entries and
    buffers in `_non_persistent_buffers_set` are skipped, as `state_dict()` does.
    """
    state = record.state
    out: dict[str, np.ndarray] = {}
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = value
    skip = state.get("_non_persistent_buffers_set") or set()
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in skip:
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(named_tensors(child, f"{prefix}{name}."))
    return out
