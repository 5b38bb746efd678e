"""MLX's matrix products go to the CBLAS that M2BERT_BLAS names when m2bert_hf_mlx is imported first."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from m2bert_hf_mlx.cpu_blas import PIP_CBLAS
from m2bert_hf_mlx.errors import BlasLoadError, M2BertError

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "recipes").rglob("*.py")])
# Modules a script imports from the checkout's folders: any of them may import mlx.core.
LOCAL_MODULES = {p.stem for p in [*SCRIPTS, *(ROOT / "tests").glob("*.py")]}

# A correct, naive cblas_sgemm that counts its calls: if MLX's products reach it, the interposition works.
FAKE_CBLAS = r"""
static long calls = 0;
long fake_cblas_calls(void) { return calls; }
static float at(const float *x, int ld, int row_major, int trans, int i, int j) {
    if (trans == 112) { int t = i; i = j; j = t; }
    return row_major ? x[(long)i * ld + j] : x[i + (long)j * ld];
}
void cblas_sgemm(int layout, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
    int row_major = layout == 101;
    calls++;
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            float s = 0.0f;
            for (int p = 0; p < k; p++) s += at(a, lda, row_major, ta, i, p) * at(b, ldb, row_major, tb, p, j);
            float *out = row_major ? &c[(long)i * ldc + j] : &c[i + (long)j * ldc];
            *out = alpha * s + (beta == 0.0f ? 0.0f : beta * *out);
        }
}
"""

PROBE = textwrap.dedent(
    """
    import ctypes, os, numpy as np
    import m2bert_hf_mlx, mlx.core as mx
    a = np.random.default_rng(0).standard_normal((37, 19)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((19, 23)).astype(np.float32)
    got = np.array(mx.array(a) @ mx.array(b))
    assert np.allclose(got, a @ b, atol=1e-4)
    print(m2bert_hf_mlx.cpu_blas.loaded, ctypes.CDLL(os.environ["M2BERT_BLAS"]).fake_cblas_calls())
    """
)


def run_python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def fake_cblas(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cblas")
    (folder / "fake.c").write_text(FAKE_CBLAS)
    subprocess.run(
        ["gcc", "-O1", "-shared", "-fPIC", "-o", str(folder / "libfake.so"), str(folder / "fake.c")], check=True
    )
    return str(folder / "libfake.so")


@pytest.mark.skipif(sys.platform != "linux", reason="the interposition concerns MLX's Linux CPU wheels")
def test_products_reach_the_selected_cblas(fake_cblas):
    result = run_python(PROBE, M2BERT_BLAS=fake_cblas)
    assert result.returncode == 0, result.stderr
    library, calls = result.stdout.split()
    assert library == fake_cblas and int(calls) >= 1


@pytest.mark.skipif(sys.platform != "linux", reason="the interposition concerns MLX's Linux CPU wheels")
def test_nothing_is_loaded_when_mlx_came_first_or_when_off(fake_cblas):
    first = run_python("import mlx.core, m2bert_hf_mlx; print(m2bert_hf_mlx.cpu_blas.loaded)", M2BERT_BLAS=fake_cblas)
    assert first.stdout.strip() == "None"
    # Attributed to the import statement (line 1 of the -c code), not to the package's __init__.py.
    assert first.stderr.startswith("<string>:1: SlowCPUWarning: mlx.core was imported before m2bert_hf_mlx")
    off = run_python("import m2bert_hf_mlx; print(m2bert_hf_mlx.cpu_blas.loaded)", M2BERT_BLAS="off")
    assert off.stdout.strip() == "None" and off.stderr == ""


@pytest.mark.skipif(sys.platform != "linux", reason="the interposition concerns MLX's Linux CPU wheels")
def test_the_cpu_extra_brings_a_cblas_that_is_loaded_by_default():
    result = run_python("import m2bert_hf_mlx; print(m2bert_hf_mlx.cpu_blas.loaded)", M2BERT_BLAS="auto")
    assert result.stderr == ""
    loaded = Path(result.stdout.strip())
    assert loaded.is_file() and any(loaded.name.startswith(stem) for _, stem in PIP_CBLAS), loaded


# cpu_blas loaded on its own (not through the package, whose import would already have preloaded), with nothing found;
# its one import of the package, errors (which imports only the standard library), loaded beside it.
WITHOUT_ANY_CBLAS = textwrap.dedent(
    """
    import importlib.util, os, sys, types, warnings
    sys.modules["m2bert_hf_mlx"] = types.ModuleType("m2bert_hf_mlx")
    for name in ("errors", "cpu_blas"):
        path = os.path.join(os.path.dirname(sys.argv[1]), name + ".py")
        spec = importlib.util.spec_from_file_location("m2bert_hf_mlx." + name, path)
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    cpu_blas = module
    cpu_blas.candidates = lambda: ["/nonexistent/libopenblas.so.0"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu_blas.preload()
    print(cpu_blas.loaded, *[w.category.__name__ + ": " + str(w.message) for w in caught], sep="\\n")
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="the interposition concerns MLX's Linux CPU wheels")
def test_without_an_optimized_cblas_one_warning_says_how_to_fix_it():
    import m2bert_hf_mlx.cpu_blas

    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_ANY_CBLAS, m2bert_hf_mlx.cpu_blas.__file__],
        env={**os.environ, "M2BERT_BLAS": "auto"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("None\nSlowCPUWarning: No optimized CBLAS library was found")
    assert "pip install 'm2bert-hf-mlx[cpu]'" in result.stdout and result.stdout.count("SlowCPUWarning") == 1


def _imported_modules(path):
    """The top-level names of the modules `path` imports (at module level or in a function), in the order of its
    lines."""
    nodes = [
        n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.Import | ast.ImportFrom)
    ]
    names = []
    for node in sorted(nodes, key=lambda n: n.lineno):
        if isinstance(node, ast.Import):
            names += [alias.name.partition(".")[0] for alias in node.names]
        elif node.level == 0:
            names.append(node.module.partition(".")[0])
    return names


def test_scripts_import_the_package_before_anything_that_may_import_mlx():
    # ruff's isort puts first-party imports last; a script that imports mlx.core first keeps the reference BLAS.
    late = []
    for path in SCRIPTS:
        outside = [name for name in _imported_modules(path) if name not in sys.stdlib_module_names]
        if {"mlx", "m2bert_hf_mlx", *LOCAL_MODULES} & set(outside) and outside[0] != "m2bert_hf_mlx":
            late.append(f"{path.relative_to(ROOT)} imports {outside[0]} first")
    assert not late, late


def test_importing_the_package_prints_nothing():
    # Without torch (make test-lowest), transformers would advise installing it; nothing else may print either.
    result = run_python("import m2bert_hf_mlx")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.skipif(sys.platform != "linux", reason="the interposition concerns MLX's Linux CPU wheels")
def test_an_unloadable_library_is_a_clear_error():
    result = run_python("import m2bert_hf_mlx", M2BERT_BLAS="/nonexistent/libblas.so")
    expected = "m2bert_hf_mlx.errors.BlasLoadError: M2BERT_BLAS='/nonexistent/libblas.so' cannot be loaded"
    assert result.returncode != 0 and expected in result.stderr
    assert issubclass(BlasLoadError, ImportError) and issubclass(BlasLoadError, M2BertError)
