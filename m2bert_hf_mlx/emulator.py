"""Runs the long-convolution kernel bodies on the CPU, as C++ with a GPU's threadgroup semantics.

The translation unit is the C++ prelude, the shared ``long_conv.h`` and every kernel body wrapped in a function
with the parameters Metal's signature gives it (buffers, ``<input>_strides``, thread and threadgroup positions). It is
built once with the system C++ compiler into a shared library cached under ``~/.cache/m2bert_hf_mlx/emulator``
(keyed by a hash of source, flags and compiler) and called through ctypes on numpy views of the MLX arrays.

Template constants become run-time values here (one build serves every shape) except the register-array size
ELEMS and the I/O type T, which stay template parameters as on the GPU.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from .kernels import KERNELS, TARGETS, header

CXX_FLAGS = ("-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-fno-strict-aliasing")
# The register-array sizes the targets' plans use: one instantiation each.
ELEMS = sorted({tile.elems for t in TARGETS.values() for tile in t.tiles})
_CPP_TYPES = {"float32": "float", "float16": "m2_half", "bfloat16": "m2_bfloat16"}
_FIXED_TYPES = {"f32": "float", "i32": "int"}
# numpy types of the kernels' I/O dtypes; bfloat16 has none and travels as its bits.
_NUMPY_TYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def _entry_name(kernel, dtype, elems):
    return f"m2_emulated_{kernel}_{dtype}_{elems}"


def _wrapper(spec):
    params = []
    for name, kind in spec.inputs:
        params.append(f"const {'T' if kind == 'io' else _FIXED_TYPES[kind]}* {name}")
        if kind == "io":
            params.append(f"const int64_t* {name}_strides")
    params += [f"{'T' if kind == 'io' else _FIXED_TYPES[kind]}* {name}" for name, kind in spec.outputs]
    params += [
        "const int* m2_constants",
        "uint3 thread_position_in_threadgroup",
        "uint3 threadgroup_position_in_grid",
        "uint3 threads_per_threadgroup",
    ]
    constants = "".join(f"  const int {name} = m2_constants[{i}];\n" for i, name in enumerate(spec.constants))
    lines = [
        "template <typename T, int ELEMS>",
        f"void m2_body_{spec.name}({', '.join(params)}) {{",
        constants + spec.body,
        "}",
    ]
    buffers = spec.inputs + spec.outputs
    for dtype, cpp_type in _CPP_TYPES.items():
        for elems in ELEMS:
            args = []
            strided = 0
            for i, (_, kind) in enumerate(buffers):
                const = "const " if i < len(spec.inputs) else ""
                args.append(f"static_cast<{const}{cpp_type if kind == 'io' else _FIXED_TYPES[kind]}*>(buffers[{i}])")
                if kind == "io" and i < len(spec.inputs):
                    args.append(f"strides + {3 * strided}")
                    strided += 1
            lines += [
                f'extern "C" int {_entry_name(spec.name, dtype, elems)}(',
                "    void** buffers, const int64_t* strides, const int* constants, const int* geometry) {",
                "  auto kernel = [&](uint3 tid, uint3 group, uint3 threads) {",
                f"    m2_body_{spec.name}<{cpp_type}, {elems}>({', '.join(args)}, constants, tid, group, threads);",
                "  };",
                "  return m2_emu_launch(kernel, geometry);",
                "}",
            ]
    return "\n".join(lines)


def source():
    """The whole C++ translation unit of the emulator."""
    return "\n".join([header("cpu")] + [_wrapper(spec) for spec in KERNELS.values()]) + "\n"


def _compiler():
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(
            f"backend='emulated' compiles the kernels with a C++20 compiler, and '{cxx}' was not found. "
            "Install g++ (or set CXX), or use backend='mlx'."
        )
    return cxx


def cache_dir():
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "m2bert_hf_mlx" / "emulator"


_library = None


def library():
    """The compiled emulator (built on first use, then loaded from the disk cache)."""
    global _library
    if _library is None:
        cxx = _compiler()
        src = source()
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
        key = hashlib.sha256("\n".join([src, " ".join(CXX_FLAGS), cxx, version]).encode()).hexdigest()[:20]
        path = cache_dir() / f"long_conv_{key}.so"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                cpp = Path(tmp) / "long_conv.cpp"
                cpp.write_text(src)
                built = Path(tmp) / path.name
                result = subprocess.run([cxx, *CXX_FLAGS, "-o", str(built), str(cpp)], capture_output=True, text=True)
                if result.returncode != 0:
                    raise RuntimeError(f"Building the long-convolution emulator failed:\n{result.stderr}")
                os.replace(built, path)
        _library = ctypes.CDLL(str(path))
    return _library


def _numpy_view(a):
    """A numpy view of an MLX array's buffer, strides included."""
    return np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)


def launch_fn(limit_bytes, order=0):
    """launch_fn for kernels.run_plan that runs each launch on the CPU, with `limit_bytes` of threadgroup memory:
    with the threads of a group concurrent (order 0), or one at a time between barriers, in thread order (1) or in
    reverse, the groups' order too (-1), which shows a missing barrier whatever the timing (prelude_cpu.h)."""

    def run(launch, inputs, outputs, io_dtype):
        dtype_name = str(io_dtype).split(".")[-1]
        arrays = [_numpy_view(a) for a in inputs]
        results = []
        for (shape, _dtype), (_, kind) in zip(outputs, launch.spec.outputs):
            np_dtype = _NUMPY_TYPES[dtype_name] if kind == "io" else np.float32
            # NaN (or all ones for bfloat16 bits, also a NaN) marks every value the kernel fails to write.
            results.append(np.full(shape, np.nan if np_dtype != np.uint16 else 0xFFFF, dtype=np_dtype))
        # The element strides of each I/O input, three per input in order (MLX passes them as `<name>_strides`).
        strides = np.array(
            [[s // a.itemsize for s in a.strides] for (_, kind), a in zip(launch.spec.inputs, arrays) if kind == "io"],
            dtype=np.int64,
        ).reshape(-1)
        buffers = (ctypes.c_void_p * (len(arrays) + len(results)))(*[a.ctypes.data for a in arrays + results])
        constants = np.array([value for _, value in launch.constants], dtype=np.int32)
        geometry = np.array([*launch.groups, launch.threads, limit_bytes, order], dtype=np.int32)
        entry = getattr(library(), _entry_name(launch.kernel, dtype_name, launch.elems))
        entry.restype = ctypes.c_int
        over = entry(
            buffers,
            strides.ctypes.data_as(ctypes.c_void_p),
            constants.ctypes.data_as(ctypes.c_void_p),
            geometry.ctypes.data_as(ctypes.c_void_p),
        )
        if over < 0:
            raise RuntimeError(f"Kernel {launch.kernel} wrote past its threadgroup buffer: an index is wrong.")
        if over:
            raise RuntimeError(
                f"Kernel {launch.kernel} asked for {over} bytes of threadgroup memory, over the {limit_bytes}-byte "
                "limit of its target: the launch plan is wrong."
            )
        out = []
        for r, (_, dtype) in zip(results, outputs):
            a = mx.array(r)
            out.append(a.view(mx.bfloat16) if dtype == mx.bfloat16 else a)
        return out

    return run
