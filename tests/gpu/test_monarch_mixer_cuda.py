"""The CUDA build of the Monarch mixer kernels on an NVIDIA GPU (MLX's CUDA back end), against float64.

Skipped where MLX has no CUDA device (CI). On the GPU machine: python -m pytest tests/gpu.
"""

import mlx.core as mx
import numpy as np
import pytest
from test_long_conv import rel_error
from test_long_conv_cuda import METAL_PLANS
from test_monarch_mixer import AWKWARD, mix, mixer_gradients, mixer_inputs, mixer_reference, to_mx

from m2bert_hf_mlx import kernels, ops

pytestmark = [
    pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX with its CUDA back end and a GPU"),
    # A kernel that fails its self-check would pass through the separate operations: make that a failure.
    pytest.mark.filterwarnings("error::m2bert_hf_mlx.ops.LongConvFallbackWarning"),
]

# Every mixer plan of the CUDA target (the five single-pass tiers and the four-step passes) up to the longest
# published L, and at 4096 < L <= 8192, where the long convolution's single pass has no mixer counterpart, the
# separate operations.
LONG = [
    (2, 256, 40),
    (2, 512, 96),
    (2, 2048, 96),
    (2, 4096, 33),
    (1, 8192, 40),
    (1, 8193, 8),
    (1, 16384, 770),
    (1, 32768, 768),
]


@pytest.mark.parametrize("shape", AWKWARD + LONG, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(shape):
    arrays = mixer_inputs(np.random.default_rng(sum(shape)), *shape)
    assert (ops.mixer_plan("cuda", *shape) is None) == (4096 < shape[1] <= 8192)
    y = mix("cuda", arrays)
    assert np.isfinite(y).all()
    assert rel_error(y, mixer_reference(*arrays)) < 2e-6


@pytest.mark.parametrize(("dtype", "tolerance"), [(mx.float16, 2e-3), (mx.bfloat16, 1.5e-2)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("length", [2048, 4096, 8193])
def test_low_precision_inputs(dtype, tolerance, length):
    arrays = mixer_inputs(np.random.default_rng(length), 2, length, 64)
    z, u = (np.asarray(mx.array(a.astype(np.float32)).astype(dtype).astype(mx.float32)) for a in arrays[:2])
    exact = mixer_reference(z, u, *arrays[2:])
    assert rel_error(mix("cuda", (z, u, *arrays[2:]), dtype), exact) < tolerance


@pytest.mark.parametrize("length", [2048, 8193])
def test_gradients_match_the_separate_operations(length):
    arrays = mixer_inputs(np.random.default_rng(13), 2, length, 16)
    for fused, separate in zip(mixer_gradients("cuda", arrays), mixer_gradients("mlx", arrays)):
        assert rel_error(np.asarray(fused), np.asarray(separate)) < 1e-5


def test_every_output_is_written():
    # Outputs start as whatever the allocator hands out: poison that memory first, then check for NaN.
    for shape in [(3, 37, 5), (2, 2048, 6), (1, 8193, 3)]:
        poison = mx.full((8 << 20,), float("nan"))
        mx.eval(poison)
        del poison
        y = mix("cuda", mixer_inputs(np.random.default_rng(9), *shape))
        assert np.isfinite(y).all(), shape


@pytest.mark.parametrize(
    ("shape", "kernel"), [((2, 1000, 40), "mixer_single_pass"), ((1, 4097, 6), "mixer_columns_forward")], ids=str
)
def test_metal_plans_match_float64(shape, kernel):
    # The Metal target's mixer plans built for CUDA (test_long_conv_cuda.METAL_PLANS), its single pass and its
    # four-step passes: the same bodies on a real GPU's concurrent threads, the nearest check of them to an Apple GPU.
    arrays = mixer_inputs(np.random.default_rng(sum(shape)), *shape)
    z, u, weight, bias, filters, residual = to_mx(arrays)
    plan = kernels.plan(METAL_PLANS, *shape, mixer=True)
    assert plan.launches[0].kernel == kernel
    packed = [kernels.packed_filter(*f, plan.n, plan.n1) for f in (filters, residual)]
    taps = kernels.short_conv_taps(weight, bias)
    y = kernels.run_plan(plan, u, packed[0], kernels.gpu_launch("cuda"), (z, taps, packed[1]))
    assert rel_error(np.asarray(y), mixer_reference(*arrays)) < 2e-6
