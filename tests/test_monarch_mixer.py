"""ops.monarch_mixer, the Monarch mixer's fused sequence mixing: the emulated mixer kernels (Metal and CUDA plans)
against float64, its gradients, its fallback, and the model using it."""

import warnings

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from random_checkpoint import canonical_config
from test_long_conv import reference as long_conv_reference
from test_long_conv import rel_error

from m2bert_hf_mlx import M2BertConfig, M2BertForMaskedLM, emulator, kernels, ops
from m2bert_hf_mlx.errors import InputError, InputTypeError

pytestmark = pytest.mark.filterwarnings("error::m2bert_hf_mlx.ops.LongConvFallbackWarning")


def mixer_inputs(rng, batch, length, channels, causal=False):
    def filters():
        k_fwd = rng.standard_normal((channels, length)) / np.sqrt(length)
        k_rev = None if causal else rng.standard_normal((channels, length)) / np.sqrt(length)
        return k_fwd, k_rev, rng.standard_normal(channels)

    z = rng.standard_normal((batch, length, 3 * channels))
    u = rng.standard_normal((batch, length, channels))
    weight, bias = rng.standard_normal((3 * channels, 3, 1)) / 2, rng.standard_normal(3 * channels)
    return z, u, weight, bias, filters(), filters()


def mixer_reference(z, u, weight, bias, filters, residual_filters):
    """The mixer in float64 from its definition (m2bert-architecture.md 2.4), numpy only."""
    z, u, weight = (np.asarray(a, dtype=np.float64) for a in (z, u, weight))
    length = z.shape[1]
    padded = np.pad(z, [(0, 0), (2, 0), (0, 0)])
    w = weight[:, :, 0]
    uc = padded[:, :length] * w[:, 0] + padded[:, 1 : length + 1] * w[:, 1] + z * w[:, 2] + bias
    x1, x2, v = np.split(uc, 3, axis=-1)
    return long_conv_reference(v * x1, *filters) * x2 + long_conv_reference(u, *residual_filters)


def to_mx(arrays, dtype=mx.float32):
    def convert(a):
        if a is None:
            return None
        if isinstance(a, tuple):
            return tuple(convert(b) for b in a)
        return mx.array(np.asarray(a, dtype=np.float32))

    z, u, *rest = (convert(a) for a in arrays)
    return (z.astype(dtype), u.astype(dtype), *rest)


def mix(backend, arrays, dtype=mx.float32, **kwargs):
    z, u, weight, bias, filters, residual = to_mx(arrays, dtype)
    y = ops.monarch_mixer(z, u, weight, bias, filters, residual, backend=backend, **kwargs)
    assert y.dtype == dtype and y.shape == u.shape
    return np.asarray(y.astype(mx.float32))


# Metal plans: single pass (one threadgroup, channels left over, odd C), separate operations at 1024 < L <= 4096
# (N = 4096 and 8192, the latter on the long convolution's split tile), four-step from L = 4097.
AWKWARD = [(1, 1, 1), (2, 2, 3), (3, 37, 5), (2, 300, 70), (1, 1500, 3), (1, 2049, 3), (2, 4097, 2)]


@pytest.mark.parametrize("backend", ["emulated", "mlx"])
@pytest.mark.parametrize("shape", AWKWARD, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(backend, shape):
    arrays = mixer_inputs(np.random.default_rng(sum(shape)), *shape)
    assert rel_error(mix(backend, arrays), mixer_reference(*arrays)) < 2e-6


@pytest.mark.parametrize(
    "shape", [(2, 100, 7), (1, 256, 4), (1, 512, 3), (1, 2048, 3), (1, 2049, 6), (1, 4097, 2)], ids=str
)
def test_cuda_plans_on_the_emulator(shape):
    # The CUDA target's mixer tiers (4096 values of radix 16, 8192 of radix 8, 8192 of radix 16, 16384 of radix 8)
    # and four-step passes.
    arrays = mixer_inputs(np.random.default_rng(7), *shape)
    z, u, weight, bias, filters, residual = to_mx(arrays)
    plan = kernels.plan(kernels.CUDA, *shape, mixer=True)
    packed = [kernels.packed_filter(*f, plan.n, plan.n1) for f in (filters, residual)]
    launch = emulator.launch_fn(kernels.CUDA.threadgroup_bytes_limit)
    taps = kernels.short_conv_taps(weight, bias)
    y = kernels.run_plan(plan, u, packed[0], launch, (z, taps, packed[1]))
    assert rel_error(np.asarray(y), mixer_reference(*arrays)) < 2e-6


@pytest.mark.parametrize("order", [1, -1], ids=["serial", "reversed"])
@pytest.mark.parametrize("shape", [(3, 37, 5), (1, 2049, 3)], ids=["single-pass", "four-step"])
def test_metal_plans_in_serial_schedules(shape, order):
    # The other mixer kernels of the Metal target one thread at a time between barriers, in both orders.
    arrays = mixer_inputs(np.random.default_rng(33), *shape)
    z, u, weight, bias, filters, residual = to_mx(arrays)
    plan = kernels.plan(kernels.METAL, *shape, mixer=True)
    packed = [kernels.packed_filter(*f, plan.n, plan.n1) for f in (filters, residual)]
    launch = emulator.launch_fn(kernels.METAL.threadgroup_bytes_limit, order)
    y = kernels.run_plan(plan, u, packed[0], launch, (z, kernels.short_conv_taps(weight, bias), packed[1]))
    assert rel_error(np.asarray(y), mixer_reference(*arrays)) < 2e-6


def test_mixer_plans_share_the_long_convolution_split():
    # Every FFT size to N = 65536: a mixer plan exists exactly where its N1 is the long convolution's, and its
    # threadgroups hold both rows of a channel pair (at least 2 mixer pairs). The long convolution's single pass
    # reaches further than the mixer's, whose two rows of those N do not fit: N = 4096 and 8192 on Metal (32 KB, the
    # long convolution's split tile at 8192), 16384 on CUDA (227 KB).
    without = {kernels.METAL: {4096, 8192}, kernels.CUDA: {16384}}
    for target in (kernels.METAL, kernels.CUDA):
        for log_n in range(1, 17):
            length = 1 << (log_n - 1)
            mixer = kernels.plan(target, 1, length, 768, mixer=True)
            same_split = mixer.n1 == kernels.plan(target, 1, length, 768).n1
            assert (kernels.mixer_plan(target, 1, length, 768) is not None) == same_split
            assert same_split == ((1 << log_n) not in without[target]), (target.name, length)
            first = dict(mixer.launches[0].constants)
            assert first["LOG_P"] >= 1
    assert ops.mixer_plan("emulated", 1, 1024, 8).launches[0].kernel == "mixer_single_pass"
    assert ops.mixer_plan("emulated", 1, 1025, 8) is None  # Metal: two rows of N = 4096 exceed 32 KB
    assert ops.mixer_plan("emulated", 1, 4097, 8) is not None
    assert ops.mixer_plan("mlx", 1, 128, 8) is None


def test_without_a_residual_convolution():
    arrays = mixer_inputs(np.random.default_rng(29), 2, 100, 6)
    z, u, weight, bias, filters, _ = to_mx(arrays)
    y = ops.monarch_mixer(z, u, weight, bias, filters, backend="emulated")
    z64, u64 = (np.asarray(a, dtype=np.float64) for a in arrays[:2])
    without = mixer_reference(*arrays) - long_conv_reference(u64, *arrays[5])
    assert rel_error(np.asarray(y), without) < 2e-6


def test_inputs_of_two_dtypes_run_as_separate_operations():
    arrays = mixer_inputs(np.random.default_rng(31), 1, 50, 4)
    z, u, weight, bias, filters, residual = to_mx(arrays)
    y = ops.monarch_mixer(z.astype(mx.bfloat16), u, weight, bias, filters, residual, backend="emulated")
    assert y.dtype == mx.float32
    assert rel_error(np.asarray(y), mixer_reference(*arrays)) < 2e-2


def test_causal_filters():
    arrays = mixer_inputs(np.random.default_rng(3), 2, 200, 6, causal=True)
    assert rel_error(mix("emulated", arrays), mixer_reference(*arrays)) < 2e-6


# The kernels that read z and u: the single pass and the four-step passes' first (and, for z, last).
READERS = pytest.mark.parametrize("length", [300, 4097], ids=["single-pass", "four-step"])


@READERS
def test_non_contiguous_inputs_are_read_in_place(length):
    arrays = mixer_inputs(np.random.default_rng(5), 2, length, 6)
    z, u, weight, bias, filters, residual = to_mx(arrays)
    # Transposed storage: (B, C, L) arrays viewed as (B, L, C).
    z_t = mx.array(np.ascontiguousarray(np.asarray(z).transpose(0, 2, 1))).transpose(0, 2, 1)
    u_t = mx.array(np.ascontiguousarray(np.asarray(u).transpose(0, 2, 1))).transpose(0, 2, 1)
    y = ops.monarch_mixer(z_t, u_t, weight, bias, filters, residual, backend="emulated")
    assert rel_error(np.asarray(y), mixer_reference(*arrays)) < 2e-6


@READERS
@pytest.mark.parametrize(("dtype", "tolerance"), [(mx.float16, 2e-3), (mx.bfloat16, 1.5e-2)], ids=["fp16", "bf16"])
def test_low_precision_inputs(dtype, tolerance, length):
    arrays = mixer_inputs(np.random.default_rng(11), 2, length, 6)
    z, u = (np.asarray(mx.array(a.astype(np.float32)).astype(dtype).astype(mx.float32)) for a in arrays[:2])
    exact = mixer_reference(z, u, *arrays[2:])
    fused = mix("emulated", (z, u, *arrays[2:]), dtype)
    separate = mix("mlx", (z, u, *arrays[2:]), dtype)
    # Computed in float32 and rounded once, the kernel is at least as close as the separate operations.
    assert rel_error(fused, exact) < tolerance
    assert rel_error(fused, exact) <= rel_error(separate, exact) * 1.1


def mixer_gradients(backend, arrays, seed=14):
    """The VJP of monarch_mixer on `backend` in every array argument, for a random cotangent."""
    z, u, weight, bias, (k_fwd, k_rev, skip), (r_fwd, r_rev, r_skip) = to_mx(arrays)
    cotangent = mx.array(np.random.default_rng(seed).standard_normal(u.shape).astype(np.float32))

    def f(*a):
        return ops.monarch_mixer(*a[:4], tuple(a[4:7]), tuple(a[7:]), backend=backend)

    return mx.vjp(f, [z, u, weight, bias, k_fwd, k_rev, skip, r_fwd, r_rev, r_skip], [cotangent])[1]


@pytest.mark.parametrize("length", [40, 4097], ids=["single-pass", "four-step"])
def test_gradients_match_the_separate_operations(length):
    arrays = mixer_inputs(np.random.default_rng(13), 2, length, 4)
    for fused, separate in zip(mixer_gradients("emulated", arrays), mixer_gradients("mlx", arrays)):
        assert rel_error(np.asarray(fused), np.asarray(separate)) < 1e-5


@pytest.mark.parametrize("length", [40, 4097], ids=["single-pass", "four-step"])
def test_a_gradient_transforms_each_filter_once(monkeypatch, length):
    arrays = mixer_inputs(np.random.default_rng(15), 2, length, 4)
    mixer_gradients("emulated", arrays)  # the kernels' self-check transforms filters of its own
    transforms = []
    packed_filter = kernels.packed_filter
    monkeypatch.setattr(kernels, "packed_filter", lambda *a: transforms.append(a[0].shape) or packed_filter(*a))
    mx.eval(mixer_gradients("emulated", arrays))
    assert transforms == [(4, length), (4, length)]


def test_spectra_give_the_same_output():
    arrays = mixer_inputs(np.random.default_rng(17), 2, 300, 6)
    z, u, weight, bias, filters, residual = to_mx(arrays)
    spectra = [ops.filter_spectrum(*f, 300, backend="emulated") for f in (filters, residual)]
    y = ops.monarch_mixer(
        z, u, weight, bias, (None, None, filters[2]), (None, None, residual[2]), spectra=spectra, backend="emulated"
    )
    assert rel_error(np.asarray(y), mixer_reference(*arrays)) < 2e-6


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda a: {**a, "z": a["z"][:, :, :-1]}, InputError, r"z \(B, L, 3C\) and u \(B, L, C\)"),
        (lambda a: {**a, "z": a["z"].astype(mx.int32)}, InputTypeError, "z must be float32"),
        (lambda a: {**a, "u": a["u"][:, :0], "z": a["z"][:, :0]}, InputError, "no time steps"),
        (lambda a: {**a, "residual_filters": a["residual_filters"][:2]}, InputError, r"residual_filters as \(k_fwd"),
        (lambda a: {**a, "spectra": [None]}, InputError, "one FilterSpectrum"),
        (lambda a: {**a, "short_weight": a["short_weight"][:, :2]}, InputError, "short conv takes weight"),
        (lambda a: {**a, "filters": (a["filters"][0][:, :5], *a["filters"][1:])}, InputError, "k_fwd must have"),
        (lambda a: {**a, "filters": (None, None, a["filters"][2])}, InputError, "^monarch_mixer filters: .*spectrum"),
    ],
)
def test_user_errors_say_what_to_fix(change, error, message):
    z, u, weight, bias, filters, residual = to_mx(mixer_inputs(np.random.default_rng(0), 1, 20, 4))
    args = dict(z=z, u=u, short_weight=weight, short_bias=bias, filters=filters, residual_filters=residual)
    with pytest.raises(error, match=message):
        ops.monarch_mixer(**change(args), backend="emulated")


@pytest.fixture
def wrong_mixer(monkeypatch):
    """The mixer kernels run and return plausible but wrong numbers (5% off); the long convolution's are right."""
    real = ops._launch_fn

    def launch_fn(backend, target):
        run = real(backend, target)

        def launch(launch_, inputs, outputs, io_dtype):
            ys = run(launch_, inputs, outputs, io_dtype)
            return [y * 1.05 for y in ys] if launch_.kernel.startswith("mixer_") else ys

        return launch

    monkeypatch.setattr(ops, "_launch_fn", launch_fn)


@pytest.mark.parametrize("failure", ["wrong_mixer", "failing_build"])
@pytest.mark.parametrize("shape", [(2, 300, 6), (1, 4097, 2)], ids=["single-pass", "four-step"])
def test_failed_mixer_check_falls_back_with_one_warning(request, fresh_checks, failure, shape):
    request.getfixturevalue(failure)
    arrays = mixer_inputs(np.random.default_rng(19), *shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = mix("emulated", arrays)
        second = mix("emulated", arrays)
    fallbacks = [w for w in caught if issubclass(w.category, ops.LongConvFallbackWarning)]
    assert len(fallbacks) == 1 and "mixer" in str(fallbacks[0].message)
    for y in (first, second):
        assert rel_error(y, mixer_reference(*arrays)) < 2e-6


def test_forced_backend_raises_instead(fresh_checks, wrong_mixer, monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, "emulated")
    with pytest.raises(ops.LongConvKernelError, match=f"{ops.BACKEND_ENV}=emulated forbids the fallback"):
        mix("emulated", mixer_inputs(np.random.default_rng(19), 2, 300, 6))


def tiny_config(length):
    fields = canonical_config(vocab_size=64, hidden_size=16, intermediate_size=32, hyena_filter_order=8)
    return M2BertConfig(
        **fields | dict(max_position_embeddings=length, long_conv_l_max=length), hidden_dropout_prob=0.0
    )


@pytest.mark.parametrize("length", [30, 1500, 4097], ids=["single-pass", "separate", "four-step"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_model_outputs_and_gradients_equal_the_separate_operations(monkeypatch, training, length):
    mx.random.seed(0)
    model = M2BertForMaskedLM(tiny_config(length))
    model.train(training)
    ids = mx.array(np.random.default_rng(23).integers(5, 64, (2, length)))
    labels = mx.where(mx.arange(length)[None] % 7 == 0, ids, -100)

    def loss(params):
        model.update(params)
        return model(ids, labels=labels).loss

    real, kernels_run = ops._launch_fn, []

    def counting(backend, target):
        run = real(backend, target)

        def launch(launch_, *args):
            kernels_run.append(launch_.kernel)
            return run(launch_, *args)

        return launch

    monkeypatch.setattr(ops, "_launch_fn", counting)
    results = {}
    for backend in ("emulated", "mlx"):
        monkeypatch.setenv(ops.BACKEND_ENV, backend)
        value, grads = mx.value_and_grad(loss)(model.trainable_parameters())
        results[backend] = (float(value), grads)
    assert results["emulated"][0] == pytest.approx(results["mlx"][0], rel=1e-5)
    # The forward ran the mixer kernels (once per layer, and the emulator runs eagerly what a GPU would skip), or at
    # L = 1500 (Metal: N = 4096) the mixer's separate operations; the backward the long convolutions' kernels.
    mixer, long_conv = {
        30: ("mixer_single_pass", "single_pass"),
        1500: (None, "single_pass"),
        4097: ("mixer_columns_forward", "columns_forward"),
    }[length]
    assert long_conv in kernels_run
    if mixer is None:
        assert not any(kernel.startswith("mixer") for kernel in kernels_run)
    else:
        assert kernels_run.count(mixer) >= 2
    fused, separate = dict(tree_flatten(results["emulated"][1])), dict(tree_flatten(results["mlx"][1]))
    assert all(float(mx.abs(grad).max()) > 0 for grad in fused.values())
    assert any("filter_fn2.implicit_filter" in name for name in fused)
    for name in fused:
        assert rel_error(np.asarray(fused[name]), np.asarray(separate[name])) < 1e-4, name
