"""The kernel back ends' self-check: a kernel that fails to build or computes wrong numbers is replaced by mx.fft
for the rest of the process, with one warning, or raises where M2BERT_LONG_CONV_BACKEND forces it."""

import re
import warnings

import mlx.core as mx
import numpy as np
import pytest
from test_long_conv import inputs, reference, rel_error
from test_monarch_mixer import mix, mixer_inputs, mixer_reference

from m2bert_hf_mlx import ops
from m2bert_hf_mlx.cli import main
from m2bert_hf_mlx.errors import BackendUnavailableError, InputError, InputTypeError

# Every test starts from a process that has checked nothing (the fixture is in conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_checks")


@pytest.fixture
def wrong_kernel(monkeypatch):
    """A stand-in kernel that runs and returns plausible but wrong numbers (the emulated kernel's, 5% off)."""
    real = ops._launch_fn

    def launch_fn(backend, target):
        run = real(backend, target)
        return lambda launch, inputs, outputs, io_dtype: [y * 1.05 for y in run(launch, inputs, outputs, io_dtype)]

    monkeypatch.setattr(ops, "_launch_fn", launch_fn)


def conv(backend, shape, causal=False, seed=0, dtype=mx.float32):
    u, k_fwd, k_rev, skip = inputs(np.random.default_rng(seed), *shape, causal=causal)
    y = ops.long_conv(
        mx.array(u).astype(dtype),
        mx.array(k_fwd),
        None if k_rev is None else mx.array(k_rev),
        mx.array(skip),
        backend=backend,
    )
    return np.asarray(y.astype(mx.float32)), reference(u, k_fwd, k_rev, skip)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("failure", ["failing_build", "wrong_kernel"])
def test_failed_check_falls_back_to_mx_fft_with_one_warning(request, failure, dtype):
    request.getfixturevalue(failure)
    with pytest.warns(ops.LongConvFallbackWarning) as caught:
        y, ref = conv("emulated", (2, 300, 6), dtype=dtype)
    assert rel_error(y, ref) < (1e-6 if dtype == mx.float32 else 1e-2)
    assert caught[0].filename == __file__  # the line calling long_conv, not one of the package
    message = str(caught[0].message)
    name = "float32" if dtype == mx.float32 else "bfloat16"
    assert f"emulated long-convolution kernel failed its self-check (L=300, {name}: " in message
    assert "mx.fft for the rest of this process" in message and "report" in message
    assert ("RuntimeError: Building the long-convolution emulator failed" in message) == (failure == "failing_build")
    error = re.search(r"relative error (\S+) against mx.fft", message)
    assert (error is not None) == (failure == "wrong_kernel")
    assert error is None or 0.04 < float(error[1]) < 0.06
    # Later calls, other plans (the split single pass), causal filters and dtypes included, stay silent and right.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for shape, causal, dtype, tolerance in [
            ((1, 2049, 3), False, mx.float32, 1e-6),
            ((2, 37, 5), True, mx.bfloat16, 1e-2),
        ]:
            y, ref = conv("emulated", shape, causal, dtype=dtype)
            assert rel_error(y, ref) < tolerance


def test_fallback_keeps_the_gradients(wrong_kernel):
    rng = np.random.default_rng(4)
    primals = [mx.array(a) for a in inputs(rng, 2, 70, 3)]
    cotangent = mx.array(rng.standard_normal((2, 70, 3)).astype(np.float32))

    def conv_on(backend):
        return lambda u, k_fwd, k_rev, skip: ops.long_conv(u, k_fwd, k_rev, skip, backend=backend)

    expected = mx.vjp(conv_on("mlx"), primals, [cotangent])[1]
    with pytest.warns(ops.LongConvFallbackWarning):
        actual = mx.vjp(conv_on("emulated"), primals, [cotangent])[1]
    for e, a in zip(expected, actual, strict=True):
        assert float(mx.linalg.norm(a - e) / mx.linalg.norm(e)) < 2e-6


def test_fallback_serves_a_precomputed_spectrum(wrong_kernel):
    rng = np.random.default_rng(8)
    u, k_fwd, k_rev, skip = inputs(rng, 2, 4097, 2)
    spectrum = ops.filter_spectrum(mx.array(k_fwd), mx.array(k_rev), mx.array(skip), 4097, backend="emulated")
    with pytest.warns(ops.LongConvFallbackWarning):
        y = ops.long_conv(mx.array(u), None, None, mx.array(skip), backend="emulated", spectrum=spectrum)
    assert rel_error(np.asarray(y), reference(u, k_fwd, k_rev, skip)) < 1e-6


@pytest.mark.parametrize("failure", ["failing_build", "wrong_kernel"])
def test_forced_backend_raises_instead(request, monkeypatch, failure):
    request.getfixturevalue(failure)
    monkeypatch.setenv(ops.BACKEND_ENV, "emulated")
    with pytest.raises(ops.LongConvKernelError, match=f"{ops.BACKEND_ENV}=emulated forbids the fallback"):
        conv(None, (1, 100, 4))


def test_metal_without_a_metal_device_falls_back(monkeypatch):
    # MLX builds a Metal kernel anywhere and fails when it runs without Metal: a real failed build of the Metal path.
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    with pytest.warns(ops.LongConvFallbackWarning, match=r"metal long-convolution kernel .*No Metal back-end"):
        y, ref = conv("metal", (2, 300, 6))
    assert rel_error(y, ref) < 1e-6


def test_a_passing_check_runs_once_per_build_and_dtype():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for shape in [(2, 300, 6), (3, 300, 70), (1, 260, 8)]:
            y, ref = conv("emulated", shape)
            assert rel_error(y, ref) < 1e-6
        conv("emulated", (1, 300, 6), dtype=mx.float16)
    # L = 260 and 300 share the N = 1024 build, and 6, 8 or 70 channels its 4-pair tile; float16 builds its own.
    assert sorted(str(dtype) for _, _, dtype in ops._kernel_checks) == ["mlx.core.float16", "mlx.core.float32"]
    assert all(failure is None for failure in ops._kernel_checks.values())


@pytest.fixture(params=["refused_threadgroup", "wrong_numbers"])
def failing_split_kernels(request, monkeypatch):
    """The split kernel alone fails: a dispatch refused as MLX refuses a threadgroup larger than the pipeline allows
    (a register-heavy build on some GPU), or wrong numbers. Returns the kernels that ran."""
    real, ran = ops._launch_fn, []

    def launch_fn(backend, target):
        run = real(backend, target)

        def launch(launch_, inputs, outputs, io_dtype):
            ran.append(launch_.kernel)
            if not launch_.spec.split:
                return run(launch_, inputs, outputs, io_dtype)
            if request.param == "refused_threadgroup":
                raise ValueError("Thread group size (512) is greater than the maximum allowed threads per threadgroup")
            return [y * 1.05 for y in run(launch_, inputs, outputs, io_dtype)]

        return launch

    monkeypatch.setattr(ops, "_launch_fn", launch_fn)
    return ran


def test_failed_split_kernels_leave_the_other_kernels_running(failing_split_kernels):
    with pytest.warns(ops.LongConvFallbackWarning) as caught:
        y, ref = conv("emulated", (1, 3000, 2))
    assert rel_error(y, ref) < 1e-6
    assert len(caught) == 1 and "emulated long-convolution split kernel failed its" in str(caught[0].message)
    assert "the other kernels keep running" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        failing_split_kernels.clear()
        y, ref = conv("emulated", (1, 3000, 2), seed=1)  # the split plan, now on mx.fft
        assert rel_error(y, ref) < 1e-6 and failing_split_kernels == []
        y, ref = conv("emulated", (2, 300, 6))  # a plan without split kernels: its kernel, checked and run
        assert rel_error(y, ref) < 1e-6 and failing_split_kernels.count("single_pass") == 2
        failing_split_kernels.clear()
        arrays = mixer_inputs(np.random.default_rng(2), 1, 3000, 3)  # separate operations, the split plan's: mx.fft
        assert rel_error(mix("emulated", arrays), mixer_reference(*arrays)) < 2e-6 and failing_split_kernels == []


def test_failed_split_kernels_raise_where_the_backend_is_forced(failing_split_kernels, monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, "emulated")
    with pytest.raises(ops.LongConvKernelError, match="split kernel failed its self-check .* forbids the fallback"):
        conv(None, (1, 3000, 2))


def test_check_kernels_checks_every_build_and_turns_none_off(failing_split_kernels):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pending = ops.check_kernels("emulated", max_length=3000, dtypes=iter([mx.float32]))
        # The checks run as they are consumed, so that a caller can report each at once.
        assert failing_split_kernels == []
        first = next(pending)
        assert failing_split_kernels == ["single_pass"] and first.plan.n == 2
        checks = [first, *pending]
    # N = 2 to 8192 for the long convolution, the mixer where it has a plan (not at N = 4096 or 8192 on Metal).
    assert sorted({check.plan.n for check in checks}) == [1 << k for k in range(1, 14)]
    for check in checks:
        split = any(launch.spec.split for launch in check.plan.launches)
        assert (check.failure is not None) == split, (check.plan.launches[0].kernel, check.failure)
    assert {check.plan.launches[0].kernel for check in checks if check.failure} == {"single_pass_split"}
    assert ops._failed_scopes == {} and ops._kernel_checks == {}
    with pytest.warns(ops.LongConvFallbackWarning, match="split kernel failed"):  # a first use still checks, and warns
        conv("emulated", (1, 3000, 2))


def test_check_kernels_on_the_command_line(capsys):
    assert main(["check-kernels", "--backend", "emulated", "--max-length", "64"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + 3 * 14  # N = 2..128, each dtype, the long convolution and the mixer
    assert out[-1].startswith("All 42 kernel checks passed (emulated back end, MLX ")


def test_check_kernels_on_the_command_line_reports_failures(capsys, failing_split_kernels):
    assert main(["check-kernels", "--backend", "emulated", "--max-length", "3000"]) == 1
    out = capsys.readouterr().out.splitlines()
    failed = [line for line in out if "FAILED" in line]
    assert len(failed) == 3 and all("_split" in line for line in failed)
    assert out[-1].startswith("3 of ") and "please report this output" in out[-1]


def test_check_kernels_needs_a_kernel_back_end(capsys, monkeypatch):
    with pytest.raises(BackendUnavailableError, match="no kernel back end to check"):
        ops.check_kernels("mlx")
    with pytest.raises(InputError, match="positive number of tokens; got 0"):
        ops.check_kernels("emulated", max_length=0)
    with pytest.raises(InputTypeError, match="dtypes among mx.float32, mx.float16 and mx.bfloat16; got mlx.core.int32"):
        ops.check_kernels("emulated", dtypes=(mx.float32, mx.int32))
    # A machine without a GPU: its default back end is mx.fft.
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: False)
    assert main(["check-kernels"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "m2bert-mlx check-kernels: error: There is no kernel back end to check here ('mlx' is mx.fft); use the back "
        "end 'emulated' (--backend emulated) to run the Metal build on the CPU."
    ]
