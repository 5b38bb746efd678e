"""The long convolution at the heart of the Monarch mixer, and the mixer's fused sequence mixing.

    y[b, t, c] = sum_{s<=t} k_fwd[c, t-s] u[b, s, c] + sum_{s>t} k_rev[c, s-t-1] u[b, s, c] + skip[c] u[b, t, c]

`monarch_mixer` is the part of the mixer between in_linear and out_linear: the gated short convolution, the long
convolution of the gated value, the post-gate and the residual long convolution of the layer input, which the mixer
kernels compute in one pass over in_linear's output and the input (three passes beyond the single-pass lengths;
separate operations where the long convolution's single pass reaches further than theirs, `kernels.mixer_plan`).

Back ends: "metal" and "cuda" run the fused FFT kernel (``kernels.py``), "emulated" runs the Metal build of the
same kernel on the CPU (``emulator.py``), "mlx" is the ``mx.fft`` reference. ``None`` picks Metal on an Apple GPU,
CUDA on an NVIDIA GPU and "mlx" on the CPU; the environment variable M2BERT_LONG_CONV_BACKEND overrides that choice.

A kernel back end checks itself before its first use of each plan (kernel build) and dtype: it compiles the plan's
kernels and runs one small convolution against the ``mx.fft`` path. If a build fails or a result is wrong, that back
end computes every later convolution of the process from the same filter spectrum with ``mx.fft`` (the same
function, slower) after one `LongConvFallbackWarning` (a failure of the split kernel turns off that kernel alone);
when M2BERT_LONG_CONV_BACKEND names the back end, it raises `LongConvKernelError` instead. `check_kernels` runs
every build's check at once and reports them all.
"""

import os
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import emulator, kernels
from .errors import (
    BackendUnavailableError,
    ConfigError,
    InputError,
    InputTypeError,
    LongConvKernelError,
    did_you_mean,
    first_line,
    warn_at_caller,
)
from .short_conv import short_conv_gate

BACKENDS = ("metal", "cuda", "mlx", "emulated")
BACKEND_ENV = "M2BERT_LONG_CONV_BACKEND"
_IO_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
# The self-check's largest accepted relative error against mx.fft, by the dtype the output is rounded to: above
# what a one-unit rounding difference in every output could give (float32: above the FFTs' rounding, 2-3e-7).
_CHECK_TOLERANCE = {mx.float32: 1e-4, mx.float16: 2e-3, mx.bfloat16: 1e-2}


class LongConvFallbackWarning(RuntimeWarning):
    """A long-convolution kernel failed its self-check: its back end now computes with mx.fft."""


def resolve_backend(backend=None):
    """The back end a long_conv call with `backend` runs on (see the module docstring)."""
    if backend is None:
        backend = os.environ.get(BACKEND_ENV) or None
    if backend is None:
        if mx.metal.is_available():
            return "metal"
        if mx.cuda.is_available():
            return "cuda"
        return "mlx"
    if backend not in BACKENDS:
        hint = did_you_mean(backend, BACKENDS, end=" ")
        raise ConfigError(
            f"Unknown long_conv backend {backend!r} (from the argument or {BACKEND_ENV}); {hint}choose one of "
            f"{', '.join(BACKENDS)}."
        )
    if backend == "metal" and not mx.metal.is_available():
        raise BackendUnavailableError(
            "long_conv backend 'metal' needs an Apple GPU; use 'emulated' to run its code on the CPU."
        )
    if backend == "cuda" and not mx.cuda.is_available():
        raise BackendUnavailableError("long_conv backend 'cuda' needs MLX with its CUDA back end and an NVIDIA GPU.")
    return backend


@dataclass(frozen=True)
class FilterSpectrum:
    """The frequency-domain filters of one long convolution, for one back end and one sequence length.

    Made by `filter_spectrum`; depends on k_fwd, k_rev, skip, the length and the back end, so a cache of it must
    be dropped when any of them changes.
    """

    backend: str
    length: int
    channels: int
    values: mx.array


def _target(backend):
    return kernels.METAL if backend == "emulated" else kernels.TARGETS[backend]


def _n1(backend, length, channels):
    return kernels.plan(_target(backend), 1, length, channels).n1


def _reference_spectrum(k_fwd, k_rev, length):
    k = k_fwd if k_rev is None else mx.concatenate([k_fwd, k_rev[:, ::-1]], axis=-1)
    return mx.fft.rfft(k.astype(mx.float32), n=2 * length, axis=-1)


def filter_spectrum(k_fwd, k_rev, skip, length, *, backend=None):
    """Precomputes the filters of `long_conv` for sequences of `length`, to pass as ``long_conv(..., spectrum=)``.

    At inference the filters do not depend on the input, so a model can compute this once per (layer, length)
    and reuse it until its weights change. `long_conv` with a spectrum has the same gradients as without: they are
    computed from u and the upstream gradient, never through the precomputed values.
    """
    backend = resolve_backend(backend)
    _check_filters(k_fwd, k_rev, skip, length)
    if backend == "mlx":
        values = _reference_spectrum(k_fwd, k_rev, length)
    else:
        n1 = _n1(backend, length, k_fwd.shape[0])
        values = kernels.packed_filter(k_fwd, k_rev, skip, kernels.fft_size(length), n1)
    return FilterSpectrum(backend, length, k_fwd.shape[0], mx.stop_gradient(values))


def _check_filters(k_fwd, k_rev, skip, length):
    if k_fwd.ndim != 2 or k_fwd.shape[1] != length:
        raise InputError(f"k_fwd must have shape (C, L) = (C, {length}); got {tuple(k_fwd.shape)}.")
    channels = k_fwd.shape[0]
    if k_rev is not None and tuple(k_rev.shape) != (channels, length):
        raise InputError(f"k_rev must have the shape of k_fwd, {(channels, length)}; got {tuple(k_rev.shape)}.")
    _check_skip(skip, channels)


def _check_dtype(x, name="u"):
    if x.dtype not in _IO_DTYPES:
        raise InputTypeError(f"{name} must be float32, float16 or bfloat16; got {x.dtype}. Cast it first.")


def _check_convolution(u, k_fwd, k_rev, skip, spectrum, backend):
    """Checks the filters (or spectrum) and skip of a convolution of u (B, L, C) on `backend`."""
    _, length, channels = u.shape
    if length < 1:
        raise InputError(f"u {tuple(u.shape)} has no time steps; give at least one (L >= 1).")
    if k_fwd is None:
        if spectrum is None or k_rev is not None:
            raise InputError("long_conv needs the filters k_fwd (and k_rev); both may be None only with a spectrum.")
        _check_skip(skip, spectrum.channels)
        filter_channels = spectrum.channels
    else:
        _check_filters(k_fwd, k_rev, skip, length)
        filter_channels = k_fwd.shape[0]
    if filter_channels != channels:
        raise InputError(f"u has {channels} channels but the filters have {filter_channels}.")
    if spectrum is not None and (spectrum.backend, spectrum.length) != (backend, length):
        raise InputError(
            f"spectrum was made for backend {spectrum.backend!r} and length {spectrum.length}, but this call "
            f"runs backend {backend!r} at length {length}; make it with filter_spectrum(..., {length}, "
            f"backend={backend!r})."
        )


def _check_skip(skip, channels):
    if tuple(skip.shape) != (channels,):
        raise InputError(f"skip must have shape (C,) = ({channels},); got {tuple(skip.shape)}.")


def long_conv(u, k_fwd, k_rev, skip, *, backend=None, spectrum=None):
    """Bidirectional long convolution with a per-channel skip, channels-last.

    u: (B, L, C) float32, float16 or bfloat16 (computed in float32, returned in u's dtype); k_fwd, k_rev: (C, L)
    (k_rev=None: causal); skip: (C,). Returns (B, L, C). backend: see the module docstring. spectrum: an optional
    `filter_spectrum(k_fwd, k_rev, skip, L, backend=...)` of the same filters, which skips their FFT (inference);
    with a spectrum, k_fwd and k_rev may both be None, and then no gradient reaches the filters.
    Differentiable with respect to u, k_fwd, k_rev and skip on every back end.
    """
    if u.ndim != 3:
        raise InputError(f"u must be (batch, length, channels); got shape {tuple(u.shape)}.")
    _check_dtype(u)
    backend = resolve_backend(backend)
    _check_convolution(u, k_fwd, k_rev, skip, spectrum, backend)
    filters = tuple(k for k in (k_fwd, k_rev) if k is not None)
    if backend == "mlx":
        return _mlx_long_conv(u, skip, filters, spectrum)
    return _fused_long_conv(backend, spectrum)(u, skip, *filters)


def _fft_conv(u, k_f, skip):
    length = u.shape[1]
    u32 = u.astype(mx.float32)
    y = mx.fft.irfft(mx.fft.rfft(u32, n=2 * length, axis=1) * k_f.T, n=2 * length, axis=1)[:, :length]
    return (y + u32 * skip.astype(mx.float32)).astype(u.dtype)


def _split_filters(filters):
    """(k_fwd,) or (k_fwd, k_rev) -> (k_fwd, k_rev), k_rev None for a causal filter."""
    return filters[0], filters[1] if len(filters) == 2 else None


def _mlx_long_conv(u, skip, filters, spectrum):
    if spectrum is None:
        k_fwd, k_rev = _split_filters(filters)
        return _fft_conv(u, _reference_spectrum(k_fwd, k_rev, u.shape[1]), skip)
    if not filters:
        return _fft_conv(u, spectrum.values, skip)  # differentiable in u and skip; the spectrum is a constant

    @mx.custom_function
    def conv(u, skip, *filters):
        return _fft_conv(u, spectrum.values, skip)

    @conv.vjp
    def conv_vjp(primals, cotangent, output):
        u, skip, *filters = primals
        # As on the kernel back ends: du is the convolution with the time-reversed filter (conjugate spectrum), and
        # the filter gradients are correlations, so a precomputed spectrum gives the same gradients as none.
        du = _fft_conv(cotangent, mx.conj(spectrum.values), skip)
        return (du, *_filter_gradients(u, cotangent, skip, filters))

    return conv(u, skip, *filters)


def _launch_fn(backend, target):
    if backend == "emulated":
        return emulator.launch_fn(target.threadgroup_bytes_limit)
    return kernels.gpu_launch(backend)


def _run_kernels(backend, u, packed):
    batch, length, channels = u.shape
    plan = kernels.plan(_target(backend), batch, length, channels)
    if _kernels_pass(backend, plan, u.dtype):
        return kernels.run_plan(plan, u, packed, _launch_fn(backend, _target(backend)))
    return _packed_fft_conv(u, packed, plan.n, plan.n1)


# Self-check state of the process: the verdict per (back end, kernel builds, dtype), and what failed (_failure_scope).
_kernel_checks = {}
_failed_scopes = {}


def _failure_scope(backend, plan):
    """What a failed self-check of `plan` turns off: every build of the back end's split kernel alone where the plan
    uses it (kernels.Tile.split: groups of 512 register-heavy threads, which a GPU's compiler may refuse while the
    smaller builds run), else every kernel of the back end."""
    return (backend, "split") if any(launch.spec.split for launch in plan.launches) else backend


def _kernels_pass(backend, plan, dtype):
    """Whether `plan` runs on the kernels of `backend` for `dtype`: checks them first if that was never done."""
    scope = _failure_scope(backend, plan)
    if backend in _failed_scopes or scope in _failed_scopes:
        return False
    key = (backend, plan.builds, dtype)
    if key not in _kernel_checks:
        _kernel_checks[key] = _self_check(backend, plan, dtype)
    failure = _kernel_checks[key]
    if failure is None:
        return True
    split = scope != backend
    failed = f"{backend} long-convolution {'split kernel' if split else 'kernel'} failed its self-check"
    if os.environ.get(BACKEND_ENV) == backend:
        raise LongConvKernelError(
            f"The {failed} ({failure}); {BACKEND_ENV}={backend} forbids the fallback: unset it to run on mx.fft, and "
            "please report this to the m2bert-hf-mlx issue tracker."
        )
    if split:
        fallback = (
            "The plans that use it (the longest single pass) now run on mx.fft for the rest of this process, "
            "the mixer's separate operations at those lengths among them; the other kernels keep running."
        )
    else:
        fallback = (
            "Long convolutions now run on mx.fft for the rest of this process, which took 1.2-4.7x as long as the "
            "kernel on an NVIDIA H200 (docs/benchmarks.md of m2bert-hf-mlx)."
        )
    warn_at_caller(
        f"The {failed} ({failure}). {fallback} Please report this message with your device, OS and MLX versions, "
        "and the output of `m2bert-mlx check-kernels`, to the m2bert-hf-mlx issue tracker; set "
        f"{BACKEND_ENV}=mlx to skip the check.",
        LongConvFallbackWarning,
    )
    _failed_scopes[scope] = failure
    return False


@dataclass(frozen=True)
class KernelCheck:
    """One self-check of `check_kernels`: the plan (its kernels and FFT size), the dtype, and what failed (None)."""

    plan: kernels.Plan
    dtype: mx.Dtype
    failure: str | None


def check_kernels(backend=None, max_length=32768, dtypes=(mx.float32, mx.float16, mx.bfloat16)):
    """Runs the first-use self-check of every kernel build that long convolutions and the mixer of up to
    `max_length` tokens use on `backend` ("metal", "cuda" or "emulated"; None: the default): one small convolution
    per FFT size, kernel and dtype against mx.fft, as a first use would. Returns an iterator that yields the
    KernelCheck of each as it finishes (a CUDA build compiles for about 2.5 s); turns no kernel off and warns
    nothing, so a failing build can be reported at once (`m2bert-mlx check-kernels`). The arguments are checked at
    the call, each build as the iterator reaches it."""
    if not isinstance(max_length, int) or max_length < 1:
        raise InputError(f"check_kernels takes max_length as a positive number of tokens; got {max_length!r}.")
    dtypes = tuple(dtypes)  # iterated once per plan
    unknown = [dtype for dtype in dtypes if dtype not in _CHECK_TOLERANCE]
    if unknown:
        raise InputTypeError(
            f"check_kernels takes dtypes among mx.float32, mx.float16 and mx.bfloat16; got {unknown[0]!r}."
        )
    backend = resolve_backend(backend)
    if backend == "mlx":
        raise BackendUnavailableError(
            "There is no kernel back end to check here ('mlx' is mx.fft); use the back end 'emulated' "
            "(--backend emulated) to run the Metal build on the CPU."
        )
    target = _target(backend)
    # Each FFT size up to max_length's (N = 2L for L a power of two), at the width of the 80M models.
    lengths = sorted({1 << k for k in range(max_length.bit_length()) if 1 << k <= max_length} | {max_length})
    plans = {}
    for length in lengths:
        for plan in (kernels.plan(target, 1, length, 768), kernels.mixer_plan(target, 1, length, 768)):
            if plan is not None:
                plans.setdefault(plan.builds, plan)
    return (KernelCheck(plan, dtype, _self_check(backend, plan, dtype)) for plan in plans.values() for dtype in dtypes)


def _self_check(backend, plan, dtype):
    """None if the kernels of `plan` build and match mx.fft on one small convolution, else what went wrong."""
    target = _target(backend)
    # As few channels as give the same builds: one threadgroup's worth (a mixer pair holds one channel).
    log_p = dict(plan.launches[0].constants)["LOG_P"]
    channels = min(plan.channels, (1 if plan.mixer else 2) << log_p)
    small = kernels.plan(target, 1, plan.length, channels, plan.mixer)
    if small.builds != plan.builds:
        channels = plan.channels
        small = kernels.plan(target, 1, plan.length, channels, plan.mixer)
    rng = np.random.default_rng(0)

    def normal(*shape, scale=1.0):
        return mx.array(rng.standard_normal(shape).astype(np.float32) * scale)

    def conv_filters():
        scale = plan.length**-0.5
        return normal(channels, plan.length, scale=scale), normal(channels, plan.length, scale=scale), normal(channels)

    filters = [conv_filters()]
    u = normal(1, plan.length, channels).astype(dtype)
    if plan.mixer:
        filters.append(conv_filters())
        z = normal(1, plan.length, 3 * channels).astype(dtype)
        weight, bias = normal(3 * channels, 3, 1), normal(3 * channels)
        (k_fwd, k_rev, skip), (residual_fwd, residual_rev, residual_skip) = filters
        mix = _mixer_reference("mlx", (None, None), 3, 3)
        expected = mix(z, u, weight, bias, skip, k_fwd, k_rev, residual_skip, residual_fwd, residual_rev)
    else:
        expected = _mlx_long_conv(u, filters[0][2], filters[0][:2], None)
    expected = expected.astype(mx.float32)
    what = f"L={plan.length}, {str(dtype).split('.')[-1]}{', mixer' if plan.mixer else ''}"
    try:
        packed = [kernels.packed_filter(k_fwd, k_rev, skip, small.n, small.n1) for k_fwd, k_rev, skip in filters]
        launch = _launch_fn(backend, target)
        if plan.mixer:
            taps = kernels.short_conv_taps(weight, bias)
            y = kernels.run_plan(small, u, packed[0], launch, (z, taps, packed[1]))
        else:
            y = kernels.run_plan(small, u, packed[0], launch)
        error = float(mx.linalg.norm(y.astype(mx.float32) - expected) / mx.linalg.norm(expected))
    except Exception as e:  # noqa: BLE001 -- any failure to build or run fails the check; the message says which
        return f"{what}: {first_line(e)}"
    if not error <= _CHECK_TOLERANCE[dtype]:
        return f"{what}: relative error {error:.2g} against mx.fft"
    return None


def _packed_fft_conv(u, packed, n, n1):
    """The convolution of a kernel plan computed with mx.fft from the kernels' packed filter (see
    kernels.packed_filter): the same function as the kernels, for a back end that failed its self-check."""
    _, length, channels = u.shape
    bins = np.arange(n // 2 + 1)
    index = mx.array(((bins % n1) * packed.shape[2] + bins // n1).astype(np.int32))
    gf = mx.take(packed.reshape(packed.shape[0], -1, 4), index, axis=1)
    g = gf[..., 0] + 1j * gf[..., 1]
    f = gf[..., 2] + 1j * gf[..., 3]
    # G = (H_c + H_d) / 2n and F = (H_c - H_d) / 2n for the channel pair (c, d).
    spectrum = (n * mx.stack([g + f, g - f], axis=1)).reshape(-1, n // 2 + 1)[:channels]
    y = mx.fft.irfft(mx.fft.rfft(u.astype(mx.float32), n=n, axis=1) * spectrum.T, n=n, axis=1)[:, :length]
    return y.astype(u.dtype)


def _filter_gradients(u, g, skip, filters):
    """d/dskip and d/d each filter: correlations of the cotangent g with u, summed over the batch."""
    dskip = mx.sum(g.astype(mx.float32) * u.astype(mx.float32), axis=(0, 1)).astype(skip.dtype)
    if not filters:
        return (dskip,)
    length = u.shape[1]
    n = kernels.fft_size(length)
    g_f = mx.fft.rfft(g.astype(mx.float32), n=n, axis=1)
    cross = mx.sum(g_f * mx.conj(mx.fft.rfft(u.astype(mx.float32), n=n, axis=1)), axis=0)
    corr = mx.fft.irfft(cross, n=n, axis=0).T  # corr[c, j] = sum_{b, t} g[b, t, c] u[b, t - j, c] (j mod n)
    grads = [corr[:, :length]]
    if len(filters) == 2:
        grads.append(mx.concatenate([corr[:, n - length + 1 :][:, ::-1], mx.zeros((corr.shape[0], 1))], axis=1))
    return (dskip, *(d.astype(k.dtype) for d, k in zip(grads, filters)))


def _fused_long_conv(backend, spectrum):
    """long_conv on a kernel back end as a custom function of (u, skip, *filters) with its own VJP."""

    def packed_filter(skip, filters, length):
        if spectrum is not None:
            return spectrum.values
        k_fwd, k_rev = _split_filters(filters)
        return filter_spectrum(k_fwd, k_rev, skip, length, backend=backend).values

    @mx.custom_function
    def conv(u, skip, *filters):
        return _run_kernels(backend, u, packed_filter(skip, filters, u.shape[1]))

    @conv.vjp
    def conv_vjp(primals, cotangent, output):
        u, skip, *filters = primals
        # The gradient of a convolution is the convolution with the time-reversed filter: conj of the spectrum.
        reversed_filter = kernels.conjugate_filter(packed_filter(skip, filters, u.shape[1]))
        du = _run_kernels(backend, cotangent, reversed_filter)
        return (du, *_filter_gradients(u, cotangent, skip, filters))

    return conv


def mixer_plan(backend, batch, length, channels):
    """The kernel plan of `monarch_mixer` on `backend` (see kernels.mixer_plan), or None where it runs as separate
    operations: on "mlx", and where the mixer's FFT split differs from the long convolution's."""
    backend = resolve_backend(backend)
    return None if backend == "mlx" else kernels.mixer_plan(_target(backend), batch, length, channels)


def _mixer_reference(backend, spectra, count, residual_count):
    """monarch_mixer as separate operations: a function of (z, u, weight, bias, *arrays), `arrays` holding each
    convolution's (skip, *filters), `count` of them for the first and `residual_count` for the residual one (0:
    none)."""

    def conv(x, arrays, spectrum):
        return long_conv(x, *_filters_of(arrays), backend=backend, spectrum=spectrum)

    def mix(z, u, weight, bias, *arrays):
        gated, x2 = short_conv_gate(z, weight, bias)
        y = conv(gated, arrays[:count], spectra[0]) * x2
        if residual_count:
            y = y + conv(u, arrays[count:], spectra[1])
        # As MLX promotes them: any two different float dtypes of these three give float32.
        return y.astype(u.dtype if z.dtype == u.dtype else mx.float32)

    return mix


def _conv_arrays(filters, name):
    """The (skip, *filters) arrays of one convolution's (k_fwd, k_rev, skip)."""
    if not isinstance(filters, (tuple, list)) or len(filters) != 3:
        raise InputError(f"monarch_mixer takes {name} as (k_fwd, k_rev, skip); got {type(filters).__name__}.")
    return (filters[2], *(k for k in filters[:2] if k is not None))


def _filters_of(arrays):
    """(k_fwd, k_rev, skip) back from `_conv_arrays`' (skip, *filters), the missing filters None."""
    skip, *ks = arrays
    return (*(tuple(ks) + (None, None))[:2], skip)


def monarch_mixer(z, u, short_weight, short_bias, filters, residual_filters=None, *, spectra=None, backend=None):
    """The Monarch mixer between its in_linear and out_linear (m2bert-architecture.md 2.4):

        x1, x2, v = causal_short_conv(z);  y = long_conv(v * x1, *filters) * x2 + long_conv(u, *residual_filters)

    z: in_linear's output (B, L, 3C); u: the layer input (B, L, C) (float32, float16 or bfloat16, computed in
    float32 on the kernels; the result has their promoted dtype); short_weight (3C, 3, 1) and short_bias (3C,): the
    depthwise Conv1d(k=3); filters, residual_filters: (k_fwd, k_rev, skip) as `long_conv` takes them (k_rev None:
    causal; both None with `spectra`); residual_filters None: no residual convolution; spectra: None or one
    `filter_spectrum` (or None) per convolution. Returns (B, L, C).

    Where `mixer_plan` gives a plan (and z and u share a dtype), the mixer kernels run it, checked and falling back
    like long_conv's kernels; elsewhere it runs as separate operations. Differentiable in every array argument on
    every back end, as long_conv is (with a spectrum and no filters, no gradient reaches the filters): the VJP is that
    of the separate operations (whose long convolutions run their kernels), recomputing v * x1 and its convolution
    instead of keeping them.
    """
    if z.ndim != 3 or u.ndim != 3 or tuple(z.shape) != (*u.shape[:2], 3 * u.shape[2]):
        raise InputError(
            f"monarch_mixer takes z (B, L, 3C) and u (B, L, C); got {tuple(z.shape)} and {tuple(u.shape)}."
        )
    _check_dtype(z, "z")
    _check_dtype(u)
    if tuple(short_weight.shape) != (z.shape[2], 3, 1) or tuple(short_bias.shape) != (z.shape[2],):
        raise InputError(
            f"The short conv takes weight (3C, 3, 1) = {(z.shape[2], 3, 1)} and bias (3C,); got "
            f"{tuple(short_weight.shape)} and {tuple(short_bias.shape)}."
        )
    backend = resolve_backend(backend)
    convs = [("filters", filters)] + ([] if residual_filters is None else [("residual_filters", residual_filters)])
    spectra = (None,) * len(convs) if spectra is None else tuple(spectra)
    if len(spectra) != len(convs) or not all(s is None or isinstance(s, FilterSpectrum) for s in spectra):
        raise InputError(
            f"monarch_mixer takes spectra as one FilterSpectrum (or None) per convolution, {len(convs)} here."
        )
    arrays = []
    for (name, conv_filters), spectrum in zip(convs, spectra):
        conv_arrays = _conv_arrays(conv_filters, name)
        try:
            _check_convolution(u, *_filters_of(conv_arrays), spectrum, backend)
        except InputError as e:
            raise type(e)(f"monarch_mixer {name}: {e}") from None
        arrays.append(conv_arrays)
    batch, length, channels = u.shape
    if backend != "mlx":
        # Transform each convolution's filters once, for the forward pass and its VJP alike: the separate operations
        # of the VJP would otherwise transform them twice more (their forward pass, then their own VJP). The filter
        # gradients never pass through the spectrum (long_conv's VJP correlates instead). On "mlx", autodiff
        # through the FFTs keeps what they computed; there, there is nothing to save.
        spectra = tuple(
            filter_spectrum(*_filters_of(conv_arrays), length, backend=backend) if spectrum is None else spectrum
            for spectrum, conv_arrays in zip(spectra, arrays)
        )
    counts = [len(conv_arrays) for conv_arrays in arrays] + [0]
    mix = _mixer_reference(backend, spectra + (None,), counts[0], counts[1])
    inputs = (z, u, short_weight, short_bias, *(a for conv_arrays in arrays for a in conv_arrays))
    plan = mixer_plan(backend, batch, length, channels) if len(arrays) == 2 and z.dtype == u.dtype else None
    if plan is None:
        return mix(*inputs)

    @mx.custom_function
    def fused(z, u, weight, bias, *conv_arrays):
        if not _kernels_pass(backend, plan, u.dtype):
            return mix(z, u, weight, bias, *conv_arrays)
        taps = kernels.short_conv_taps(weight, bias)
        launch = _launch_fn(backend, _target(backend))
        return kernels.run_plan(plan, u, spectra[0].values, launch, (z, taps, spectra[1].values))

    @fused.vjp
    def fused_vjp(primals, cotangent, output):
        return mx.vjp(mix, list(primals), [cotangent])[1]

    return fused(*inputs)
