"""long_conv on the CPU: the mx.fft reference and the emulated Metal kernel against float64, gradients, the
precomputed spectrum and back-end selection."""

import dataclasses
import re

import mlx.core as mx
import numpy as np
import pytest

from m2bert_hf_mlx import emulator, kernels, ops

# A kernel that fails its self-check would pass these tests through the mx.fft fallback: make that a failure.
pytestmark = pytest.mark.filterwarnings("error::m2bert_hf_mlx.ops.LongConvFallbackWarning")


def reference(u, k_fwd, k_rev, skip):
    """The convolution in float64, straight from its definition's FFT form (numpy)."""
    u = np.asarray(u, dtype=np.float64)
    _, length, channels = u.shape
    n = 4 * length
    h = np.zeros((channels, n))
    h[:, :length] = k_fwd
    h[:, 0] += skip
    if k_rev is not None:
        h[:, n - length + 1 :] = np.asarray(k_rev, dtype=np.float64)[:, : length - 1][:, ::-1]
    spectrum = np.fft.rfft(h, axis=1).T[None]
    return np.fft.irfft(np.fft.rfft(u, n=n, axis=1) * spectrum, n=n, axis=1)[:, :length]


def inputs(rng, batch, length, channels, causal=False):
    u = rng.standard_normal((batch, length, channels)).astype(np.float32)
    k_fwd = (rng.standard_normal((channels, length)) / np.sqrt(length)).astype(np.float32)
    k_rev = None if causal else (rng.standard_normal((channels, length)) / np.sqrt(length)).astype(np.float32)
    skip = rng.standard_normal(channels).astype(np.float32)
    return u, k_fwd, k_rev, skip


def run(backend, u, k_fwd, k_rev, skip, dtype=mx.float32):
    y = ops.long_conv(
        mx.array(u).astype(dtype),
        mx.array(k_fwd),
        None if k_rev is None else mx.array(k_rev),
        mx.array(skip),
        backend=backend,
    )
    assert y.dtype == dtype and y.shape == u.shape
    return np.asarray(y.astype(mx.float32))


def rel_error(y, ref):
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


# B = 1, C = 1, L = 1, odd L and C, one threadgroup with channels left over, the split single pass of the Metal
# plan (N = 8192: L = 2049) and its four-step path (L = 4097).
AWKWARD = [(1, 1, 1), (2, 1, 3), (1, 2, 1), (3, 37, 5), (2, 300, 70), (1, 2049, 3), (2, 4097, 2)]

# Split tiles (kernels.Tile) of both radixes with the padded layout and several rows per threadgroup: FFTs of 16 to
# 2048 points, each radix with every last stage it can have (a full one, or of radix 2, 4 or 8).
SPLIT = kernels.Target(
    "split",
    single_pass=(kernels.Tile(64, 256, 8, 3, split=True), kernels.Tile(2048, 2048, 16, 4, split=True)),
    mixer_single_pass=kernels.METAL.mixer_single_pass,
    four_step=kernels.METAL.four_step,
    pad=True,
)
SPLIT_SHAPES = [(2, 5, 7), (1, 16, 4), (2, 20, 9), (1, 33, 3), (3, 100, 6), (2, 200, 5), (1, 300, 5), (2, 1000, 3)]


@pytest.mark.parametrize("backend", ["emulated", "mlx"])
@pytest.mark.parametrize("shape", AWKWARD, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(backend, shape):
    rng = np.random.default_rng(sum(shape))
    u, k_fwd, k_rev, skip = inputs(rng, *shape)
    ref = reference(u, k_fwd, k_rev, skip)
    y = run(backend, u, k_fwd, k_rev, skip)
    assert np.isfinite(y).all()
    assert rel_error(y, ref) < 1e-6


@pytest.mark.parametrize("length", [1, 37, 300, 2049, 4097])
def test_precision_within_twice_the_mx_fft_path(length):
    rng = np.random.default_rng(length)
    u, k_fwd, k_rev, skip = inputs(rng, 2, length, 4)
    ref = reference(u, k_fwd, k_rev, skip)
    mlx_error = rel_error(run("mlx", u, k_fwd, k_rev, skip), ref)
    assert rel_error(run("emulated", u, k_fwd, k_rev, skip), ref) <= 2 * mlx_error


@pytest.mark.parametrize("length", [7, 2049])
def test_causal(length):
    rng = np.random.default_rng(7)
    u, k_fwd, _, skip = inputs(rng, 2, length, 3, causal=True)
    ref = reference(u, k_fwd, None, skip)
    for backend in ("emulated", "mlx"):
        assert rel_error(run(backend, u, k_fwd, None, skip), ref) < 1e-6


@pytest.mark.parametrize("length", [300, 3000], ids=["single-pass", "split"])
def test_non_contiguous_inputs_are_read_in_place(length):
    rng = np.random.default_rng(3)
    u, k_fwd, k_rev, skip = inputs(rng, 2, length, 6)
    ref = reference(u, k_fwd, k_rev, skip)
    # (B, C, L) storage seen as (B, L, C), and a view with a negative channel stride.
    transposed = mx.array(np.ascontiguousarray(u.transpose(0, 2, 1))).transpose(0, 2, 1)
    reversed_channels = mx.array(np.ascontiguousarray(u[:, :, ::-1]))[:, :, ::-1]
    for u_view in (transposed, reversed_channels):
        for backend in ("emulated", "mlx"):
            y = ops.long_conv(u_view, mx.array(k_fwd), mx.array(k_rev), mx.array(skip), backend=backend)
            assert rel_error(np.asarray(y), ref) < 1e-6


@pytest.mark.parametrize("dtype, tolerance", [(mx.float16, 2e-3), (mx.bfloat16, 1e-2)])
def test_low_precision_inputs(dtype, tolerance):
    rng = np.random.default_rng(5)
    u, k_fwd, k_rev, skip = inputs(rng, 2, 2049, 4)
    u = np.asarray(mx.array(u).astype(dtype).astype(mx.float32))  # the values the kernel sees
    ref = reference(u, k_fwd, k_rev, skip)
    for backend in ("emulated", "mlx"):
        y = run(backend, u, k_fwd, k_rev, skip, dtype)
        # fp32 inside: what remains is the rounding of the output to dtype.
        assert rel_error(y, ref) < tolerance
    emulated, reference_path = run("emulated", u, k_fwd, k_rev, skip, dtype), run("mlx", u, k_fwd, k_rev, skip, dtype)
    assert np.mean(emulated != reference_path) < 0.05


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [37, 3000, 4097], ids=["single-pass", "split", "four-step"])
def test_gradients_match_mx_fft_autodiff(causal, length):
    rng = np.random.default_rng(length + causal)
    u, k_fwd, k_rev, skip = inputs(rng, 2, length, 3, causal)
    primals = [mx.array(u), mx.array(k_fwd)] + ([] if causal else [mx.array(k_rev)]) + [mx.array(skip)]
    cotangent = mx.array(rng.standard_normal(u.shape).astype(np.float32))

    def conv(backend):
        def f(u, k_fwd, *rest):
            k_rev, skip = (None, rest[0]) if causal else rest
            return ops.long_conv(u, k_fwd, k_rev, skip, backend=backend)

        return f

    expected = mx.vjp(conv("mlx"), primals, [cotangent])[1]
    actual = mx.vjp(conv("emulated"), primals, [cotangent])[1]
    names = ["u", "k_fwd", "skip"] if causal else ["u", "k_fwd", "k_rev", "skip"]
    for name, e, a in zip(names, expected, actual):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert float(mx.linalg.norm(a - e) / mx.linalg.norm(e)) < 2e-6, name


def test_gradient_of_low_precision_input_keeps_its_dtype():
    rng = np.random.default_rng(11)
    u, k_fwd, k_rev, skip = inputs(rng, 1, 50, 2)
    u16 = mx.array(u).astype(mx.bfloat16)

    def loss(x):
        y = ops.long_conv(x, mx.array(k_fwd), mx.array(k_rev), mx.array(skip), backend="emulated")
        return y.astype(mx.float32).sum()

    grad = mx.grad(loss)(u16)
    assert grad.dtype == mx.bfloat16 and grad.shape == u16.shape


@pytest.mark.parametrize("backend", ["emulated", "mlx"])
@pytest.mark.parametrize("length", [100, 2049])
def test_precomputed_spectrum_gives_the_same_output(backend, length):
    rng = np.random.default_rng(13)
    u, k_fwd, k_rev, skip = (mx.array(a) for a in inputs(rng, 2, length, 5))
    spectrum = ops.filter_spectrum(k_fwd, k_rev, skip, length, backend=backend)
    assert (spectrum.backend, spectrum.length) == (backend, length)
    direct = ops.long_conv(u, k_fwd, k_rev, skip, backend=backend)
    cached = ops.long_conv(u, k_fwd, k_rev, skip, backend=backend, spectrum=spectrum)
    assert mx.array_equal(direct, cached)


@pytest.mark.parametrize("backend", ["emulated", "mlx"])
@pytest.mark.parametrize("causal", [False, True])
def test_precomputed_spectrum_gives_the_same_gradients(backend, causal):
    rng = np.random.default_rng(19 + causal)
    u, k_fwd, k_rev, skip = (None if a is None else mx.array(a) for a in inputs(rng, 2, 45, 3, causal))
    spectrum = ops.filter_spectrum(k_fwd, k_rev, skip, 45, backend=backend)
    cotangent = mx.array(rng.standard_normal(u.shape).astype(np.float32))

    def conv(spec):
        def f(u, k_fwd, skip, *k_rev):
            return ops.long_conv(u, k_fwd, k_rev[0] if k_rev else None, skip, backend=backend, spectrum=spec)

        return f

    primals = [u, k_fwd, skip] + ([] if causal else [k_rev])
    expected = mx.vjp(conv(None), primals, [cotangent])[1]
    actual = mx.vjp(conv(spectrum), primals, [cotangent])[1]
    for e, a in zip(expected, actual, strict=True):
        assert float(mx.linalg.norm(a - e) / mx.linalg.norm(e)) < 2e-6


@pytest.mark.parametrize("backend", ["emulated", "mlx"])
def test_spectrum_alone_gives_the_output_and_the_gradients_in_u_and_skip(backend):
    rng = np.random.default_rng(23)
    u, k_fwd, k_rev, skip = (mx.array(a) for a in inputs(rng, 2, 45, 3))
    spectrum = ops.filter_spectrum(k_fwd, k_rev, skip, 45, backend=backend)
    cotangent = mx.array(rng.standard_normal(u.shape).astype(np.float32))

    def with_filters(u, skip):
        return ops.long_conv(u, k_fwd, k_rev, skip, backend=backend, spectrum=spectrum)

    def spectrum_only(u, skip):
        return ops.long_conv(u, None, None, skip, backend=backend, spectrum=spectrum)

    expected_y, expected = mx.vjp(with_filters, [u, skip], [cotangent])
    actual_y, actual = mx.vjp(spectrum_only, [u, skip], [cotangent])
    assert mx.array_equal(expected_y[0], actual_y[0])
    for e, a in zip(expected, actual, strict=True):
        assert float(mx.linalg.norm(a - e) / mx.linalg.norm(e)) < 2e-6
    with pytest.raises(ValueError, match="only with a spectrum"):
        ops.long_conv(u, None, None, skip, backend=backend)
    with pytest.raises(ValueError, match="3 channels but the filters have 2"):
        ops.long_conv(
            u,
            None,
            None,
            skip[:2],
            backend=backend,
            spectrum=ops.filter_spectrum(k_fwd[:2], k_rev[:2], skip[:2], 45, backend=backend),
        )


def test_spectrum_for_another_length_or_backend_is_refused():
    rng = np.random.default_rng(17)
    u, k_fwd, k_rev, skip = (mx.array(a) for a in inputs(rng, 1, 64, 2))
    spectrum = ops.filter_spectrum(k_fwd[:, :32], k_rev[:, :32], skip, 32, backend="emulated")
    with pytest.raises(ValueError, match="length 32"):
        ops.long_conv(u, k_fwd, k_rev, skip, backend="emulated", spectrum=spectrum)
    with pytest.raises(ValueError, match="backend 'emulated'"):
        ops.long_conv(u[:, :32], k_fwd[:, :32], k_rev[:, :32], skip, backend="mlx", spectrum=spectrum)


def test_backend_selection(monkeypatch):
    monkeypatch.delenv(ops.BACKEND_ENV, raising=False)
    expected = "metal" if mx.metal.is_available() else "cuda" if mx.cuda.is_available() else "mlx"
    assert ops.resolve_backend() == expected
    monkeypatch.setenv(ops.BACKEND_ENV, "emulated")
    assert ops.resolve_backend() == "emulated"
    assert ops.resolve_backend("mlx") == "mlx"
    monkeypatch.setenv(ops.BACKEND_ENV, "vulkan")
    with pytest.raises(ValueError, match=ops.BACKEND_ENV):
        ops.resolve_backend()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(u=mx.zeros((4, 3))), "batch, length, channels"),
        (dict(u=mx.zeros((1, 4, 3), dtype=mx.int32)), "float32, float16 or bfloat16"),
        (dict(k_fwd=mx.zeros((3, 5))), "k_fwd must have shape"),
        (dict(k_rev=mx.zeros((2, 4))), "k_rev must have the shape"),
        (dict(skip=mx.zeros((4,))), "skip must have shape"),
        (dict(k_fwd=mx.zeros((2, 4)), k_rev=mx.zeros((2, 4)), skip=mx.zeros((2,))), "u has 3 channels"),
    ],
)
def test_user_errors_say_what_to_fix(change, message):
    args = dict(u=mx.zeros((1, 4, 3)), k_fwd=mx.zeros((3, 4)), k_rev=mx.zeros((3, 4)), skip=mx.zeros((3,)))
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        ops.long_conv(args["u"], args["k_fwd"], args["k_rev"], args["skip"], backend="mlx")


@pytest.mark.parametrize(
    "shape",
    [(3, 100, 70), (2, 1500, 5), (1, 3000, 9), (1, 5000, 3), (1, 16385, 2)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_cuda_plan_on_the_emulator(shape):
    # The CUDA tiles (padded layout, other tile sizes: single passes of 2048 to 16384 values) and the four-step
    # passes through the same body, before any GPU sees them.
    rng = np.random.default_rng(23)
    u, k_fwd, k_rev, skip = inputs(rng, *shape)
    plan = kernels.plan(kernels.CUDA, *shape)
    packed = kernels.packed_filter(mx.array(k_fwd), mx.array(k_rev), mx.array(skip), plan.n, plan.n1)
    launch_fn = emulator.launch_fn(kernels.CUDA.threadgroup_bytes_limit)
    y = np.asarray(kernels.run_plan(plan, mx.array(u), packed, launch_fn))
    assert rel_error(y, reference(u, k_fwd, k_rev, skip)) < 1e-6


# Threads concurrent, or one at a time between barriers in thread order and in reverse (emulator.launch_fn), where
# a missing barrier shows whatever the timing of the threads: the split tiles and the Metal target's split tile.
SCHEDULES = {"concurrent": 0, "serial": 1, "reversed": -1}
SPLIT_PLANS = [(SPLIT, shape) for shape in SPLIT_SHAPES] + [(kernels.METAL, (1, 3000, 3))]


def plan_id(x):
    return "x".join(map(str, x)) if isinstance(x, tuple) else x.name


@pytest.mark.parametrize("order", SCHEDULES.values(), ids=SCHEDULES.keys())
@pytest.mark.parametrize(("target", "shape"), SPLIT_PLANS, ids=plan_id)
def test_split_tiles_on_the_emulator(target, shape, order):
    rng = np.random.default_rng(29)
    u, k_fwd, k_rev, skip = inputs(rng, *shape)
    plan = kernels.plan(target, *shape)
    assert plan.launches[0].kernel == "single_pass_split"
    packed = kernels.packed_filter(mx.array(k_fwd), mx.array(k_rev), mx.array(skip), plan.n, plan.n1)
    launch_fn = emulator.launch_fn(target.threadgroup_bytes_limit, order)
    y = np.asarray(kernels.run_plan(plan, mx.array(u), packed, launch_fn))
    assert rel_error(y, reference(u, k_fwd, k_rev, skip)) < 1e-6


@pytest.mark.parametrize("order", [1, -1], ids=["serial", "reversed"])
@pytest.mark.parametrize("shape", [(3, 37, 5), (2, 4097, 2)], ids=["single-pass", "four-step"])
def test_metal_plans_in_serial_schedules(shape, order):
    # The other kernels of the Metal target one thread at a time between barriers (SCHEDULES), in both orders.
    rng = np.random.default_rng(37)
    u, k_fwd, k_rev, skip = inputs(rng, *shape)
    plan = kernels.plan(kernels.METAL, *shape)
    packed = kernels.packed_filter(mx.array(k_fwd), mx.array(k_rev), mx.array(skip), plan.n, plan.n1)
    launch_fn = emulator.launch_fn(kernels.METAL.threadgroup_bytes_limit, order)
    y = np.asarray(kernels.run_plan(plan, mx.array(u), packed, launch_fn))
    assert rel_error(y, reference(u, k_fwd, k_rev, skip)) < 1e-6


def test_split_tile_holds_twice_the_values():
    # One row of N = 8192 in Metal's 32 KB: as 8192 complex values it needs 64 KB (the test below), split 32 KB.
    (launch,) = kernels.plan(kernels.METAL, 1, 3000, 2).launches
    assert launch.kernel == "single_pass_split" and 8 * launch.smem_values == 32768
    assert kernels.METAL.threadgroup_bytes_limit == 32768


@pytest.mark.parametrize(
    "tile, message",
    [
        (dict(max_n=64, values=256, elems=4, log_radix=3), "radix 2^3 with 4 values per thread has no kernel"),
        (dict(max_n=64, values=256, elems=8, log_radix=4), "radix 2^4 with 8 values per thread has no kernel"),
        (dict(max_n=64, values=256, elems=12, log_radix=3), "with 12 values per thread has no kernel"),
        (dict(max_n=64, values=384, elems=8, log_radix=3), "powers of two, 384 values"),
        (dict(max_n=48, values=256, elems=8, log_radix=3), "powers of two"),
    ],
)
def test_tiles_without_a_kernel_are_refused(tile, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        kernels.Tile(**tile)


def test_split_four_step_and_mixer_tiles_are_refused():
    with pytest.raises(ValueError, match="split tiles are single passes"):
        kernels.Target("t", (), (), (kernels.Tile(1 << 62, 4096, 16, 4, split=True),), pad=False)
    with pytest.raises(ValueError, match="the mixer has no split kernel"):
        kernels.Target("t", (), (kernels.Tile(4096, 8192, 16, 4, split=True),), (), pad=False)


def test_emulator_enforces_the_metal_threadgroup_limit():
    rng = np.random.default_rng(19)
    u, k_fwd, k_rev, skip = (mx.array(a) for a in inputs(rng, 1, 3000, 2))
    oversized = kernels.Target(
        "too-big",
        single_pass=(kernels.Tile(8192, 8192, 16, 4),),
        mixer_single_pass=kernels.METAL.mixer_single_pass,
        four_step=kernels.METAL.four_step,
        pad=False,
    )
    plan = kernels.plan(oversized, 1, 3000, 2)
    packed = kernels.packed_filter(k_fwd, k_rev, skip, plan.n, plan.n1)
    with pytest.raises(RuntimeError, match="over the 32768-byte limit"):
        kernels.run_plan(plan, u, packed, emulator.launch_fn(kernels.METAL.threadgroup_bytes_limit))


def test_emulator_fails_a_kernel_that_writes_past_its_buffer():
    # The Metal split tile's plan with a buffer one float2 (two of its values) short: the emulator's arena has room
    # past a buffer, and a write there fails the launch.
    rng = np.random.default_rng(19)
    u, k_fwd, k_rev, skip = (mx.array(a) for a in inputs(rng, 1, 3000, 2))
    plan = kernels.plan(kernels.METAL, 1, 3000, 2)
    (launch,) = plan.launches
    short = tuple((name, value - (name == "SMEM")) for name, value in launch.constants)
    plan = dataclasses.replace(plan, launches=(dataclasses.replace(launch, constants=short),))
    packed = kernels.packed_filter(k_fwd, k_rev, skip, plan.n, plan.n1)
    with pytest.raises(RuntimeError, match="single_pass_split wrote past its threadgroup buffer"):
        kernels.run_plan(plan, u, packed, emulator.launch_fn(kernels.METAL.threadgroup_bytes_limit))
