"""Writing torch.save's zip format without torch, in files that `torch.load(weights_only=True)` reads.

Tensors are numpy arrays (or `BFloat16` for bfloat16 values). An array that is a view of another array written in
the same file shares its storage, with its own offset and strides, as torch's views do; so does an array written
twice. `Global`, `Call`, `NewObject` and `Build` spell out any other pickle content, such as the training state of a
Composer checkpoint, with names that need not be importable here.
"""

import collections
import io
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_STORAGE_TYPES = {
    np.dtype("float64"): "DoubleStorage",
    np.dtype("float32"): "FloatStorage",
    np.dtype("float16"): "HalfStorage",
    np.dtype("int64"): "LongStorage",
    np.dtype("int32"): "IntStorage",
    np.dtype("int16"): "ShortStorage",
    np.dtype("int8"): "CharStorage",
    np.dtype("uint8"): "ByteStorage",
    np.dtype("bool"): "BoolStorage",
}


@dataclass(frozen=True)
class Global:
    """A module attribute named in the pickle (GLOBAL); never imported here."""

    module: str
    name: str


@dataclass(frozen=True)
class Call:
    """`func(*args)` when unpickled (REDUCE)."""

    func: object
    args: tuple = ()


@dataclass(frozen=True)
class NewObject:
    """`cls.__new__(cls, *args)` when unpickled (NEWOBJ): how pickle rebuilds instances of plain classes."""

    cls: Global
    args: tuple = ()


@dataclass(frozen=True)
class Build:
    """`obj` with `state` applied when unpickled (BUILD): `__setstate__(state)` or an update of its `__dict__`."""

    obj: object
    state: object


class BFloat16:
    """Values to store as a bfloat16 tensor (numpy has no bfloat16): rounded to nearest, ties to even."""

    def __init__(self, values):
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        self.bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)

    @property
    def values(self):
        """The stored values, as float32."""
        return (self.bits.astype(np.uint32) << 16).view(np.float32)


def _contiguous_strides(shape):
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _root(array):
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


class _TorchPickler:
    """Protocol-2 pickle of the subset of Python that checkpoints use, with tensors as storage references."""

    def __init__(self):
        self.out = io.BytesIO()
        self.storages = {}  # id of the root array -> (key, root array, storage type)

    def dumps(self, obj):
        self.out.write(b"\x80\x02")
        self.save(obj)
        self.out.write(b".")
        return self.out.getvalue()

    def save(self, obj):
        write = self.out.write
        if obj is None:
            write(b"N")
        elif obj is True or obj is False:
            write(b"\x88" if obj else b"\x89")
        elif isinstance(obj, int):
            if -(2**31) <= obj < 2**31:
                write(b"J" + struct.pack("<i", obj))
            else:
                encoded = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
                write(b"\x8a" + bytes([len(encoded)]) + encoded)
        elif isinstance(obj, float):
            write(b"G" + struct.pack(">d", obj))
        elif isinstance(obj, str):
            encoded = obj.encode("utf-8", "surrogatepass")
            write(b"X" + struct.pack("<I", len(encoded)) + encoded)
        elif isinstance(obj, bytes):
            # Protocol 2 has no bytes opcode; Python 3 pickles bytes this way at that protocol.
            self.save(Call(Global("_codecs", "encode"), (obj.decode("latin-1"), "latin1")))
        elif isinstance(obj, tuple):
            write(b"(")
            for item in obj:
                self.save(item)
            write(b"t")
        elif isinstance(obj, list):
            write(b"]")
            if obj:
                write(b"(")
                for item in obj:
                    self.save(item)
                write(b"e")
        elif isinstance(obj, dict):
            if isinstance(obj, collections.OrderedDict):
                self.save(Call(Global("collections", "OrderedDict")))
            else:
                write(b"}")
            if obj:
                write(b"(")
                for key, value in obj.items():
                    self.save(key)
                    self.save(value)
                write(b"u")
        elif isinstance(obj, Global):
            write(b"c" + f"{obj.module}\n{obj.name}\n".encode())
        elif isinstance(obj, Call):
            self.save(obj.func)
            self.save(tuple(obj.args))
            write(b"R")
        elif isinstance(obj, NewObject):
            self.save(obj.cls)
            self.save(tuple(obj.args))
            write(b"\x81")
        elif isinstance(obj, Build):
            self.save(obj.obj)
            self.save(obj.state)
            write(b"b")
        elif isinstance(obj, (np.ndarray, BFloat16)):
            self.save_tensor(obj)
        else:
            raise TypeError(f"cannot write a {type(obj).__name__} into a torch checkpoint")

    def save_tensor(self, tensor):
        if isinstance(tensor, BFloat16):
            root, storage_type, offset, shape, strides = tensor.bits, "BFloat16Storage", 0, tensor.bits.shape, None
        else:
            if tensor.dtype not in _STORAGE_TYPES:
                raise TypeError(f"cannot write a {tensor.dtype} array as a torch tensor")
            root, offset, strides = self._storage_view(tensor)
            storage_type, shape = _STORAGE_TYPES[tensor.dtype], tensor.shape
        if strides is None:
            strides = _contiguous_strides(shape)
        key = self._storage_key(root, storage_type)
        storage = ("storage", Global("torch", storage_type), key, "cpu", root.size)
        self.save(Global("torch._utils", "_rebuild_tensor_v2"))
        self.out.write(b"(")
        self.save(storage)
        self.out.write(b"Q")
        for item in (offset, tuple(shape), tuple(strides), False, collections.OrderedDict()):
            self.save(item)
        self.out.write(b"tR")

    def _storage_view(self, array):
        """(storage array, element offset, element strides) of `array`: a view shares its root array's storage."""
        root = _root(array)
        itemsize = array.itemsize
        if (
            root is not array
            and root.dtype == array.dtype
            and root.flags.c_contiguous
            and all(s >= 0 and s % itemsize == 0 for s in array.strides)
        ):
            start = array.__array_interface__["data"][0] - root.__array_interface__["data"][0]
            return root, start // itemsize, tuple(s // itemsize for s in array.strides)
        if array.flags.c_contiguous:
            return array, 0, None
        return np.ascontiguousarray(array), 0, None

    def _storage_key(self, root, storage_type):
        if id(root) not in self.storages:
            self.storages[id(root)] = (str(len(self.storages)), root, storage_type)
        return self.storages[id(root)][0]


def save_torch_object(obj, path):
    """Write `obj` (dicts, lists, tuples, scalars, strings, tensors and the pickle spellings above) as torch.save
    would, uncompressed and little-endian."""
    pickler = _TorchPickler()
    data = pickler.dumps(obj)
    with zipfile.ZipFile(Path(path), "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/byteorder", "little")
        for key, root, _ in pickler.storages.values():
            archive.writestr(f"archive/data/{key}", root.astype(root.dtype.newbyteorder("<")).tobytes())
        archive.writestr("archive/version", "3\n")


def save_torch_state_dict(state_dict, path):
    """Write a name -> array mapping as the OrderedDict that `torch.save(model.state_dict(), path)` writes."""
    save_torch_object(collections.OrderedDict(state_dict), path)
