"""The fused Monarch mixer kernels against the same mixing as separate operations, one process, same inputs.

    python benchmarks/mixer.py --out benchmarks/results/mixer-h200.json

ops.monarch_mixer is the mixer between in_linear and out_linear: the causal short conv of in_linear's output z
(B, L, 3C), the gate v * x1, the long convolution of it, the gate by x2 and the residual long convolution of the layer
input u (B, L, C). For each L in --lengths (B = max(1, 16384 // L)), each C and each dtype it times, with both filter
spectra precomputed (the model's inference path):

- fused: ops.monarch_mixer on the GPU's kernel back end (the mixer kernels);
- fused_channels_first: the same on z and u stored as (B, 3C, L) and (B, C, L) and passed as their transposed
  views, which the kernels read in place: what they would cost if in_linear wrote its output channels-first (a
  matrix product can, at no cost) and the layer input were transposed once, so that a warp's loads run along L;
- separate: the same operations one by one, each long convolution on the kernel (the model before the mixer
  kernels);
- mx_fft: the same operations one by one on back end "mlx";
- torch: the same operations in torch (short conv by shifted products, FFT convolutions), on CUDA only.

Times are medians as in benchmarks/long_conv.py. Effective bandwidth counts the minimum traffic: z and u read and y
written once, plus both fp32 complex filter spectra read once; roofline_fraction divides it by the measured
device-to-device copy bandwidth. Each fused output is compared with the mx_fft output (rel_error_vs_mx_fft).

--gradients PATH times, instead, what a training step asks of the mixer (fp32, first C): the output and the VJP of
ops.monarch_mixer in every argument, from the filters themselves, into PATH; run it with two builds of the package
to compare them.

--sweep PATH times, instead, the mixer kernels alone (each of --dtypes, first C; the reference is fp32) with each
single-pass tile of SWEEP_TILES that covers the FFT size, beside the CUDA target's own choice and, where that is a
single pass, the four-step passes, into PATH.
"""

import argparse
import json

# m2bert_hf_mlx before mlx.core: on Linux it gives MLX's CPU back end an optimized BLAS (m2bert_hf_mlx.cpu_blas).
from m2bert_hf_mlx import kernels, ops  # isort: skip
from m2bert_hf_mlx.short_conv import short_conv_gate  # isort: skip
from long_conv import bandwidth, gpu_setup, median_ms, min_bytes, mlx_sync, torch_conv  # isort: skip

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402


def torch_mixer(torch, z, u, weight, bias, spectra, skips, length):
    """The mixer in torch, channels-last: z (B, L, 3C), weight (3C, 3), spectra (L + 1, C) of length-2L filters."""
    padded = torch.nn.functional.pad(z, (0, 0, 2, 0))
    uc = padded[:, :length] * weight[:, 0] + padded[:, 1 : length + 1] * weight[:, 1] + z * weight[:, 2] + bias
    x1, x2, v = uc.chunk(3, dim=-1)
    y = torch_conv(torch, v * x1, spectra[0], skips[0], length) * x2
    return y + torch_conv(torch, u, spectra[1], skips[1], length)


def measure(args, backend, torch, length, channels, dtype_name, results):
    batch = max(1, 16384 // length)
    dtype = getattr(mx, dtype_name)
    rng = np.random.default_rng(length + channels)

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    z_np, u_np = normal(batch, length, 3 * channels), normal(batch, length, channels)
    weight, bias = mx.array(normal(3 * channels, 3, 1, scale=0.5)), mx.array(normal(3 * channels))
    filters = [
        tuple(mx.array(normal(channels, length, scale=length**-0.5)) for _ in "fr") + (mx.array(normal(channels)),)
        for _ in range(2)
    ]
    z, u = mx.array(z_np).astype(dtype), mx.array(u_np).astype(dtype)
    kernel_spectra = [ops.filter_spectrum(*f, length, backend=backend) for f in filters]
    mlx_spectra = [ops.filter_spectrum(*f, length, backend="mlx") for f in filters]
    mx.eval(z, u, weight, bias, [s.values for s in kernel_spectra + mlx_spectra])
    skips = [(None, None, f[2]) for f in filters]

    def fused(z=z, u=u):
        return ops.monarch_mixer(z, u, weight, bias, *skips, spectra=kernel_spectra, backend=backend)

    z_cf, u_cf = (mx.contiguous(mx.swapaxes(a, 1, 2)) for a in (z, u))
    mx.eval(z_cf, u_cf)

    def fused_channels_first():
        return fused(mx.swapaxes(z_cf, 1, 2), mx.swapaxes(u_cf, 1, 2))

    def separate(backend_, spectra):
        gated, x2 = short_conv_gate(z, weight.astype(dtype), bias.astype(dtype))
        y = ops.long_conv(gated, None, None, filters[0][2], backend=backend_, spectrum=spectra[0]) * x2
        return y + ops.long_conv(u, None, None, filters[1][2], backend=backend_, spectrum=spectra[1])

    y_naive = separate("mlx", mlx_spectra).astype(mx.float32)
    errors = {
        name: float(mx.linalg.norm(f().astype(mx.float32) - y_naive) / mx.linalg.norm(y_naive))
        for name, f in (("fused", fused), ("fused_channels_first", fused_channels_first))
    }
    error = max(errors.values())
    times = {
        "fused": median_ms(lambda: mx.async_eval(fused()), mlx_sync, args.calls, args.repeats),
        "fused_channels_first": median_ms(
            lambda: mx.async_eval(fused_channels_first()), mlx_sync, args.calls, args.repeats
        ),
        "separate": median_ms(
            lambda: mx.async_eval(separate(backend, kernel_spectra)), mlx_sync, args.calls, args.repeats
        ),
        "mx_fft": median_ms(lambda: mx.async_eval(separate("mlx", mlx_spectra)), mlx_sync, args.calls, args.repeats),
    }
    if torch is not None:
        tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
        z_t, u_t = (torch.from_numpy(a).cuda().to(tdtype) for a in (z_np, u_np))
        w_t = torch.from_numpy(np.asarray(weight)[:, :, 0].copy()).cuda().to(tdtype)
        b_t = torch.from_numpy(np.asarray(bias)).cuda().to(tdtype)
        spectra_t = [torch.from_numpy(np.asarray(s.values).T.copy()).cuda() for s in mlx_spectra]
        skips_t = [torch.from_numpy(np.asarray(f[2])).cuda() for f in filters]
        times["torch"] = median_ms(
            lambda: torch_mixer(torch, z_t, u_t, w_t, b_t, spectra_t, skips_t, length),
            torch.cuda.synchronize,
            args.calls,
            args.repeats,
        )
    nbytes = min_bytes(batch, length, channels, 4 if dtype_name == "float32" else 2, mixer=True)
    for name, ms in times.items():
        record = {
            "L": length,
            "B": batch,
            "C": channels,
            "dtype": dtype_name,
            "path": name,
            **bandwidth(ms, nbytes, args.copy_gbs),
            "speedup_vs_separate": round(times["separate"] / ms, 3),
            "speedup_vs_mx_fft": round(times["mx_fft"] / ms, 3),
        }
        if "torch" in times:
            record["speedup_vs_torch"] = round(times["torch"] / ms, 3)
        if name in errors:
            record["rel_error_vs_mx_fft"] = float(f"{errors[name]:.3g}")
        results.append(record)
    line = "  ".join(f"{name} {ms:8.4f} ms" for name, ms in times.items())
    print(f"L={length:6d} B={batch:4d} C={channels:5d} {dtype_name:9s} {line}  err {error:.1e}", flush=True)


def gradient_ms(args, length, channels):
    """Median ms of monarch_mixer's output and VJP, from the filters, at `length` (B = 16384 // length)."""
    batch = max(1, 16384 // length)
    rng = np.random.default_rng(length)

    def normal(*shape, scale=1.0):
        return mx.array((rng.standard_normal(shape) * scale).astype(np.float32))

    z, u, cotangent = (
        normal(batch, length, 3 * channels),
        normal(batch, length, channels),
        normal(batch, length, channels),
    )
    arrays = [normal(3 * channels, 3, 1, scale=0.5), normal(3 * channels)]
    for _ in range(2):
        arrays += [normal(channels, length, scale=length**-0.5), normal(channels, length, scale=length**-0.5)]
        arrays.append(normal(channels))
    mx.eval(z, u, cotangent, arrays)

    def mixer(z, u, weight, bias, *filters):
        return ops.monarch_mixer(z, u, weight, bias, tuple(filters[:3]), tuple(filters[3:]))

    return median_ms(
        lambda: mx.async_eval(mx.vjp(mixer, [z, u, *arrays], [cotangent])), mlx_sync, args.calls, args.repeats
    )


def gradients(args, lengths, channels, path):
    records = []
    for length in lengths:
        ms = gradient_ms(args, length, channels)
        batch = max(1, 16384 // length)
        print(f"gradients L={length:6d} B={batch:4d} C={channels:5d} {ms:8.4f} ms", flush=True)
        records.append({"L": length, "B": batch, "C": channels, "dtype": "float32", "forward_and_vjp_ms": round(ms, 5)})
        with open(path, "w") as f:
            json.dump([{**record, **args.context} for record in records], f, indent=1)


# Single-pass tiles for the mixer sweep: values per block, per thread and the log2 of the FFT radix.
SWEEP_TILES = [(2048, 8, 3), (4096, 8, 3), (4096, 16, 4), (8192, 16, 3), (8192, 16, 4)]


def sweep(args, lengths, channels, path):
    records = []
    launch_fn = kernels.gpu_launch("cuda")
    for length in lengths:
        n = kernels.fft_size(length)
        batch = max(1, 16384 // length)
        rng = np.random.default_rng(length)
        z = mx.array(rng.standard_normal((batch, length, 3 * channels)).astype(np.float32))
        u = mx.array(rng.standard_normal((batch, length, channels)).astype(np.float32))
        weight, bias = mx.array(rng.standard_normal((3 * channels, 3, 1)).astype(np.float32)), mx.zeros((3 * channels,))
        filters = [
            (
                *(mx.array(rng.standard_normal((channels, length)).astype(np.float32)) for _ in "fr"),
                mx.zeros((channels,)),
            )
            for _ in range(2)
        ]
        reference = ops.monarch_mixer(z, u, weight, bias, *filters, backend="mlx")
        variants = {
            "default": kernels.CUDA.mixer_single_pass,
            "four-step": tuple(tile for tile in kernels.CUDA.mixer_single_pass if tile.max_n < n),
        }
        variants |= {
            f"{v} values, {e} per thread, radix {1 << r}": (kernels.Tile(n, v, e, r),)
            for v, e, r in SWEEP_TILES
            if v >= 2 * n and e * 1024 >= v
        }
        for name, tiles in variants.items():
            target = kernels.Target("cuda", kernels.CUDA.single_pass, tiles, kernels.CUDA.four_step, pad=True)
            plan = kernels.plan(target, batch, length, channels, mixer=True)
            # "four-step" is timed only where its passes differ from the default's single pass, every other
            # variant only where it is a single pass.
            if (plan.n1 == 1) == (name == "four-step"):
                continue
            packed = [kernels.packed_filter(*f, plan.n, plan.n1) for f in filters]
            taps = kernels.short_conv_taps(weight, bias)
            mx.eval(z, u, packed, taps, reference)
            for dtype in args.dtypes:
                key = {"variant": name, "L": length, "B": batch, "C": channels, "dtype": dtype}
                z_io, u_io = z.astype(getattr(mx, dtype)), u.astype(getattr(mx, dtype))

                def call(plan=plan, packed=packed, taps=taps, u=u_io, z=z_io):
                    return kernels.run_plan(plan, u, packed[0], launch_fn, (z, taps, packed[1]))

                try:
                    y = call().astype(mx.float32)
                    error = float(mx.linalg.norm(y - reference) / mx.linalg.norm(reference))
                    ms = median_ms(lambda: mx.async_eval(call()), mlx_sync, args.calls, args.repeats)
                except RuntimeError as e:  # a variant whose blocks do not fit the GPU
                    records.append({**key, "error": str(e)[:500]})
                    continue
                print(f"sweep {name:32s} L={length:6d} {dtype:9s} {ms:8.4f} ms err {error:.1e}", flush=True)
                records.append({**key, "ms": round(ms, 5), "rel_error": error})
                with open(path, "w") as f:
                    json.dump(records, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048, 8192, 32768])
    parser.add_argument("--channels", type=int, nargs="+", default=[768])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--sweep", help="time the mixer's single-pass tile variants instead, into this JSON file")
    parser.add_argument("--gradients", help="time the mixer's output and VJP instead, into this JSON file")
    parser.add_argument("--out")
    args = parser.parse_args()
    if not (args.out or args.sweep or args.gradients):
        parser.error("give --out (the comparison), --sweep (the tile variants) or --gradients (the VJP)")

    backend, torch, args.copy_gbs, context = gpu_setup("the mixer kernels")
    args.context = context
    if args.gradients:
        gradients(args, args.lengths, args.channels[0], args.gradients)
        return
    if args.sweep:
        sweep(args, args.lengths, args.channels[0], args.sweep)
        return
    results = []
    for dtype_name in args.dtypes:
        for channels in args.channels:
            for length in args.lengths:
                measure(args, backend, torch, length, channels, dtype_name, results)
                with open(args.out, "w") as f:
                    json.dump([{**record, **context} for record in results], f, indent=1)


if __name__ == "__main__":
    main()
