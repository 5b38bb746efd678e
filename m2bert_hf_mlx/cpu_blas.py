"""An optimized BLAS for MLX's CPU back end on Linux.

MLX's Linux CPU wheels link the reference (netlib) BLAS, whose matrix products run 30-80x slower than an optimized
one (`benchmarks/cpu_blas.py` measures both; docs/benchmarks.md has the numbers), and M2-BERT's time is in its matrix
products. The dynamic loader binds MLX's `cblas_*` calls when `mlx.core` is loaded, to the first library in the global
scope that defines them, so loading an optimized CBLAS globally *before* `mlx.core` is imported makes MLX use it.
`import m2bert_hf_mlx` does this when it comes first; the environment variable M2BERT_BLAS chooses:

- unset or `auto`: the first that loads of the CBLAS that the `cpu` extra installs from PyPI (MKL's `libmkl_rt` on
  x86-64, NVIDIA's NVPL BLAS on Arm) and the system OpenBLAS (`libopenblas.so.0`); if none loads, or `mlx.core` was
  imported first, a `SlowCPUWarning` says so once;
- a path: that CBLAS library (OpenBLAS, BLIS, MKL's `libmkl_rt.so`); an error if it cannot be loaded;
- `off`: never, and no warning.
"""

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

from .errors import BlasLoadError, warn_at_caller

ENV = "M2BERT_BLAS"

#: The library that was loaded for MLX, or None.
loaded = None

# Distributions on PyPI that ship a CBLAS under the standard `cblas_*` names, and the library file of each.
PIP_CBLAS = (("mkl", "libmkl_rt.so"), ("nvpl-blas", "libnvpl_blas_lp64_gomp.so"))


class SlowCPUWarning(UserWarning):
    """MLX's CPU back end is left with the reference BLAS: matrix products will be many times slower."""


def _mlx_bundles_reference_blas():
    spec = importlib.util.find_spec("mlx")
    # mlx is a namespace package: look beside every folder of it (only the installed one has the libs).
    locations = spec.submodule_search_locations if spec is not None else None
    return any(any((Path(p).parent / "mlx_cpu.libs").glob("libblas-*.so*")) for p in locations or ())


def _pip_libraries():
    for distribution, stem in PIP_CBLAS:
        try:
            files = importlib.metadata.files(distribution) or ()
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in files:
            if file.name.startswith(stem):
                yield str(Path(file.locate()).resolve())


def candidates():
    """The CBLAS libraries `auto` tries, in order."""
    system = ctypes.util.find_library("openblas")
    return [*_pip_libraries(), *([system] if system else [])]


def _load(library):
    ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
    return library


def _warn(reason):
    warn_at_caller(
        f"{reason}, so MLX's CPU back end keeps its reference BLAS and M2-BERT runs about 10x slower. Install the "
        "package with the `cpu` extra (pip install 'm2bert-hf-mlx[cpu]', which brings MKL or NVPL BLAS), or set "
        f"{ENV} to the path of a CBLAS library ({ENV}=off silences this).",
        SlowCPUWarning,
    )


def preload():
    """Load the CBLAS that M2BERT_BLAS selects, globally, if MLX is not imported yet (see the module docstring)."""
    global loaded
    choice = os.environ.get(ENV, "auto").strip()
    if sys.platform != "linux" or choice.lower() in ("off", "0", "none"):
        return
    automatic = choice.lower() in ("", "auto")
    if automatic and not _mlx_bundles_reference_blas():
        return
    if "mlx.core" in sys.modules:
        _warn("mlx.core was imported before m2bert_hf_mlx")
        return
    if not automatic:
        try:
            loaded = _load(choice)
        except OSError as e:
            raise BlasLoadError(
                f"{ENV}={choice!r} cannot be loaded ({e}); give the path of a CBLAS library or 'off'."
            ) from None
        return
    for library in candidates():
        try:
            loaded = _load(library)
            return
        except OSError:
            continue
    _warn("No optimized CBLAS library was found")
