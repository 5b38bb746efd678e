"""The fused long-convolution kernel against the naive mx.fft and torch.fft convolutions, one process, same inputs.

    python benchmarks/long_conv.py --out benchmarks/results/long_conv-h100.json \
        --plot benchmarks/results/long_conv-h100.png --sweep benchmarks/results/long_conv-h100-sweep.json

On an NVIDIA GPU (MLX's CUDA back end, torch with CUDA) it times backend "cuda"; on an Apple GPU, "metal" (torch on
MPS has no FFT convolution to compare, so its column is left out there). For each L in --lengths, B = max(1, 16384 // L)
(B * L = 16384 tokens, one sequence at L = 32768), each C in --channels and each dtype:

- fused: ops.long_conv(u, ..., backend=...) with the filter spectrum precomputed (the model's inference path);
- mx_fft: the naive convolution (ops backend "mlx") with its filter spectrum precomputed;
- torch_fft: the same naive convolution written in torch, filter spectrum precomputed.

bf16 inputs go through fp32 inside every path (torch.fft and mx.fft have no bf16 FFT) and come back as bf16.
Each time is the median over --repeats batches of --calls calls queued back to back (mx.async_eval; torch queues
by itself), after a warm-up, divided by --calls: the throughput of a stream of calls, host overhead included.
Effective bandwidth counts the minimum traffic: u read and y written once (4 or 2 bytes each) plus the fp32 complex
filter spectrum read once, 8 * C * (L + 1) bytes; roofline_fraction divides it by the measured device-to-device copy
bandwidth (bytes read + written). Each fused output is compared with the mx_fft output (rel_error_vs_mx_fft).

The output is a list of records, one per (L, C, dtype, backend). --sweep PATH also times tile-size variants of the
CUDA plan (fp32, first C, kernels only) and writes them to PATH.
"""

import argparse
import dataclasses
import json
import os
import platform

# m2bert_hf_mlx before mlx.core: on Linux it gives MLX's CPU back end an optimized BLAS (m2bert_hf_mlx.cpu_blas).
import m2bert_hf_mlx  # noqa: F401  # isort: skip

import mlx.core as mx
import numpy as np
from _timing import median_seconds

from m2bert_hf_mlx import kernels, ops

_SHORT_SINGLE_PASS = tuple(tile for tile in kernels.CUDA.single_pass if tile.max_n <= 4096)


def _cuda_variant(single_pass=None, four_step=None):
    """The CUDA target with one tile for every single-pass or every four-step plan: (values, per thread, log radix).
    A four-step variant keeps the default single pass up to N = 4096 only, so that it runs from N = 8192."""
    return kernels.Target(
        "cuda",
        (kernels.Tile(single_pass[0], *single_pass),) if single_pass else _SHORT_SINGLE_PASS,
        kernels.CUDA.mixer_single_pass,
        (kernels.Tile(1 << 62, *four_step),) if four_step else kernels.CUDA.four_step,
        pad=True,
    )


# Tile variants of the CUDA plan beside the default: values per block, per thread (threads = values / per thread)
# and the log2 of the FFT radix, for the single pass (which then covers N up to the block's values) or the four-step
# passes; single passes with a fourth entry True are split tiles (kernels.Tile: half the shared memory).
SINGLE_PASS_VARIANTS = [
    (16384, 16, 3),
    (8192, 16, 3),
    (8192, 16, 4),
    (8192, 16, 4, True),
    (4096, 16, 3),
    (4096, 16, 4, True),
    (2048, 16, 4),
    (2048, 8, 3),
]
FOUR_STEP_VARIANTS = [(4096, 16, 3), (4096, 16, 4), (8192, 16, 3), (8192, 16, 4), (4096, 8, 3)]
SWEEP = (
    {
        "default": kernels.CUDA,
        "default, four-step beyond N = 4096": dataclasses.replace(kernels.CUDA, single_pass=_SHORT_SINGLE_PASS),
    }
    | {
        f"single pass {v} values, {e} per thread, radix {1 << r}{', split' if split else ''}": _cuda_variant(
            single_pass=(v, e, r, *split)
        )
        for v, e, r, *split in SINGLE_PASS_VARIANTS
    }
    | {
        f"four-step {v} values, {e} per thread, radix {1 << r}": _cuda_variant(four_step=(v, e, r))
        for v, e, r in FOUR_STEP_VARIANTS
    }
)


def median_ms(fn, sync, calls, repeats):
    """fn queues one call without waiting for it (MLX: mx.async_eval; torch: asynchronous by default)."""
    return median_seconds(fn, repeats, warmup=3, calls=calls, sync=sync) * 1e3


def mlx_sync():
    mx.synchronize()


def copy_bandwidth_gbs(torch):
    """Device-to-device copy of 1 GiB (torch's clone on CUDA, an MLX elementwise copy elsewhere), in bytes read plus
    bytes written per second."""
    n = 1 << 28
    if torch is not None:
        x = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
        ms = median_ms(lambda: x.clone(), torch.cuda.synchronize, 5, 10)
    else:
        x = mx.random.uniform(shape=(n,))
        mx.eval(x)
        ms = median_ms(lambda: mx.async_eval(x * 1.0), mlx_sync, 5, 10)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def bandwidth(ms, nbytes, copy_gbs):
    """A record's time, the effective GB/s of moving `nbytes` in it, and that as a fraction of the copy rate."""
    gbs = nbytes / (ms * 1e-3) / 1e9
    return {"ms": round(ms, 5), "effective_gbs": round(gbs, 1), "roofline_fraction": round(gbs / copy_gbs, 4)}


def io_bytes(batch, length, channels, itemsize, mixer=False):
    """The inputs read and the output written once: u and y, or for the Monarch mixer z (3C), u and y."""
    return (5 if mixer else 2) * itemsize * batch * length * channels


def min_bytes(batch, length, channels, itemsize, mixer=False):
    """The least traffic: io_bytes, and each fp32 complex filter spectrum (L + 1 bins a channel) read once."""
    return io_bytes(batch, length, channels, itemsize, mixer) + (2 if mixer else 1) * 8 * channels * (length + 1)


def torch_conv(torch, u, k_f, skip, length):
    """The naive FFT convolution in torch: u (B, L, C), k_f (L + 1, C) complex spectrum of the length-2L filter."""
    u32 = u.float()
    y = torch.fft.irfft(torch.fft.rfft(u32, n=2 * length, dim=1) * k_f, n=2 * length, dim=1)[:, :length]
    return (y + u32 * skip).to(u.dtype)


def measure(args, backend, torch, length, channels, dtype_name, results):
    batch = max(1, 16384 // length)
    dtype = getattr(mx, dtype_name)
    rng = np.random.default_rng(length + channels)
    u_np = rng.standard_normal((batch, length, channels)).astype(np.float32)
    scale = 1 / np.sqrt(length)
    k_fwd, k_rev = (mx.array(rng.standard_normal((channels, length)).astype(np.float32) * scale) for _ in "fr")
    skip = mx.array(rng.standard_normal(channels).astype(np.float32))
    u = mx.array(u_np).astype(dtype)
    fused_spectrum = ops.filter_spectrum(k_fwd, k_rev, skip, length, backend=backend)
    mlx_spectrum = ops.filter_spectrum(k_fwd, k_rev, skip, length, backend="mlx")
    mx.eval(u, fused_spectrum.values, mlx_spectrum.values)

    def fused():
        return ops.long_conv(u, k_fwd, k_rev, skip, backend=backend, spectrum=fused_spectrum)

    def naive():
        return ops.long_conv(u, k_fwd, k_rev, skip, backend="mlx", spectrum=mlx_spectrum)

    y_fused, y_naive = fused().astype(mx.float32), naive().astype(mx.float32)
    error = float(mx.linalg.norm(y_fused - y_naive) / mx.linalg.norm(y_naive))
    times = {
        backend: median_ms(lambda: mx.async_eval(fused()), mlx_sync, args.calls, args.repeats),
        "mx_fft": median_ms(lambda: mx.async_eval(naive()), mlx_sync, args.calls, args.repeats),
    }
    if torch is not None:
        tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
        u_t = torch.from_numpy(u_np).cuda().to(tdtype)
        k_f = torch.from_numpy(np.asarray(mlx_spectrum.values).T.copy()).cuda()
        skip_t = torch.from_numpy(np.asarray(skip)).cuda()
        times["torch_fft"] = median_ms(
            lambda: torch_conv(torch, u_t, k_f, skip_t, length), torch.cuda.synchronize, args.calls, args.repeats
        )
    nbytes = min_bytes(batch, length, channels, 4 if dtype_name == "float32" else 2)
    for name, ms in times.items():
        record = {
            "L": length,
            "B": batch,
            "C": channels,
            "dtype": dtype_name,
            "backend": name,
            **bandwidth(ms, nbytes, args.copy_gbs),
            "speedup_vs_mx_fft": round(times["mx_fft"] / ms, 3),
        }
        if "torch_fft" in times:
            record["speedup_vs_torch_fft"] = round(times["torch_fft"] / ms, 3)
        if name == backend:
            record["rel_error_vs_mx_fft"] = float(f"{error:.3g}")
        results.append(record)
    line = "  ".join(f"{name} {ms:8.4f} ms" for name, ms in times.items())
    print(f"L={length:6d} B={batch:4d} C={channels:5d} {dtype_name:9s} {line}  err {error:.1e}", flush=True)


def sweep(args, lengths, channels, save):
    """Times each CUDA tile variant on fp32 inputs (kernels only, filter precomputed)."""
    records = []
    launch_fn = kernels.gpu_launch("cuda")
    for name, target in SWEEP.items():
        for length in lengths:
            batch = max(1, 16384 // length)
            rng = np.random.default_rng(length)
            u = mx.array(rng.standard_normal((batch, length, channels)).astype(np.float32))
            k_fwd, k_rev = (mx.array(rng.standard_normal((channels, length)).astype(np.float32)) for _ in "fr")
            skip = mx.zeros((channels,))
            plan = kernels.plan(target, batch, length, channels)
            packed = kernels.packed_filter(k_fwd, k_rev, skip, plan.n, plan.n1)
            mx.eval(u, packed)
            try:
                y = kernels.run_plan(plan, u, packed, launch_fn)
                ref = ops.long_conv(u, k_fwd, k_rev, skip, backend="mlx")
                error = float(mx.linalg.norm(y - ref) / mx.linalg.norm(ref))

                def call(plan=plan, u=u, packed=packed):
                    mx.async_eval(kernels.run_plan(plan, u, packed, launch_fn))

                ms = median_ms(call, mlx_sync, args.calls, args.repeats)
            except RuntimeError as e:  # a variant whose blocks do not fit the GPU
                print(f"sweep {name:30s} L={length:6d} failed: {str(e)[:200]}", flush=True)
                records.append({"variant": name, "L": length, "B": batch, "C": channels, "error": str(e)[:500]})
                save(records)
                continue
            nbytes = min_bytes(batch, length, channels, 4)
            gbs = nbytes / (ms * 1e-3) / 1e9
            print(f"sweep {name:30s} L={length:6d} {ms:8.4f} ms {gbs:7.1f} GB/s err {error:.1e}", flush=True)
            records.append(
                {"variant": name, "L": length, "B": batch, "C": channels, "ms": round(ms, 5), "rel_error": error}
            )
            save(records)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes, widths = sorted({r["dtype"] for r in results}), sorted({r["C"] for r in results})
    fig, axes = plt.subplots(len(dtypes), len(widths), figsize=(5 * len(widths), 4 * len(dtypes)), squeeze=False)
    for ax, (dtype, channels) in zip(axes.flat, [(d, c) for d in dtypes for c in widths]):
        for backend in sorted({r["backend"] for r in results}):
            rows = sorted(
                (r["L"], r["ms"]) for r in results if (r["C"], r["dtype"], r["backend"]) == (channels, dtype, backend)
            )
            ax.plot([x for x, _ in rows], [y for _, y in rows], marker="o", label=backend)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"C={channels}, {dtype}, B*L=16384")
        ax.set_xlabel("L")
        ax.set_ylabel("ms per call")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def gpu_setup(what):
    """(kernel back end, torch or None, copy GB/s, the records' context) of a GPU benchmark timing `what`."""
    backend = ops.resolve_backend()
    if backend not in ("cuda", "metal"):
        raise SystemExit(f"This benchmark times {what}: run it where MLX has a CUDA or Metal GPU.")
    os.environ[ops.BACKEND_ENV] = backend  # a kernel that fails its self-check raises rather than time mx.fft
    torch = None
    if backend == "cuda":
        import torch
    copy_gbs = copy_bandwidth_gbs(torch)
    print(f"backend {backend}, device-to-device copy {copy_gbs:.0f} GB/s", flush=True)
    context = {
        "device": torch.cuda.get_device_name() if torch is not None else platform.platform(),
        "mlx": mx.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "copy_gbs": round(copy_gbs, 1),
    }
    return backend, torch, copy_gbs, context


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048, 8192, 32768])
    parser.add_argument("--channels", type=int, nargs="+", default=[768, 1536])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--sweep", help="also time the CUDA tile variants, into this JSON file")
    parser.add_argument("--out", required=True)
    parser.add_argument("--plot")
    args = parser.parse_args()

    backend, torch, args.copy_gbs, context = gpu_setup("the fused kernel")

    def save(records, path):  # after every measurement, so that an interrupted run keeps what it measured
        with open(path, "w") as f:
            json.dump([{**record, **context} for record in records], f, indent=1)

    results = []
    for dtype_name in args.dtypes:
        for channels in args.channels:
            for length in args.lengths:
                measure(args, backend, torch, length, channels, dtype_name, results)
                save(results, args.out)
    if args.plot:
        plot(results, args.plot)
    if args.sweep:
        sweep(args, args.lengths, args.channels[0], lambda records: save(records, args.sweep))


if __name__ == "__main__":
    main()
