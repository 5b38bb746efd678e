"""Reading checkpoint files into name -> numpy array dicts, without executing anything from the file.

Formats, recognised by their content rather than their file name:
- safetensors (any dtype, bfloat16 included);
- torch.save zip archives (`pytorch_model.bin`, `model.bin`, `.pt`; torch >= 1.6);
- the legacy torch.save stream (torch < 1.6).

Layouts: plain state dicts and Composer checkpoints (weights under `state.model`, next to optimizer, scheduler,
metric and RNG state). Names are returned as stored; the DDP `module.` and Composer `model.` prefixes are the
model's `sanitize`'s to remove.

Pickles are read by a restricted unpickler that never imports or calls anything the file names. Tensors are rebuilt
by this module from the storage records. Containers and plain data records (OrderedDict, set, datetime, numpy arrays
and dtypes, torch.device) and objects of any class (Composer's training state may hold classes that are not
installed here) become inert placeholders, which the state dict never contains. A request to call anything else,
such as `os.system` or `builtins.eval`, is refused with a `CheckpointError`: nothing from the file runs.

bfloat16 tensors are widened to float32 (numpy has no bfloat16); every other dtype is kept.
"""

import json
import math
import pickle
import struct
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import CheckpointError

# ---------------------------------------------------------------------------------------------------------------
# dtypes

_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "UntypedStorage": "uint8",
}

_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}


_NATIVE_BYTEORDER = "<" if sys.byteorder == "little" else ">"


def _numpy_dtype(name, byteorder):
    # bfloat16 is read as its 16 raw bits and widened to float32 once the tensor is assembled.
    dtype = np.dtype("uint16" if name == "bfloat16" else name)
    return dtype if byteorder in ("=", _NATIVE_BYTEORDER) else dtype.newbyteorder(byteorder)


def _bfloat16_bits_to_float32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Tensors as the file describes them; data is read only when a tensor is materialised.


# Slots, so that a pickle's BUILD cannot rewrite a rebuilt tensor.
@dataclass(frozen=True, slots=True)
class _Storage:
    key: str
    dtype: str
    numel: int
    offset: int = 0  # in elements; non-zero only for the storage views of the legacy format


@dataclass(frozen=True, slots=True)
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple
    stride: tuple


class _Corrupt(Exception):
    """The file's structure contradicts itself; reported as a CheckpointError naming the file."""


class _Refused(Exception):
    """The pickle asks to call something a checkpoint never needs."""

    def __init__(self, name):
        super().__init__(name)
        self.name = name


def _contiguous_stride(shape):
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= size
    return tuple(reversed(stride))


def _materialize(tensor, raw, byteorder):
    storage = tensor.storage
    dtype = _numpy_dtype(storage.dtype, byteorder)
    available = len(raw) // dtype.itemsize
    if storage.offset + storage.numel > available:
        raise _Corrupt(f"storage {storage.key} holds {available} elements but its tensors need {storage.offset + storage.numel}")
    flat = np.frombuffer(raw, dtype, count=storage.numel, offset=storage.offset * dtype.itemsize)
    shape, stride, offset = tensor.shape, tensor.stride, tensor.offset
    if len(shape) != len(stride) or min(shape + stride + (offset,), default=0) < 0:
        raise _Corrupt(f"a tensor has an invalid shape {shape}, stride {stride} or offset {offset}")
    if math.prod(shape) == 0:
        array = np.empty(shape, dtype)
    else:
        # Checked before as_strided, which would otherwise read outside the buffer.
        last = offset + sum((size - 1) * step for size, step in zip(shape, stride))
        if last >= flat.size:
            raise _Corrupt(f"a tensor of shape {shape} reaches element {last} of a storage of {flat.size}")
        array = np.lib.stride_tricks.as_strided(flat[offset:], shape, [step * dtype.itemsize for step in stride])
    array = np.array(array, dtype=_numpy_dtype(storage.dtype, "="), order="C")
    return _bfloat16_bits_to_float32(array) if storage.dtype == "bfloat16" else array


# ---------------------------------------------------------------------------------------------------------------
# The restricted unpickler


class _Opaque:
    """An object the file describes that a state dict never holds (optimizer, RNG, metric or trainer state)."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args = args
        return obj

    def __setstate__(self, state):
        self.state = state


# Harmless data constructors that training checkpoints use outside the weights (Composer: timedelta timestamps,
# numpy RNG state; torchmetrics: devices and sets). A call to one yields an inert placeholder.
_DATA_RECORDS = frozenset(
    {
        "builtins.set",
        "builtins.frozenset",
        "builtins.bytearray",
        "builtins.complex",
        "_codecs.encode",
        "copyreg._reconstructor",
        "datetime.timedelta",
        "datetime.datetime",
        "datetime.date",
        "datetime.time",
        "datetime.timezone",
        "numpy.dtype",
        "numpy.core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray._reconstruct",
        "numpy._core.multiarray.scalar",
        "torch.device",
        "torch.Size",
    }
)


class _StandIn(type):
    """Metaclass of the stand-ins for the names a pickle mentions. Instantiating a class the way pickle rebuilds
    plain objects (NEWOBJ, then BUILD) gives an inert `_Opaque`; calling a name (REDUCE) is refused unless it is a
    harmless data constructor. The named module is never imported."""

    def __call__(cls, *args, **kwargs):
        if cls.qualname in _DATA_RECORDS:
            return cls.__new__(cls, *args)
        raise _Refused(cls.qualname)


@lru_cache(maxsize=None)
def _stand_in(qualname):
    return _StandIn(qualname.rsplit(".", 1)[-1], (_Opaque,), {"qualname": qualname})


class _StateDict(dict):
    """collections.OrderedDict as torch pickles it; the instance attributes it carries (`_metadata`) are dropped."""

    def __setstate__(self, state):
        pass


@dataclass(frozen=True)
class _StorageType:
    name: str


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    if not isinstance(storage, _Storage):
        raise _Corrupt("a tensor has no storage record")
    try:
        return _Tensor(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))
    except (TypeError, ValueError) as e:
        raise _Corrupt(f"a tensor has invalid arguments ({e})") from e


def _rebuild_parameter(data, *_):
    return data


def _rebuild_from_type(func, new_type, args, state):
    return func(*args)


class _Rebuilder:
    """One of this module's rebuilding functions as the pickle sees it. A new one per name lookup, and BUILD is
    refused, so a pickle cannot leave state on anything that outlives it."""

    __slots__ = ("function",)

    def __init__(self, function):
        self.function = function

    def __call__(self, *args):
        return self.function(*args)

    def __setstate__(self, state):
        raise _Corrupt("the pickle tries to modify a function")


_TENSOR_GLOBALS = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, storage_record):
        super().__init__(file, encoding="utf-8")
        self._storage_record = storage_record

    def find_class(self, module, name):
        qualname = f"{module}.{name}"
        if qualname in _TENSOR_GLOBALS:
            return _Rebuilder(_TENSOR_GLOBALS[qualname])
        if qualname == "collections.OrderedDict":
            return _StateDict  # a BUILD on the class itself fails: its __setstate__ needs an instance
        if module in ("torch", "torch.cuda") and name.endswith("Storage"):
            return _StorageType(name)
        return _stand_in(qualname)

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise _Corrupt(f"the pickle has an unexpected persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module":  # legacy format: source code of pickled modules
            return _Opaque()
        if kind != "storage" or len(pid) < 5 or not isinstance(pid[1], _StorageType):
            raise _Corrupt(f"the pickle has an unexpected persistent id {pid!r}")
        if pid[1].name not in _TORCH_STORAGE_DTYPES:
            raise _Corrupt(f"it has tensors of type {pid[1].name}, which this reader does not support")
        return self._storage_record(_TORCH_STORAGE_DTYPES[pid[1].name], *pid[2:])


def _unpickle(file, storage_record):
    try:
        return _RestrictedUnpickler(file, storage_record).load()
    except (_Refused, _Corrupt):
        raise
    except Exception as e:  # any failure to parse the byte stream means the file is damaged
        raise _Corrupt(f"its pickle is damaged ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------------------------------------------
# Archives: the object a file holds, and the bytes of its storages


class _TorchZipArchive:
    """torch.save's zip archive: `<name>/data.pkl`, `<name>/data/<key>` records, `<name>/byteorder`."""

    def __init__(self, path):
        self.zip = zipfile.ZipFile(path)
        try:
            self._read()
        except BaseException:
            self.zip.close()
            raise

    def _read(self):
        names = self.zip.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise _Corrupt("the zip archive has no data.pkl record of torch.save")
        self.prefix = pickles[0][: -len("data.pkl")]
        order = self.zip.read(self.prefix + "byteorder") if self.prefix + "byteorder" in names else b"little"
        if order.strip() not in (b"little", b"big"):
            raise _Corrupt(f"an unknown byte order {order[:20]!r}")
        self.byteorder = "<" if order.strip() == b"little" else ">"
        with self.zip.open(pickles[0]) as f:
            self.obj = _unpickle(f, self._storage)

    def _storage(self, dtype, key, location, numel, *_):
        return _Storage(str(key), dtype, int(numel))

    def read(self, storage):
        name = f"{self.prefix}data/{storage.key}"
        try:
            return self.zip.read(name)
        except KeyError as e:
            raise _Corrupt(f"the storage record {name} is missing") from e

    def close(self):
        self.zip.close()


class _LegacyTorchArchive:
    """torch.save's format before torch 1.6: pickled header, object, storage keys, then each storage's raw data
    after its element count."""

    _MAGIC = 0x1950A86A20F9469CFC6C

    def __init__(self, path):
        self.file = open(path, "rb")
        self.byteorder = "<"
        try:
            self._read()
        except BaseException:
            self.file.close()
            raise

    def _read(self):
        def no_storage(*pid):
            raise _Corrupt("its header holds a tensor")

        if _unpickle(self.file, no_storage) != self._MAGIC:
            raise _Corrupt("it is a pickle but not a torch.save file")
        _unpickle(self.file, no_storage)  # protocol version
        _unpickle(self.file, no_storage)  # system info
        self.roots = {}
        self.obj = _unpickle(self.file, self._storage)
        keys = _unpickle(self.file, no_storage)
        if not isinstance(keys, list):
            raise _Corrupt("the storage list after the object is missing")
        self.positions = {}
        for key in keys:
            if key not in self.roots:
                raise _Corrupt(f"it has data for an unknown storage {key!r}")
            dtype, numel = self.roots[key]
            header = self.file.read(8)
            if len(header) != 8 or struct.unpack("<q", header)[0] != numel:
                raise _Corrupt(f"the data of storage {key} does not match its size")
            nbytes = numel * _numpy_dtype(dtype, "<").itemsize
            self.positions[key] = (self.file.tell(), nbytes)
            self.file.seek(nbytes, 1)

    def _storage(self, dtype, root_key, location, numel, view=None, *_):
        root_key, numel = str(root_key), int(numel)
        if self.roots.setdefault(root_key, (dtype, numel)) != (dtype, numel):
            raise _Corrupt(f"storage {root_key} is described twice, differently")
        if view is None:
            return _Storage(root_key, dtype, numel)
        _, offset, size = view
        return _Storage(root_key, dtype, int(size), int(offset))

    def read(self, storage):
        if storage.key not in self.positions:
            raise _Corrupt(f"the data of storage {storage.key} is missing")
        position, nbytes = self.positions[storage.key]
        self.file.seek(position)
        return self.file.read(nbytes)

    def close(self):
        self.file.close()


class _SafetensorsArchive:
    """8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data."""

    def __init__(self, path):
        self.file = open(path, "rb")
        self.byteorder = "<"
        try:
            self._read(path.stat().st_size)
        except BaseException:
            self.file.close()
            raise

    def _read(self, file_size):
        (header_size,) = struct.unpack("<Q", self.file.read(8))
        if header_size > file_size - 8:
            raise _Corrupt("the header is longer than the file")
        try:
            header = json.loads(self.file.read(header_size))
        except (UnicodeDecodeError, ValueError) as e:
            raise _Corrupt(f"unreadable header ({e})") from e
        if not isinstance(header, dict):
            raise _Corrupt("the header is not a JSON object")
        data_start = 8 + header_size
        self.obj, self.positions = {}, {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise _Corrupt(f"tensor {name!r} has an invalid or unsupported header entry {info!r}") from e
            numel = math.prod(shape)
            if end - begin != numel * _numpy_dtype(dtype, "<").itemsize or begin < 0 or data_start + end > file_size:
                raise _Corrupt(f"tensor {name!r} does not fit the file (offsets {begin}..{end})")
            self.positions[name] = (data_start + begin, end - begin)
            self.obj[name] = _Tensor(_Storage(name, dtype, numel), 0, shape, _contiguous_stride(shape))

    def read(self, storage):
        position, nbytes = self.positions[storage.key]
        self.file.seek(position)
        return self.file.read(nbytes)

    def close(self):
        self.file.close()


def _open_archive(path):
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return _TorchZipArchive(path)
    if head[:1] == b"\x80":
        return _LegacyTorchArchive(path)
    if len(head) == 9 and head[8:9] == b"{":
        return _SafetensorsArchive(path)
    if head[:2] == b"\x1f\x8b":
        raise CheckpointError(f"{path} is gzip-compressed (a Composer .tar.gz?); extract the checkpoint inside it first.")
    raise CheckpointError(
        f"{path} is not a checkpoint this package reads: expected safetensors or a torch.save file "
        "(pytorch_model.bin, model.bin, Composer .pt)" + (" but the file is empty" if not head else "") + "."
    )


# ---------------------------------------------------------------------------------------------------------------
# Finding the state dict inside what a file holds


def _describe_object(obj):
    if isinstance(obj, _Opaque):
        return f"a pickled {type(obj).qualname if isinstance(type(obj), _StandIn) else 'object'}"
    return f"a {type(obj).__name__}"


def _find_tensors(obj):
    state = obj.get("state") if isinstance(obj, dict) else None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        obj = state["model"]  # Composer: {"state": {"model": ..., "optimizers": ...}, "rng": ...}
    if not isinstance(obj, dict) or not obj:
        raise _Corrupt(
            f"it holds {_describe_object(obj)} instead of a state dict (a whole model saved with torch.save(model) "
            "is not supported: save model.state_dict() instead)"
        )
    others = sorted(str(k) for k, v in obj.items() if not isinstance(v, _Tensor) or not isinstance(k, str))
    if others:
        shown = ", ".join(others[:8]) + (" ..." if len(others) > 8 else "")
        raise _Corrupt(
            f"it holds a dict whose entries {shown} are not named tensors, where a state dict or a Composer "
            "checkpoint (weights under state.model) was expected"
        )
    return obj


@contextmanager
def _reading(path):
    """Turns every way a file can be malformed into a CheckpointError that names the file and says what to do."""
    try:
        yield
    except _Refused as e:
        raise CheckpointError(
            f"{path} is not a plain checkpoint: its pickle asks to call {e.name}, which loading weights never "
            "needs. Refused; nothing from the file was run. Do not use this file unless you trust its source; if you "
            "do, re-save its state dict as safetensors where you trust it."
        ) from None
    except _Corrupt as e:
        raise CheckpointError(f"{path} cannot be read as a checkpoint: {e}. Download or export it again.") from e
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, struct.error, OSError, KeyError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}). Download it again.") from e


@contextmanager
def _open_checkpoint(path):
    """The open archive of a checkpoint file and the tensors it describes, keyed by their stored names."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file.")
    archive = _open_archive(path)
    try:
        yield archive, _find_tensors(archive.obj)
    finally:
        archive.close()


def load_state_dict(path):
    """Return the tensors of a checkpoint file as numpy arrays keyed by their names (as stored: a model's
    `sanitize` removes the `module.`/`model.` wrapper prefixes).

    Raises `CheckpointError` for files that are missing, corrupt, truncated, unsupported or that ask to run code.
    """
    path = Path(path)
    with _reading(path), _open_checkpoint(path) as (archive, tensors):
        storages, arrays = {}, {}
        for name, tensor in tensors.items():
            key = tensor.storage.key
            if key not in storages:
                storages[key] = archive.read(tensor.storage)
            arrays[name] = _materialize(tensor, storages[key], archive.byteorder)
        return arrays


def checkpoint_keys(path):
    """The tensor names `load_state_dict` would return, read without loading any tensor data."""
    path = Path(path)
    with _reading(path), _open_checkpoint(path) as (_, tensors):
        return sorted(tensors)
