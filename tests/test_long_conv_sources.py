"""The kernel sources as MLX assembles them (MLX 0.32: mlx/backend/common/metal_kernel.cpp and
mlx/backend/cuda/custom_kernel.cpp), for compile checks of the Metal and CUDA instantiations without their GPUs."""

import os
import re
import shutil
import subprocess

import mlx.core as mx
import pytest
from clang import cindex

from m2bert_hf_mlx import kernels, ops
from m2bert_hf_mlx.errors import BackendUnavailableError

METAL_TYPES = {"float32": "float", "float16": "half", "bfloat16": "bfloat16_t", "int32": "int"}
CUDA_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16", "int32": "int32_t"}
_FIXED = {"f32": "float32", "i32": "int32"}


def _buffer_dtype(kind, dtype):
    return dtype if kind == "io" else _FIXED[kind]


def metal_kernel_source(launch, dtype, input_sizes, kernel_name):
    """Templated signature, body and explicit instantiation, as MLX writes them for Metal after the header.

    input_sizes: element count of each input; MLX passes inputs of fewer than 8 elements as `constant`.
    """
    spec = launch.spec
    template = launch.template(dtype)
    params = []
    for (name, kind), size in zip(spec.inputs, input_sizes):
        space = "constant" if size < 8 else "device"
        params.append(f"  const {space} {METAL_TYPES[_buffer_dtype(kind, dtype)]}* {name}")
        if f"{name}_strides" in spec.body:
            params.append(f"  const constant int64_t* {name}_strides")
    params += [f"  device {METAL_TYPES[_buffer_dtype(kind, dtype)]}* {name}" for name, kind in spec.outputs]
    params += [
        f"  uint3 {attr} [[{attr}]]"
        for attr in ("thread_position_in_threadgroup", "threadgroup_position_in_grid", "threads_per_threadgroup")
        if attr in spec.body
    ]
    decl = ", ".join(("typename " if key == "T" else "int ") + key for key, _ in template)
    values = ", ".join(METAL_TYPES[v] if key == "T" else str(v) for key, v in template)
    return "\n".join(
        [
            f"template <{decl}>",
            f"[[kernel]] void {kernel_name}(\n" + ",\n".join(params) + ") {",
            spec.body,
            "}",
            f'template [[host_name("{kernel_name}")]] [[kernel]] decltype({kernel_name}<{values}>) '
            f"{kernel_name}<{values}>;",
        ]
    )


def cuda_kernel_source(launch, dtype, kernel_name):
    """Signature, template constexprs and body, as MLX writes them for NVRTC after its default header and ours."""
    spec = launch.spec
    params = []
    for name, kind in spec.inputs:
        params.append(f"    const {CUDA_TYPES[_buffer_dtype(kind, dtype)]}* {name}")
        if f"{name}_strides" in spec.body:
            params.append(f"    const __grid_constant__ Strides {name}_strides")
    params += [f"    {CUDA_TYPES[_buffer_dtype(kind, dtype)]}* {name}" for name, kind in spec.outputs]
    constants = [
        f"  using {name} = {CUDA_TYPES[value]};" if name == "T" else f"  constexpr int {name} = {value};"
        for name, value in launch.template(dtype)
    ]
    return "\n".join(
        [
            "namespace mlx::core::cu {",
            f"__global__ void {kernel_name}(\n" + ",\n".join(params) + ") {",
            *constants,
            spec.body,
            "}",
            "}  // namespace mlx::core::cu",
        ]
    )


# What both stand-ins for Metal's standard library below declare alike in namespace metal: the grid's coordinates
# and the barrier.
_METAL_GRID_AND_BARRIER = """
struct uint3 {
  unsigned x, y, z;
};
enum class mem_flags { mem_none, mem_threadgroup };
inline void threadgroup_barrier(mem_flags) {}
"""

# A stand-in for Metal's standard library, enough for a C++ compiler to parse and type-check the Metal build
# (address spaces and attributes are dropped: they are Metal's own). half is a macro for a type that cannot be
# declared as a name: in Metal half is a keyword, a built-in type like float, and a variable of that name fails
# to compile there as it then does here.
METAL_STDLIB_SHIM = (
    """
#pragma once
#include <cstdint>
#define device
#define constant
#define threadgroup
#define thread
namespace metal {
struct float2 {
  float x, y;
  float2() = default;
  float2(float a, float b) : x(a), y(b) {}
};
struct float4 {
  float x, y, z, w;
};
"""
    + _METAL_GRID_AND_BARRIER
    + """}  // namespace metal
#define half decltype(_Float16())
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t(float f) : bits(0) { (void)f; }
  operator float() const { return 0.0f; }
};
"""
)

CUDA_UTILS_STUB = """
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
namespace mlx::core::cu {
using Strides = cuda::std::array<int64_t, 10>;
}
"""

# Plans that reach every tier of both GPU targets: each single-pass tile (the mixer's too) and each four-step tile.
SHAPES = [
    (2, 100, 70),
    (4, 256, 768),
    (1, 512, 768),
    (1, 1024, 768),
    (1, 2048, 768),
    (1, 3000, 2),
    (1, 4096, 768),
    (1, 4097, 6),
    (1, 8192, 768),
    (1, 32768, 768),
]


def _unique_launches(target, shapes=SHAPES):
    """The distinct launches of the long convolution's and the mixer's plans of `shapes`."""
    launches = {}
    for batch, length, channels in shapes:
        for mixer in (False, True):
            for launch in kernels.plan(target, batch, length, channels, mixer).launches:
                launches.setdefault((launch.kernel, launch.threads, launch.elems, launch.constants), launch)
    return list(launches.values())


# Every plan a target makes up to L = 32768: each FFT size with each power-of-two count of channel pairs.
EVERY_PLAN = [(1, 1 << (log_n - 1), 2 << log_pairs) for log_n in range(1, 17) for log_pairs in range(13)]


def _input_sizes(launch):
    # dims has 2 elements (Metal's constant address space); u and the tables have more than 8.
    return [2 if name == "dims" else 1 << 20 for name, _ in launch.spec.inputs]


@pytest.mark.skipif(mx.metal.is_available(), reason="checks the Metal build where Metal is missing")
def test_metal_kernels_construct_without_metal():
    for spec in kernels.KERNELS.values():
        assert callable(kernels.metal_kernel(spec))
    with pytest.raises(BackendUnavailableError, match="needs an Apple GPU"):
        ops.resolve_backend("metal")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_metal_instantiation_compiles_as_cpp(tmp_path, dtype):
    # Every plan in float32; the I/O conversions of the other dtypes on one plan of each tier.
    (tmp_path / "metal_stdlib").write_text(METAL_STDLIB_SHIM)
    launches = _unique_launches(kernels.METAL, EVERY_PLAN if dtype == "float32" else SHAPES)
    source = [kernels.header("metal")]
    source += [metal_kernel_source(launch, dtype, _input_sizes(launch), f"k{i}") for i, launch in enumerate(launches)]
    (tmp_path / "kernels.cpp").write_text("\n".join(source))
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    flags = ["-std=c++17", "-fsyntax-only", "-Wno-attributes", "-Wno-unknown-pragmas"]
    result = subprocess.run(
        [cxx, *flags, "-I", str(tmp_path), str(tmp_path / "kernels.cpp")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[:4000]


# Metal's address spaces as clang's (device 1, constant 2, threadgroup 3; thread is the default), so that a pointer
# passed where Metal expects another address space fails to compile here too. float2 and float4 are clang's vectors,
# assignable in any address space as Metal's are.
METAL_ADDRESS_SPACE_SHIM = (
    """
#pragma once
typedef long int64_t;
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define thread
namespace metal {
typedef float float2 __attribute__((ext_vector_type(2)));
typedef float float4 __attribute__((ext_vector_type(4)));
"""
    + _METAL_GRID_AND_BARRIER
    + "}  // namespace metal\n"
)

# What clang takes otherwise than Metal, in the Metal prelude and MLX's source: a clang vector is made with braces,
# an address space on an automatic variable (Metal's threadgroup buffer in a kernel) only where it is static, and
# no attributes on an explicit instantiation.
_CLANG_FORMS = [
    ("  return float2(x, y);", "  return float2{x, y};"),
    ("count) threadgroup float2 name[count]", "count) static threadgroup float2 name[count]"),
]


@pytest.mark.parametrize("space", ["device", "constant"])
def test_metal_instantiation_keeps_address_spaces(tmp_path, space):
    # Every plan, with z and u in the device address space, then in the constant one, where MLX passes an input of
    # fewer than 8 elements (B L 3C < 8 for z): every pointer a kernel passes on must fit its parameter.
    (tmp_path / "metal_stdlib").write_text(METAL_ADDRESS_SPACE_SHIM)
    header = kernels.header("metal")
    for metal, clang in _CLANG_FORMS:
        assert header.count(metal) == 1, metal
        header = header.replace(metal, clang)
    source = [header]
    for i, launch in enumerate(_unique_launches(kernels.METAL, EVERY_PLAN)):
        sizes = [
            3 if space == "constant" and name in ("z", "u") else size
            for (name, _), size in zip(launch.spec.inputs, _input_sizes(launch))
        ]
        kernel = metal_kernel_source(launch, "float32", sizes, f"k{i}")
        source.append(
            re.sub(r"^template \[\[host_name\(\"k\d+\"\)\]\] \[\[kernel\]\] ", "template ", kernel, flags=re.M)
        )
    (tmp_path / "kernels.cpp").write_text("\n".join(source))
    # libclang (the test extra's wheel, no system compiler needed) parses it without any system header.
    flags = ["-x", "c++", "-std=c++17", "-nostdinc", "-nostdinc++", "-Wno-unknown-attributes", "-Wno-unknown-pragmas"]
    unit = cindex.Index.create().parse(str(tmp_path / "kernels.cpp"), args=[*flags, "-I", str(tmp_path)])
    errors = [str(d) for d in unit.diagnostics if d.severity >= cindex.Diagnostic.Error]
    assert not errors, "\n".join(errors[:20])


def compile_for_hopper(launches, tmp_path):
    """nvcc's (registers per thread, bytes of spill stores) of each launch's CUDA build (float32 I/O) for sm_90a,
    each under its own launch bound as MLX builds it; AssertionError with the compiler's output if it fails."""
    stub = tmp_path / "mlx" / "backend" / "cuda" / "device" / "utils.cuh"
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text(CUDA_UTILS_STUB)
    source = ['#include "mlx/backend/cuda/device/utils.cuh"', kernels.header("cuda")]
    for i, launch in enumerate(launches):
        bound = kernels.launch_bound(launch.threads, launch.spec.split)
        source += [bound, cuda_kernel_source(launch, "float32", f"k{i}")]
    (tmp_path / "kernels.cu").write_text("\n".join(source))
    flags = ["-std=c++17", "-arch=sm_90a", "-Xptxas", "-v", "-I", str(tmp_path), "-c", "-o", os.devnull]
    result = subprocess.run(["nvcc", *flags, str(tmp_path / "kernels.cu")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[:4000]
    # ptxas reports each entry as "Compiling entry function '<mangled k<i>>'", then its spills, then its registers.
    entry = r"Compiling entry function '_ZN3mlx4core2cu\d+(k\d+)E.*?(\d+) bytes spill stores.*?Used (\d+) registers"
    usage = {name: (int(registers), int(spills)) for name, spills, registers in re.findall(entry, result.stderr, re.S)}
    assert len(usage) == len(launches), result.stderr[:4000]
    return [usage[f"k{i}"] for i in range(len(launches))]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA build is also tested on the GPU)")
def test_cuda_instantiation_compiles_for_hopper_within_the_register_file(tmp_path):
    launches = _unique_launches(kernels.CUDA)
    for launch, (registers, spills) in zip(launches, compile_for_hopper(launches, tmp_path)):
        # A block must fit the 64K-register file. Only under the 1024-thread launch bound may ptxas spill, and only a
        # few values: 20 bytes at N = 8192, a build the sweep timed faster than the spill-free 512-thread one
        # (docs/benchmarks.md).
        assert registers * launch.threads <= 65536, (launch.kernel, registers, launch.threads)
        assert spills <= (32 if launch.threads == 1024 else 0), (launch.kernel, dict(launch.constants), spills)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA build is also tested on the GPU)")
def test_metal_split_tiles_fit_a_register_file_when_built_for_cuda(tmp_path):
    # Apple's compiler is not available here; nvcc's build of the same bodies (512 threads of 16 values) is the
    # estimate of their register pressure that the README's plan table gives, and runs on the GPU in tests/gpu.
    launches = [launch for launch in _unique_launches(kernels.METAL) if launch.spec.split]
    assert {launch.kernel for launch in launches} == {"single_pass_split"}
    for launch, (registers, spills) in zip(launches, compile_for_hopper(launches, tmp_path)):
        assert registers * launch.threads <= 65536 and spills == 0, (launch.kernel, registers, spills)
