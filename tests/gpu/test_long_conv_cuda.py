"""The CUDA build of the long-convolution kernel on an NVIDIA GPU (MLX's CUDA back end), against float64.

Skipped where MLX has no CUDA device (CI). On the GPU machine: python -m pytest tests/gpu.
"""

import mlx.core as mx
import numpy as np
import pytest
from test_long_conv import AWKWARD, SPLIT, SPLIT_SHAPES, inputs, plan_id, reference, rel_error, run

from m2bert_hf_mlx import kernels, ops

pytestmark = [
    pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX with its CUDA back end and a GPU"),
    # A kernel that fails its self-check would pass through the mx.fft fallback: make that a failure.
    pytest.mark.filterwarnings("error::m2bert_hf_mlx.ops.LongConvFallbackWarning"),
]

# Every plan of the CUDA target (each single-pass tier, the 16384-value one with one and two pairs a block, and the
# four-step passes), up to the longest published L.
LONG = [(2, 1500, 40), (1, 3000, 2), (2, 4096, 96), (2, 8192, 33), (1, 8193, 8), (1, 16384, 770), (1, 32768, 768)]


@pytest.mark.parametrize("shape", AWKWARD + LONG, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(shape):
    rng = np.random.default_rng(sum(shape))
    u, k_fwd, k_rev, skip = inputs(rng, *shape)
    ref = reference(u, k_fwd, k_rev, skip)
    y = run("cuda", u, k_fwd, k_rev, skip)
    assert np.isfinite(y).all()
    assert rel_error(y, ref) < 1e-6


@pytest.mark.parametrize("length", [1, 2, 37, 300, 2049, 4097, 8192, 32768])
def test_precision_within_twice_the_mx_fft_path(length):
    # Within twice the error of MLX's own fp32 FFT path (cuFFT) on the same GPU, over enough values for the
    # ratio of two rounding errors to be stable.
    rng = np.random.default_rng(length)
    u, k_fwd, k_rev, skip = inputs(rng, max(1, 8192 // length), length, 64)
    ref = reference(u, k_fwd, k_rev, skip)
    assert rel_error(run("cuda", u, k_fwd, k_rev, skip), ref) <= 2 * rel_error(run("mlx", u, k_fwd, k_rev, skip), ref)


@pytest.mark.parametrize("length", [7, 4097, 32768])
def test_causal(length):
    rng = np.random.default_rng(length)
    u, k_fwd, _, skip = inputs(rng, 1, length, 6, causal=True)
    assert rel_error(run("cuda", u, k_fwd, None, skip), reference(u, k_fwd, None, skip)) < 1e-6


@pytest.mark.parametrize("length", [300, 16384])
def test_non_contiguous_input(length):
    rng = np.random.default_rng(3)
    u, k_fwd, k_rev, skip = inputs(rng, 2, length, 10)
    transposed = mx.array(np.ascontiguousarray(u.transpose(0, 2, 1))).transpose(0, 2, 1)
    y = ops.long_conv(transposed, mx.array(k_fwd), mx.array(k_rev), mx.array(skip), backend="cuda")
    assert rel_error(np.asarray(y), reference(u, k_fwd, k_rev, skip)) < 1e-6


@pytest.mark.parametrize("dtype, tolerance", [(mx.float16, 2e-3), (mx.bfloat16, 1e-2)])
@pytest.mark.parametrize("length", [2049, 32768])
def test_low_precision_inputs(dtype, tolerance, length):
    rng = np.random.default_rng(5)
    u, k_fwd, k_rev, skip = inputs(rng, 1, length, 12)
    u = np.asarray(mx.array(u).astype(dtype).astype(mx.float32))
    assert rel_error(run("cuda", u, k_fwd, k_rev, skip, dtype), reference(u, k_fwd, k_rev, skip)) < tolerance


@pytest.mark.parametrize("length", [100, 8192, 32768])
def test_gradients_match_mx_fft_autodiff(length):
    rng = np.random.default_rng(length)
    primals = [mx.array(a) for a in inputs(rng, 2, length, 6)]
    cotangent = mx.array(rng.standard_normal((2, length, 6)).astype(np.float32))

    def conv(backend):
        return lambda u, k_fwd, k_rev, skip: ops.long_conv(u, k_fwd, k_rev, skip, backend=backend)

    expected = mx.vjp(conv("mlx"), primals, [cotangent])[1]
    actual = mx.vjp(conv("cuda"), primals, [cotangent])[1]
    for e, a in zip(expected, actual):
        assert float(mx.linalg.norm(a - e) / mx.linalg.norm(e)) < 2e-6


def test_every_output_is_written():
    # Outputs start as whatever the allocator hands out: poison that memory first, then check for NaN.
    rng = np.random.default_rng(9)
    for shape in [(3, 37, 5), (1, 8193, 3)]:
        poison = mx.full((8 << 20,), float("nan"))
        mx.eval(poison)
        del poison
        y = run("cuda", *inputs(rng, *shape))
        assert np.isfinite(y).all()


# The Metal target's plans, split tiles included, built for CUDA: the same bodies on a real GPU's concurrent threads,
# the nearest check of them to an Apple GPU that this project has.
METAL_PLANS = kernels.Target(
    "metal-plans", kernels.METAL.single_pass, kernels.METAL.mixer_single_pass, kernels.METAL.four_step, pad=False
)


@pytest.mark.parametrize(
    ("target", "shape"),
    [(SPLIT, shape) for shape in SPLIT_SHAPES] + [(METAL_PLANS, shape) for shape in [(2, 1500, 40), (2, 3000, 9)]],
    ids=plan_id,
)
def test_split_tiles_match_float64(target, shape):
    rng = np.random.default_rng(sum(shape))
    u, k_fwd, k_rev, skip = inputs(rng, *shape)
    plan = kernels.plan(target, *shape)
    packed = kernels.packed_filter(mx.array(k_fwd), mx.array(k_rev), mx.array(skip), plan.n, plan.n1)
    y = np.asarray(kernels.run_plan(plan, mx.array(u), packed, kernels.gpu_launch("cuda")))
    assert rel_error(y, reference(u, k_fwd, k_rev, skip)) < 1e-6
