"""An optimized BLAS for MLX's CPU back end on Linux.

MLX's Linux CPU wheels link the reference (netlib) BLAS: its matrix products run far slower than an optimized
one (`benchmarks/cpu_blas.py` measures both; docs/benchmarks.md has the numbers), and M2-BERT's time is in its matrix
products. The dynamic loader binds MLX's `cblas_*` calls to the first library in the global scope that defines them,
so loading an optimized CBLAS globally *before* `mlx.core` is imported makes MLX use it. `import m2bert_hf_mlx` does
this when it comes first; the environment variable M2BERT_BLAS chooses:

- unset or `auto`: the system OpenBLAS (`libopenblas.so.0`, Debian/Ubuntu package `libopenblas0`) if MLX bundles
  the reference BLAS and OpenBLAS is installed; otherwise nothing changes;
- a path: that CBLAS library (OpenBLAS, BLIS, MKL's `libmkl_rt.so`); an error if it cannot be loaded;
- `off`: never.
"""

import ctypes
import ctypes.util
import importlib.util
import os
import sys
from pathlib import Path

ENV = "M2BERT_BLAS"

#: The library that was loaded for MLX, or None.
loaded = None


def _mlx_bundles_reference_blas():
    spec = importlib.util.find_spec("mlx")
    # mlx is a namespace package: look beside every folder of it (only the installed one has the libs).
    locations = spec.submodule_search_locations if spec is not None else None
    return any(any((Path(p).parent / "mlx_cpu.libs").glob("libblas-*.so*")) for p in locations or ())


def preload():
    """Load the CBLAS that M2BERT_BLAS selects, globally, if MLX is not imported yet (see the module docstring)."""
    global loaded
    choice = os.environ.get(ENV, "auto").strip()
    if sys.platform != "linux" or choice.lower() in ("off", "0", "none") or "mlx.core" in sys.modules:
        return
    if choice.lower() in ("", "auto"):
        library = ctypes.util.find_library("openblas") if _mlx_bundles_reference_blas() else None
        if library is None:
            return
    else:
        library = choice
    try:
        ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        if library == choice:
            raise ImportError(f"{ENV}={choice!r} cannot be loaded ({e}); give the path of a CBLAS library or 'off'.") from e
        return
    loaded = library
