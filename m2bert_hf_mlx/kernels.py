"""The fused FFT long-convolution kernels: one body source, instantiated for Metal, CUDA and the CPU emulator.

The kernel sources live in ``m2bert_hf_mlx.metal``: ``long_conv.h`` (device functions in the common dialect of
Metal, CUDA C++ and C++20), one ``*.inc`` file per kernel body, and one prelude per target. This module plans the
launches of a convolution, or of the Monarch mixer's pair of them (the ``mixer_*`` bodies), for a target (tile
sizes, pass structure) and runs them through ``mx.fast.metal_kernel`` / ``mx.fast.cuda_kernel``; ``emulator.py``
runs the same plan on the CPU.

A convolution of length L is an FFT convolution of size N = next power of two >= 2L - 1. Two channels c, c+1
share one complex FFT (a "pair"). When P pairs of N points fit one threadgroup, a single kernel does everything;
beyond that, the four-step decomposition N = N1 * N2 splits it into three passes through device memory.
"""

import hashlib
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources

import mlx.core as mx
import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class KernelSpec:
    """One kernel body: its buffers ((name, kind), kind "io" for u's dtype, "f32" or "i32") and template constants."""

    name: str
    inputs: tuple
    outputs: tuple
    constants: tuple

    @property
    def body(self):
        return _read_source(f"long_conv_{self.name}.inc")

    @property
    def uses_io_dtype(self):
        return any(kind == "io" for _, kind in self.inputs + self.outputs)

    @property
    def split(self):
        """Whether the body keeps its values in registers (a split tile's kernel, see Tile)."""
        return self.name.endswith("_split")


_SINGLE_PASS_CONSTANTS = ("LOG_RADIX", "LOG_N", "LOG_P", "PAD", "SMEM")
_COLUMN_CONSTANTS = ("LOG_RADIX", "LOG_N1", "LOG_N2", "LOG_P", "LOG_Q", "PAD", "SMEM")
# The Monarch mixer's inputs: in_linear's output z (B, L, 3C), the layer input u (B, L, C), and the short conv's
# (w0, w1, w2, b) per channel of z.
_MIXER_INPUTS = (("z", "io"), ("u", "io"), ("dims", "i32"), ("short_conv", "f32"))

KERNELS = {
    spec.name: spec
    for spec in (
        KernelSpec(
            "single_pass",
            (("u", "io"), ("dims", "i32"), ("spectrum", "f32"), ("tw", "f32")),
            (("y", "io"),),
            _SINGLE_PASS_CONSTANTS,
        ),
        KernelSpec(
            "single_pass_split",
            (("u", "io"), ("dims", "i32"), ("spectrum", "f32"), ("tw", "f32")),
            (("y", "io"),),
            _SINGLE_PASS_CONSTANTS,
        ),
        KernelSpec(
            "columns_forward",
            (("u", "io"), ("dims", "i32"), ("tw", "f32")),
            (("scratch", "f32"),),
            _COLUMN_CONSTANTS + ("TW_N",),
        ),
        KernelSpec(
            "rows",
            (("scratch", "f32"), ("dims", "i32"), ("spectrum", "f32"), ("residual_spectrum", "f32"), ("tw", "f32")),
            (("out", "f32"),),
            ("LOG_RADIX", "LOG_N1", "LOG_N2", "LOG_RP", "TW_N", "MIXER", "PAD", "SMEM"),
        ),
        KernelSpec(
            "columns_inverse", (("scratch", "f32"), ("dims", "i32"), ("tw", "f32")), (("y", "io"),), _COLUMN_CONSTANTS
        ),
        KernelSpec(
            "mixer_single_pass",
            _MIXER_INPUTS + (("spectrum", "f32"), ("residual_spectrum", "f32"), ("tw", "f32")),
            (("y", "io"),),
            _SINGLE_PASS_CONSTANTS,
        ),
        KernelSpec(
            "mixer_columns_forward",
            _MIXER_INPUTS + (("tw", "f32"),),
            (("scratch", "f32"),),
            _COLUMN_CONSTANTS + ("TW_N",),
        ),
        KernelSpec(
            "mixer_columns_inverse",
            (("scratch", "f32"), ("z", "io"), ("dims", "i32"), ("short_conv", "f32"), ("tw", "f32")),
            (("y", "io"),),
            _COLUMN_CONSTANTS,
        ),
    )
}


@cache
def _read_source(filename):
    return resources.files("m2bert_hf_mlx.metal").joinpath(filename).read_text()


def header(target, threads=None, split=False):
    """The header a kernel of `target` ("metal", "cuda" or "cpu") is compiled with: prelude + long_conv.h, and for
    CUDA the launch bound of a build launched with blocks of `threads` (of a split kernel if `split`)."""
    text = _read_source(f"prelude_{target}.h") + "\n" + _read_source("long_conv.h")
    return text + launch_bound(threads, split) if target == "cuda" else text


def launch_bound(threads, split=False):
    """The CUDA prelude's launch bound (prelude_cuda.h) for the kernels that follow it, launched in blocks of
    `threads`: blocks of 1024 threads carry one (there it caps a thread at 64 registers), and split kernels, which
    keep every value in registers: unbounded, nvcc may give them more than a block of 512 can hold, and the bounded
    build is the one tests/test_long_conv_sources.py checks. Bounding the other blocks changed the code of the
    four-step passes and cost them about 25 % on the H200 (L = 32768)."""
    bound = f"__launch_bounds__({threads})" if threads == 1024 or (split and threads) else ""
    return f"\n#undef M2_LAUNCH_BOUND\n#define M2_LAUNCH_BOUND {bound}\n"


def _is_pow2(x):
    return x > 0 and x & (x - 1) == 0


@dataclass(frozen=True)
class Tile:
    """One tier of a target's plans: FFTs of up to `max_n` points, `values` complex values per threadgroup, `elems`
    per thread (threads = values / elems, all powers of two) and FFT stages of radix 2^log_radix (3 or 4), which
    may not exceed elems.

    split (the long convolution's single passes only): the values stay in registers and pass between threads
    through threadgroup memory one part at a time, real then imaginary (long_conv.h), so a threadgroup needs half the
    memory: the `single_pass_split` kernel, at twice the barriers per exchange, for FFTs of at least 2^log_radix
    points."""

    max_n: int
    values: int
    elems: int
    log_radix: int
    split: bool = False

    def __post_init__(self):
        if self.log_radix not in (3, 4) or self.elems < 1 << self.log_radix or not _is_pow2(self.elems):
            raise ValueError(f"radix 2^{self.log_radix} with {self.elems} values per thread has no kernel")
        if not (_is_pow2(self.values) and self.values >= self.elems and _is_pow2(self.max_n)):
            raise ValueError(f"a tile takes powers of two, {self.values} values of at least {self.elems} per thread")

    def buffer_slots(self, values, log_row, pad):
        """float2 slots of the threadgroup buffer of `values` in rows of 2^log_row (one float per value if split)."""
        slots = _smem(values, log_row, pad)
        return -(-slots // 2) if self.split else slots


@dataclass(frozen=True)
class Target:
    """Tile tiers of a GPU family, for the single pass, the mixer's single pass (two rows per channel pair) and the
    four-step passes: the first tier whose max_n is at least the FFT size N wins. pad: pad the threadgroup layout
    against bank conflicts (one more value per 16 and per row).
    """

    name: str
    single_pass: tuple
    mixer_single_pass: tuple
    four_step: tuple
    pad: bool

    def __post_init__(self):
        if any(tile.split for tile in self.four_step):
            raise ValueError("split tiles are single passes: the four-step kernels keep their values in memory")
        if any(tile.split for tile in self.mixer_single_pass):
            raise ValueError("split tiles serve the long convolution alone: the mixer has no split kernel")

    @property
    def tiles(self):
        return self.single_pass + self.mixer_single_pass + self.four_step

    @property
    def threadgroup_bytes_limit(self):
        """The most threadgroup memory a plan of this target may use (rows of 2 values at the worst)."""
        return 8 * max(tile.buffer_slots(tile.values, 1, self.pad) for tile in self.tiles)


_ANY_N = 1 << 62
# Metal: 32 KB of threadgroup memory holds 4096 complex fp32 values, without room for padding, and 8192 values of a
# split tile: one row of N = 8192 (L <= 4096) in one pass instead of the four-step passes' three through device
# memory (built for CUDA, 1.1 times as fast on the H200 as the four-step passes of this target's tile, within the
# noise of that sweep). The mixer's two rows fit up to N = 2048; beyond, it runs as separate operations: a split
# mixer kernel at N = 4096 took 1.3 times as long as them on the H200 (docs/benchmarks.md). Untimed on Apple GPUs;
# the first-use self-check guards the builds.
METAL = Target(
    "metal",
    single_pass=(Tile(4096, 4096, 16, 4), Tile(8192, 8192, 16, 4, split=True)),
    mixer_single_pass=(Tile(2048, 4096, 16, 4),),
    four_step=(Tile(_ANY_N, 4096, 16, 4),),
    pad=False,
)
# CUDA (H200; benchmarks/long_conv.py --sweep and benchmarks/mixer.py --sweep time the alternatives): blocks small
# enough that several share a multiprocessor, so that one block's memory phase overlaps another's FFT: 2048 values
# (256 threads of 8, radix 8) up to N = 1024, 4096 values (256 threads of 16, radix 16) up to N = 4096. Beyond, one
# block of 16384 values (1024 threads of 16, radix 8; 136 KiB of shared memory) still does the whole convolution up
# to N = 16384 (L = 8192), 1.7 times as fast as the four-step passes there. Those take 8192 values (512 threads of
# 16) in radix-16 stages. The mixer's single pass holds two rows per channel pair and reads three taps of z per value:
# its fastest tiles are larger, 4096 or 8192 values by N, and at N = 8192 it takes the one tile that holds two rows;
# two rows of N = 16384 do not fit, so at 4096 < L <= 8192 the mixer runs as separate operations on the long
# convolution's single pass. A block's threads must fit the register file as compiled (tests/test_long_conv_sources.py
# checks it): 1024-thread builds carry a launch bound for that.
CUDA = Target(
    "cuda",
    single_pass=(
        Tile(1024, 2048, 8, 3),
        Tile(4096, 4096, 16, 4),
        Tile(16384, 16384, 16, 3),
    ),
    mixer_single_pass=(
        Tile(256, 4096, 16, 4),
        Tile(512, 8192, 16, 3),
        Tile(1024, 4096, 16, 4),
        Tile(4096, 8192, 16, 4),
        Tile(8192, 16384, 16, 3),
    ),
    four_step=(Tile(_ANY_N, 8192, 16, 4),),
    pad=True,
)
TARGETS = {"metal": METAL, "cuda": CUDA}


@dataclass(frozen=True)
class Launch:
    kernel: str
    groups: tuple
    threads: int
    elems: int
    constants: tuple

    @property
    def spec(self):
        return KERNELS[self.kernel]

    @property
    def smem_values(self):
        return dict(self.constants)["SMEM"]

    def template(self, dtype):
        io = [("T", dtype)] if self.spec.uses_io_dtype else []
        return io + [("ELEMS", self.elems)] + list(self.constants)


@dataclass(frozen=True)
class Plan:
    """How one (B, L, C) convolution runs on a target: FFT size n = n1 * n2 (n1 = 1: single pass) and launches.
    A mixer plan runs the Monarch mixer's two convolutions of C channels as 2C channels (long_conv.h)."""

    batch: int
    length: int
    channels: int
    n: int
    n1: int
    launches: tuple
    mixer: bool = False

    @property
    def pairs(self):
        """The FFT rows of one batch row: channel pairs, twice as many in a mixer plan."""
        return _fft_rows(self.channels, self.mixer)

    @property
    def n2(self):
        return self.n // self.n1

    @property
    def builds(self):
        """What the kernels of this plan are compiled and launched with, apart from the grid: plans with the same
        builds run the same code."""
        return tuple((launch.kernel, launch.threads, launch.elems, launch.constants) for launch in self.launches)

    @property
    def max_log_n(self):
        """log2 of the longest FFT a threadgroup does."""
        return _log2(max(self.n1, self.n2))


def fft_size(length):
    """The FFT size of a length-L bidirectional convolution: no lag in (-L, L) wraps around."""
    return max(2, 1 << (2 * length - 2).bit_length())


def _log2(x):
    return x.bit_length() - 1


def _pow2_at_least(x):
    return 1 << (x - 1).bit_length()


def _threads(values, elems):
    return max(1, -(-values // elems))


def _smem(values, log_row, pad):
    """float2 slots of a threadgroup buffer of `values` in rows of 2^log_row (see m2_slot in long_conv.h)."""
    return values + ((values >> 4) + (values >> log_row) if pad else 0)


def _fft_rows(channels, mixer):
    """FFT rows per batch row: channel pairs, twice as many for the mixer (long_conv.h's mixer rows)."""
    return (channels + 1) // 2 * (2 if mixer else 1)


def mixer_plan(target, batch, length, channels):
    """The mixer's plan on `target`, or None where its FFT split differs from the long convolution's, so that one
    filter spectrum could not serve both: where one threadgroup holds a single pass of one row but not the mixer's
    two, N = 4096 and 8192 on Metal (1024 < L <= 4096, 32 KB) and N = 16384 on CUDA (4096 < L <= 8192)."""
    mixer = plan(target, batch, length, channels, mixer=True)
    return mixer if mixer.n1 == plan(target, batch, length, channels).n1 else None


@lru_cache(maxsize=256)
def plan(target, batch, length, channels, mixer=False):
    """The launches of a (B, L, C) long convolution on `target`, or with `mixer` of the Monarch mixer's pair of them
    (the mixer kernels, whose threadgroups hold at least the two rows of one channel pair)."""
    n = fft_size(length)
    prefix = "mixer_" if mixer else ""
    pairs = _fft_rows(channels, mixer)
    min_pairs = 2 if mixer else 1
    pad = int(target.pad)
    for tile in target.mixer_single_pass if mixer else target.single_pass:
        if n <= tile.max_n:
            p = min(tile.values // n, _pow2_at_least(pairs))
            values = p * n
            launch = Launch(
                prefix + "single_pass" + ("_split" if tile.split else ""),
                (-(-pairs // p), batch, 1),
                _threads(values, tile.elems),
                tile.elems,
                (
                    ("LOG_RADIX", tile.log_radix),
                    ("LOG_N", _log2(n)),
                    ("LOG_P", _log2(p)),
                    ("PAD", pad),
                    ("SMEM", tile.buffer_slots(values, _log2(n), pad)),
                ),
            )
            assert p >= min_pairs, (target.name, tile)
            # A split kernel's threads hold every value of their group, `elems` each, from its first radix stage on.
            assert not tile.split or (launch.threads * tile.elems == values and n >> tile.log_radix), (tile, n)
            return Plan(batch, length, channels, n, 1, (launch,), mixer)

    tile = next(tile for tile in target.four_step if n <= tile.max_n)
    capacity, elems = tile.values, tile.elems
    log_n1 = _log2(n) // 2
    n1, n2 = 1 << log_n1, n >> log_n1
    if 2 * n2 > capacity:
        raise InputError(
            f"long_conv supports lengths up to {capacity * capacity // 8} on {target.name}; got L={length}. "
            "Split the sequence or use backend='mlx'."
        )
    radix = ("LOG_RADIX", tile.log_radix)
    # Columns: up to 4 pairs (32 bytes of fp32 channels per time step) and as many adjacent columns as fit.
    p = min(_pow2_at_least(pairs), 4, capacity // n1)
    assert p >= min_pairs, (target.name, tile)
    q = min(n2, capacity // (n1 * p))
    column_values = p * q * n1
    column_constants = (
        radix,
        ("LOG_N1", log_n1),
        ("LOG_N2", _log2(n2)),
        ("LOG_P", _log2(p)),
        ("LOG_Q", _log2(q)),
        ("PAD", pad),
        ("SMEM", _smem(column_values, log_n1, pad)),
    )
    column_groups = (-(-pairs // p), n2 // q, batch)
    rp = min(n1 // 2, capacity // (2 * n2))
    row_values = 2 * rp * n2
    tw_n = ("TW_N", stage_twiddle_size(max(log_n1, _log2(n2)), tile.log_radix))
    column_threads = _threads(column_values, elems)
    launches = (
        Launch(prefix + "columns_forward", column_groups, column_threads, elems, column_constants + (tw_n,)),
        Launch(
            "rows",
            ((n1 // 2) // rp, pairs, batch),
            _threads(row_values, elems),
            elems,
            (
                radix,
                ("LOG_N1", log_n1),
                ("LOG_N2", _log2(n2)),
                ("LOG_RP", _log2(rp)),
                tw_n,
                ("MIXER", int(mixer)),
                ("PAD", pad),
                ("SMEM", _smem(row_values, _log2(n2), pad)),
            ),
        ),
        Launch(prefix + "columns_inverse", column_groups, column_threads, elems, column_constants),
    )
    return Plan(batch, length, channels, n, n1, launches, mixer)


def stage_twiddle_size(max_log_n, log_b):
    """Entries of the stage-twiddle blocks (long_conv.h) that FFTs of up to 2^max_log_n points of radix 2^log_b
    read: one block per radix stage, each after ns = (2^log_b)^i, the last of them also serving a smaller radix."""
    b = 1 << log_b
    blocks = -(-max_log_n // log_b)
    return b * (b**blocks - 1) // (b - 1)


def _twiddle_table(max_log_n, log_b, n):
    parts = []
    b = 1 << log_b
    for i in range(-(-max_log_n // log_b)):
        ns = b**i
        parts.append(np.exp(-2j * np.pi * np.outer(np.arange(b), np.arange(ns)) / (b * ns)).reshape(-1))
    if n is not None:
        parts.append(np.exp(-2j * np.pi * np.arange(n) / n))
    w = np.concatenate(parts)
    return np.stack([w.real, w.imag], axis=-1).astype(np.float32)


_twiddle_arrays = {}
_dims_arrays = {}


def _dims(length, channels):
    """The kernels' run-time sizes, kept on the device across calls."""
    if (length, channels) not in _dims_arrays:
        _dims_arrays[length, channels] = mx.array([length, channels], dtype=mx.int32)
    return _dims_arrays[length, channels]


def twiddles(plan_):
    """The twiddle table of a plan as (entries, 2) float32: stage blocks, then (four-step) exp(-2 pi i j / N)."""
    key = (plan_.max_log_n, dict(plan_.launches[0].constants)["LOG_RADIX"], None if plan_.n1 == 1 else plan_.n)
    if key not in _twiddle_arrays:
        _twiddle_arrays[key] = mx.array(_twiddle_table(*key))
    return _twiddle_arrays[key]


@cache
def _four_step_bins(n, n1):
    """Bin k = k1 + n1 k2 for k1 < n1, k2 <= n2 / 2, as (index into the half spectrum, whether to conjugate)."""
    n2 = n // n1
    k = np.arange(n1)[:, None] + n1 * np.arange(n2 // 2 + 1)[None, :]
    mirrored = k > n // 2
    return mx.array(np.where(mirrored, n - k, k).reshape(-1).astype(np.int32)), mx.array(mirrored.reshape(-1))


def packed_filter(k_fwd, k_rev, skip, n, n1):
    """The kernels' filter: per channel pair, (G, F) = (H_c + H_d, H_c - H_d) / 2n at the bins a threadgroup meets.

    H is the length-n spectrum of h = [k_fwd (+ skip at lag 0), 0..., flip(k_rev[:L-1])]: the skip term is
    a lag-0 tap of the same convolution. Returns float32 (pairs, n1, n2/2 + 1, 4) = (G.re, G.im, F.re, F.im).
    """
    channels, length = k_fwd.shape
    k_fwd = k_fwd.astype(mx.float32)
    taps = [k_fwd[:, :1] + skip.astype(mx.float32)[:, None], k_fwd[:, 1:], mx.zeros((channels, n - 2 * length + 1))]
    if k_rev is not None:
        taps.append(k_rev.astype(mx.float32)[:, : length - 1][:, ::-1])
    h = mx.concatenate(taps, axis=1)
    if channels % 2:
        h = mx.concatenate([h, mx.zeros((1, h.shape[1]))], axis=0)
    index, mirrored = _four_step_bins(n, n1)
    return _pack_pairs(mx.fft.rfft(h, n=n, axis=1), index, mirrored).reshape(h.shape[0] // 2, n1, -1, 4)


@mx.compile
def _pack_pairs(spectrum, index, mirrored):
    """(G, F) of each channel pair at the bins `index` (conjugated where `mirrored`), as (pairs, bins, 4) float32.
    Compiled: one pass instead of a (channels, n) temporary per step, which at n = 65536 is 400 MB each."""
    n = 2 * (spectrum.shape[1] - 1)
    spectrum = mx.take(spectrum, index, axis=1) / (2 * n)
    g = spectrum[0::2] + spectrum[1::2]
    f = spectrum[0::2] - spectrum[1::2]
    g, f = mx.where(mirrored, mx.conj(g), g), mx.where(mirrored, mx.conj(f), f)
    return mx.stack([mx.real(g), mx.imag(g), mx.real(f), mx.imag(f)], axis=-1)


def conjugate_filter(packed):
    """The packed filter of the time-reversed convolution (the gradient with respect to u): conj(G), conj(F)."""
    return packed * mx.array([1.0, -1.0, 1.0, -1.0])


_gpu_kernels = {}


def _gpu_kernel(backend, spec, smem_bytes, threads):
    key = (backend, spec.name, smem_bytes, threads)
    if key not in _gpu_kernels:
        text = header(backend, threads, spec.split)
        # MLX caches a build by its name and template arguments, in some versions on disk: a hash of the source in
        # the name keeps a changed header (the launch bound among them) or body from ever running an older build.
        digest = hashlib.sha256((text + spec.body).encode()).hexdigest()[:12]
        names = dict(
            name=f"m2_long_conv_{spec.name}_{digest}",
            input_names=[name for name, _ in spec.inputs],
            output_names=[name for name, _ in spec.outputs],
            source=spec.body,
            header=text,
            ensure_row_contiguous=False,
        )
        if backend == "metal":
            _gpu_kernels[key] = mx.fast.metal_kernel(**names)
        else:
            _gpu_kernels[key] = mx.fast.cuda_kernel(**names, shared_memory=smem_bytes)
    return _gpu_kernels[key]


def metal_kernel(spec):
    """The Metal instantiation of a kernel body (constructible without a Mac; only calling it needs Metal)."""
    return _gpu_kernel("metal", spec, 0, None)


def run_plan(plan_, u, packed, launch_fn, mixer_inputs=None):
    """Runs the launches of `plan_` for u (B, L, C) and a packed filter; for a mixer plan, `mixer_inputs` is
    (z, short_conv, residual_packed): in_linear's output (B, L, 3C), `short_conv_taps` of the short conv and the
    packed filter of the residual convolution of u (`packed` is then the gated value's).

    launch_fn(launch, inputs, outputs, io_dtype) runs one launch (outputs as (shape, dtype) pairs, io_dtype the
    dtype of u and y) and returns its output arrays.
    """
    assert (mixer_inputs is not None) == plan_.mixer, "a mixer plan runs with mixer_inputs, and only it"
    tw = twiddles(plan_)
    dims = _dims(plan_.length, plan_.channels)
    if mixer_inputs is None:
        z, short_conv, residual = [], [], packed
    else:
        z, short_conv, residual = [mixer_inputs[0]], [mixer_inputs[1]], mixer_inputs[2]
    y_out = ((plan_.batch, plan_.length, plan_.channels), u.dtype)
    if plan_.n1 == 1:
        (launch,) = plan_.launches
        filters = [packed] + ([residual] if plan_.mixer else [])
        return launch_fn(launch, z + [u, dims] + short_conv + filters + [tw], [y_out], u.dtype)[0]
    forward, rows, inverse = plan_.launches
    scratch_out = ((plan_.batch, plan_.pairs, plan_.n, 2), mx.float32)
    scratch = launch_fn(forward, z + [u, dims] + short_conv + [tw], [scratch_out], u.dtype)[0]
    # The rows pass sees FFT rows only: as many channels as two per row.
    row_dims = _dims(plan_.length, 2 * plan_.pairs)
    scratch = launch_fn(rows, [scratch, row_dims, packed, residual, tw], [scratch_out], u.dtype)[0]
    return launch_fn(inverse, [scratch] + z + [dims] + short_conv + [tw], [y_out], u.dtype)[0]


def short_conv_taps(weight, bias):
    """The mixer kernels' short conv: (w0, w1, w2, b) per channel as (3C, 4) float32, from the Conv1d weight
    (3C, 3, 1) and bias (3C,)."""
    return mx.concatenate([weight[:, :, 0], bias[:, None]], axis=1).astype(mx.float32)


def gpu_launch(backend):
    """launch_fn for run_plan on a GPU back end ("metal" or "cuda")."""

    def launch_fn(launch, inputs, outputs, io_dtype):
        smem_bytes = 8 * launch.smem_values if backend == "cuda" else 0
        kernel = _gpu_kernel(backend, launch.spec, smem_bytes, launch.threads if backend == "cuda" else None)
        gx, gy, gz = launch.groups
        return kernel(
            inputs=inputs,
            output_shapes=[shape for shape, _ in outputs],
            output_dtypes=[dtype for _, dtype in outputs],
            grid=(gx * launch.threads, gy, gz),
            threadgroup=(launch.threads, 1, 1),
            template=launch.template(io_dtype),
        )

    return launch_fn
