"""Reading checkpoint files into name -> numpy array dicts, without executing anything from the file.

Formats, recognised by their content rather than their file name:
- safetensors (any dtype, bfloat16 included);
- torch.save zip archives (`pytorch_model.bin`, `model.bin`, `.pt`; torch >= 1.6);
- the legacy torch.save stream (torch < 1.6).

Layouts: plain state dicts and Composer checkpoints (weights under `state.model`, next to optimizer, scheduler,
metric and RNG state). Names are returned as stored; the DDP `module.` and Composer `model.` prefixes are the
model's `sanitize`'s to remove.

Pickles are read by a restricted unpickler that never imports or calls anything the file names. Tensors are rebuilt
by this module from the storage records, and every shape, stride, offset and record size is checked against the
storage before any byte is read or copied. Containers and plain data records (OrderedDict, set, datetime, numpy arrays
and dtypes, torch.device) and objects of any class (Composer's training state may hold classes that are not
installed here) become inert placeholders, which the state dict never contains. A request to call anything else,
such as `os.system` or `builtins.eval`, is refused with a `CheckpointError`: nothing from the file runs.

bfloat16 tensors are widened to float32 (numpy has no bfloat16); every other dtype is kept.
"""

import io
import json
import math
import pickle
import re
import struct
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from .errors import CheckpointError, quote

# Bounds on what a file may describe, far above any checkpoint (the 80M model's pickle runs about 10^4 operations,
# its largest tensor has 2.3*10^7 elements) and low enough that no small file can make the reader hang or allocate
# more than a few hundred MB beyond the tensors it declares.
_MAX_PICKLE_OPERATIONS = 2_000_000
_MAX_PICKLE_NESTING = 100
_MAX_DIMS = 32
_MAX_ELEMENTS = 2**40
_MAX_SAFETENSORS_HEADER = 100_000_000


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
    """The tensor as a C-contiguous array. Every bound is checked before numpy sees the buffer: a tensor may
    neither reach past its storage nor hold more elements than it (a stride-0 view of one element cannot become
    gigabytes)."""
    storage = tensor.storage
    dtype = _numpy_dtype(storage.dtype, byteorder)
    available = len(raw) // dtype.itemsize
    if storage.offset + storage.numel > available:
        raise _Corrupt(
            f"storage {storage.key} holds {available} elements but its tensors need {storage.offset + storage.numel}"
        )
    shape, stride, offset = tensor.shape, tensor.stride, tensor.offset
    if len(shape) != len(stride):
        raise _Corrupt(f"a tensor has a shape {shape} and a stride {stride} of different lengths")
    count = math.prod(shape)
    if count > storage.numel:
        raise _Corrupt(f"a tensor of shape {shape} has more elements than its storage of {storage.numel}")
    if count == 0:
        array = np.empty(shape, dtype)
    else:
        last = offset + sum((size - 1) * step for size, step in zip(shape, stride))
        if last >= storage.numel:
            raise _Corrupt(f"a tensor of shape {shape} reaches element {last} of a storage of {storage.numel}")
        flat = np.frombuffer(raw, dtype, count=storage.numel, offset=storage.offset * dtype.itemsize)
        array = np.lib.stride_tricks.as_strided(flat[offset:], shape, [step * dtype.itemsize for step in stride])
    array = np.array(array, dtype=_numpy_dtype(storage.dtype, "="), order="C")
    return _bfloat16_bits_to_float32(array) if storage.dtype == "bfloat16" else array


def _count(value, what):
    """A size, offset or stride from the file: a plain int (not a bool, float or str) within the reader's bounds."""
    if type(value) is not int or not 0 <= value <= _MAX_ELEMENTS:
        raise _Corrupt(f"a tensor has an invalid {what} {quote(value)}")
    return value


def _dims(value, what):
    valid = type(value) is tuple and len(value) <= _MAX_DIMS
    if not valid or not all(type(v) is int and 0 <= v <= _MAX_ELEMENTS for v in value):
        raise _Corrupt(f"a tensor has an invalid {what} {quote(value)}")
    return value


def _storage_key(value):
    if type(value) is not str or not re.fullmatch(r"[0-9A-Za-z_]{1,64}", value):
        raise _Corrupt(f"a storage has an invalid key {quote(value)}")
    return value


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


@cache
def _stand_in(qualname):
    return _StandIn(qualname.rsplit(".", 1)[-1], (_Opaque,), {"qualname": qualname})


class _StateDict(dict):
    """collections.OrderedDict as torch pickles it; the instance attributes it carries (`_metadata`) are dropped.
    Items given to the constructor (an older spelling) are checked like those of SETITEMS."""

    def __init__(self, items=()):
        super().__init__()
        for key, value in items:
            self[_hashable(key)] = value

    def __setstate__(self, state):
        pass


@dataclass(frozen=True)
class _StorageType:
    name: str


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    if not isinstance(storage, _Storage):
        raise _Corrupt("a tensor has no storage record")
    return _Tensor(storage, _count(storage_offset, "storage offset"), _dims(size, "shape"), _dims(stride, "stride"))


def _rebuild_parameter(data, *_):
    return data


def _rebuild_from_type(func, new_type, args, state):
    if not isinstance(func, _Rebuilder) or type(args) is not tuple:
        raise _Corrupt("a tensor subclass is rebuilt by something other than a tensor rebuilder")
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


# Dict keys and set items are hashed as they are inserted: only atoms, whose hash costs at most their length, may be
# (a tuple of tuples that share their items, 120 bytes of pickle, takes exponential time to hash).
_ATOMS = (str, bytes, int, float, complex, bool, type(None))


def _hashable(item):
    if isinstance(item, (*_ATOMS, _Opaque, _StandIn)):
        return item
    if type(item) is tuple and all(isinstance(i, _ATOMS) for i in item):
        return item
    raise _Corrupt(f"the pickle uses a {type(item).__name__} as a dict key or set item")


def _counted(operation):
    def run(self):
        self.operations += 1
        if self.operations > _MAX_PICKLE_OPERATIONS:
            raise _Corrupt(f"its pickle has more than {_MAX_PICKLE_OPERATIONS} operations")
        operation(self)

    return run


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, so that each operation can be bounded: the number of operations and the nesting
    of marks; dict keys and set items (see `_hashable`); BUILD only on the inert placeholders and the state dict
    (frozen slotted dataclasses get a generated __setstate__, so BUILD could otherwise reshape a rebuilt tensor);
    no protocol-5 out-of-band buffers (a bytearray is allocated at the size the file declares)."""

    def __init__(self, file, storage_record):
        super().__init__(file, encoding="utf-8")
        self._storage_record = storage_record
        self.operations = 0

    def load_mark(self):
        if len(self.metastack) >= _MAX_PICKLE_NESTING:
            raise _Corrupt(f"its pickle nests more than {_MAX_PICKLE_NESTING} levels deep")
        super().load_mark()

    def load_dict(self):
        items = self.pop_mark()
        self.append({_hashable(items[i]): items[i + 1] for i in range(0, len(items), 2)})

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self.stack[-1][_hashable(key)] = value

    def load_setitems(self):
        items = self.pop_mark()
        target = self.stack[-1]
        for i in range(0, len(items), 2):
            target[_hashable(items[i])] = items[i + 1]

    def load_additems(self):
        items = self.pop_mark()
        target = self.stack[-1]
        for item in items:
            target.add(_hashable(item))

    def load_frozenset(self):
        self.append(frozenset(_hashable(item) for item in self.pop_mark()))

    def load_build(self):
        state = self.stack.pop()
        target = self.stack[-1]
        if type(target) is not _StateDict and not isinstance(target, _Opaque):
            raise _Corrupt(f"the pickle tries to modify a {type(target).__name__}")
        target.__setstate__(state)

    def load_refused(self):
        raise _Corrupt("its pickle uses out-of-band buffers (protocol 5), which torch.save never writes")

    dispatch = {code: _counted(operation) for code, operation in pickle._Unpickler.dispatch.items()}
    dispatch[pickle.MARK[0]] = _counted(load_mark)
    dispatch[pickle.DICT[0]] = _counted(load_dict)
    dispatch[pickle.SETITEM[0]] = _counted(load_setitem)
    dispatch[pickle.SETITEMS[0]] = _counted(load_setitems)
    dispatch[pickle.ADDITEMS[0]] = _counted(load_additems)
    dispatch[pickle.FROZENSET[0]] = _counted(load_frozenset)
    dispatch[pickle.BUILD[0]] = _counted(load_build)
    for _code in (pickle.BYTEARRAY8, pickle.NEXT_BUFFER, pickle.READONLY_BUFFER):
        dispatch[_code[0]] = load_refused
    del _code

    def find_class(self, module, name):
        qualname = f"{module}.{name}"
        if qualname in _TENSOR_GLOBALS:
            return _Rebuilder(_TENSOR_GLOBALS[qualname])
        if qualname == "collections.OrderedDict":
            return _StateDict
        if module in ("torch", "torch.cuda") and name.endswith("Storage"):
            return _StorageType(name)
        return _stand_in(qualname)

    def persistent_load(self, pid):
        if type(pid) is not tuple or not pid or type(pid[0]) not in (str, bytes):
            raise _Corrupt(f"the pickle has an unexpected persistent id ({type(pid).__name__})")
        kind = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module":  # legacy format: source code of pickled modules
            return _Opaque()
        if kind != "storage" or len(pid) < 5 or not isinstance(pid[1], _StorageType):
            raise _Corrupt(f"the pickle has an unexpected persistent id of kind {quote(kind)}")
        if pid[1].name not in _TORCH_STORAGE_DTYPES:
            raise _Corrupt(f"it has tensors of type {quote(pid[1].name)}, which this reader does not support")
        return self._storage_record(_TORCH_STORAGE_DTYPES[pid[1].name], *pid[2:])


class _Bounded:
    """A file's reads capped at what is left of it: pickle reads the length a record declares, and a buffered
    read allocates that length before reading. Only this object reads the file while it is in use."""

    def __init__(self, file, size):
        self.file, self.left = file, max(size - file.tell(), 0)

    def read(self, n=-1):
        data = self.file.read(self.left if n is None or n < 0 else min(n, self.left))
        self.left -= len(data)
        return data

    def readline(self):
        data = self.file.readline(self.left)
        self.left -= len(data)
        return data


def _unpickle(file, storage_record):
    try:
        return _RestrictedUnpickler(file, storage_record).load()
    except (_Refused, _Corrupt):
        raise
    except Exception as e:  # any failure to parse the byte stream means the file is damaged
        raise _Corrupt(f"its pickle is damaged ({type(e).__name__}: {quote(str(e))})") from e


# ---------------------------------------------------------------------------------------------------------------
# Archives: the object a file holds, and the bytes of its storages


class _TorchZipArchive:
    """torch.save's zip archive: `<name>/data.pkl`, `<name>/data/<key>` records, `<name>/byteorder`. torch.save
    never compresses a record, so a compressed one is refused: its size on disk says nothing of what it inflates to."""

    def __init__(self, path):
        self.size = path.stat().st_size
        try:
            self.zip = zipfile.ZipFile(path)
        except ValueError as e:  # zipfile's answer to some impossible offsets
            raise _Corrupt(f"its zip directory is damaged ({quote(str(e))})") from e
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
        order = b"little"
        if self.prefix + "byteorder" in names:
            with self.zip.open(self._record(self.prefix + "byteorder")) as f:
                order = f.read(16)
        if order.strip() not in (b"little", b"big"):
            raise _Corrupt(f"an unknown byte order {quote(order)}")
        self.byteorder = "<" if order.strip() == b"little" else ">"
        self.obj = _unpickle(io.BytesIO(self.zip.read(self._record(pickles[0]))), self._storage)

    def _record(self, name):
        try:
            info = self.zip.getinfo(name)
        except KeyError as e:
            raise _Corrupt(f"the storage record {quote(name)} is missing") from e
        if info.compress_type != zipfile.ZIP_STORED:
            raise _Corrupt(f"the record {quote(name)} is compressed, which torch.save never does")
        # zipfile reads a record in one call of its declared size, which it allocates first.
        if info.compress_size != info.file_size or info.header_offset + info.compress_size > self.size:
            raise _Corrupt(f"the record {quote(name)} declares a size that does not fit the file")
        return info

    def _storage(self, dtype, key, location, numel, *_):
        return _Storage(_storage_key(key), dtype, _count(numel, "storage size"))

    def read(self, storage):
        name = f"{self.prefix}data/{storage.key}"
        size = storage.numel * _numpy_dtype(storage.dtype, "<").itemsize
        info = self._record(name)
        if info.file_size != size:
            available = info.file_size // _numpy_dtype(storage.dtype, "<").itemsize
            needed = storage.offset + storage.numel
            raise _Corrupt(f"storage {storage.key} holds {available} elements but its tensors need {needed}")
        return self.zip.read(info)

    def close(self):
        self.zip.close()


class _LegacyTorchArchive:
    """torch.save's format before torch 1.6: pickled header, object, storage keys, then each storage's raw data
    after its element count."""

    _MAGIC = 0x1950A86A20F9469CFC6C

    def __init__(self, path):
        self.file = open(path, "rb")
        self.size = path.stat().st_size
        self.byteorder = "<"
        try:
            self._read()
        except BaseException:
            self.file.close()
            raise

    def _read(self):
        def no_storage(*pid):
            raise _Corrupt("its header holds a tensor")

        stream = _Bounded(self.file, self.size)
        if _unpickle(stream, no_storage) != self._MAGIC:
            raise _Corrupt("it is a pickle but not a torch.save file")
        _unpickle(stream, no_storage)  # protocol version
        _unpickle(stream, no_storage)  # system info
        self.roots = {}
        self.obj = _unpickle(stream, self._storage)
        keys = _unpickle(stream, no_storage)
        if type(keys) is not list or not all(type(key) is str for key in keys):
            raise _Corrupt("the storage list after the object is missing")
        self.positions = {}
        for key in keys:
            if key not in self.roots:
                raise _Corrupt(f"it has data for an unknown storage {quote(key)}")
            dtype, numel = self.roots[key]
            header = self.file.read(8)
            if len(header) != 8 or struct.unpack("<q", header)[0] != numel:
                raise _Corrupt(f"the data of storage {key} does not match its size")
            nbytes = numel * _numpy_dtype(dtype, "<").itemsize
            if self.file.tell() + nbytes > self.size:
                raise _Corrupt(f"the data of storage {key} runs past the end of the file")
            self.positions[key] = (self.file.tell(), nbytes)
            self.file.seek(nbytes, 1)

    def _storage(self, dtype, root_key, location, numel, view=None, *_):
        root_key, numel = _storage_key(root_key), _count(numel, "storage size")
        if self.roots.setdefault(root_key, (dtype, numel)) != (dtype, numel):
            raise _Corrupt(f"storage {root_key} is described twice, differently")
        if view is None:
            return _Storage(root_key, dtype, numel)
        if type(view) is not tuple or len(view) != 3:
            raise _Corrupt(f"storage {root_key} has an invalid view")
        offset, size = _count(view[1], "storage view offset"), _count(view[2], "storage view size")
        if offset + size > numel:
            raise _Corrupt(f"a view of storage {root_key} reaches past its {numel} elements")
        return _Storage(root_key, dtype, size, offset)

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
        if header_size > _MAX_SAFETENSORS_HEADER:
            raise _Corrupt(f"the header is longer than the {_MAX_SAFETENSORS_HEADER} bytes safetensors allows")
        try:
            header = json.loads(self.file.read(header_size))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise _Corrupt(f"unreadable header ({type(e).__name__})") from e
        if not isinstance(header, dict):
            raise _Corrupt("the header is not a JSON object")
        data_start = 8 + header_size
        self.obj, self.positions = {}, {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype_name = info.get("dtype") if isinstance(info, dict) else None
            if not isinstance(dtype_name, str) or dtype_name not in _SAFETENSORS_DTYPES:
                raise _Corrupt(f"tensor {quote(name)} has an invalid or unsupported header entry")
            dtype = _SAFETENSORS_DTYPES[dtype_name]
            shape = _dims(_as_tuple(info.get("shape")), "shape")
            offsets = _dims(_as_tuple(info.get("data_offsets")), "data offsets")
            numel = math.prod(shape)
            nbytes = numel * _numpy_dtype(dtype, "<").itemsize
            if len(offsets) != 2 or offsets[1] - offsets[0] != nbytes or data_start + offsets[1] > file_size:
                raise _Corrupt(f"tensor {quote(name)} does not fit the file (offsets {offsets})")
            self.positions[name] = (data_start + offsets[0], nbytes)
            self.obj[name] = _Tensor(_Storage(name, dtype, numel), 0, shape, _contiguous_stride(shape))

    def read(self, storage):
        position, nbytes = self.positions[storage.key]
        self.file.seek(position)
        return self.file.read(nbytes)

    def close(self):
        self.file.close()


def _as_tuple(value):
    """A JSON list as the tuple `_dims` checks (anything else is left for it to refuse)."""
    return tuple(value) if type(value) is list else value


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
        raise CheckpointError(
            f"{path} is gzip-compressed (a Composer .tar.gz?); extract the checkpoint inside it first."
        )
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
    others = sorted(quote(k) for k, v in obj.items() if not isinstance(v, _Tensor) or not isinstance(k, str))
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
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        EOFError,
        struct.error,
        OSError,
        KeyError,
        NotImplementedError,
        OverflowError,
    ) as e:  # NotImplementedError: zipfile's answer to a version or feature it does not read
        detail = f"{type(e).__name__}: {quote(str(e))}"
        raise CheckpointError(f"{path} is truncated or corrupt ({detail}). Download it again.") from e


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
