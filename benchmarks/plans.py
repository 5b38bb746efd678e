"""The kernels' plans per target, without a GPU: tiles, threadgroup memory, registers and traffic.

    python benchmarks/plans.py --out benchmarks/results/plans.json      # prints the README's markdown table

For each target (Metal, CUDA) and each L of the benchmarks (C = 768, B = max(1, 16384 // L)), every launch of the
long convolution's plan and of the Monarch mixer's (ops.monarch_mixer, where it has one): threads per threadgroup,
threadgroup memory, registers per thread of the CUDA build of that tile (nvcc for sm_90a, where nvcc is installed;
Apple's compiler is not available here, so Metal tiles are compiled as CUDA too, an estimate of their register
pressure), passes through device memory and the bytes moved per token against the minimum, in float32: for the long
convolution u read and y written once and the filter spectrum once; for the mixer z (3C) and u read, y written
once and both spectra once. Filter re-reads by the threadgroups of other batch rows are assumed to hit the cache.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

# m2bert_hf_mlx before mlx.core: on Linux it gives MLX's CPU back end an optimized BLAS (m2bert_hf_mlx.cpu_blas).
import m2bert_hf_mlx  # noqa: F401  # isort: skip

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from long_conv import io_bytes, min_bytes  # noqa: E402
from test_long_conv_sources import compile_for_hopper  # MLX's CUDA source assembly

from m2bert_hf_mlx import kernels

LENGTHS = [128, 512, 2048, 4096, 8192, 32768]


def registers(launches):
    """Registers per thread of each launch's CUDA build (float32 I/O), or None without nvcc."""
    if shutil.which("nvcc") is None:
        return [None] * len(launches)
    with tempfile.TemporaryDirectory() as tmp:
        return [used for used, _ in compile_for_hopper(launches, Path(tmp))]


def traffic(plan, itemsize=4):
    """(passes through device memory, bytes per token moved, minimum bytes per token)."""
    tokens = plan.batch * plan.length
    io = io_bytes(plan.batch, plan.length, plan.channels, itemsize, plan.mixer)
    filter_bytes = plan.pairs * plan.n1 * (plan.n2 // 2 + 1) * 16
    minimum = min_bytes(plan.batch, plan.length, plan.channels, itemsize, plan.mixer)
    if plan.n1 == 1:
        return 1, (io + filter_bytes) / tokens, minimum / tokens
    scratch = plan.batch * plan.pairs * plan.n * 8  # written by pass 1, read and written by pass 2, read by pass 3
    return 3, (io + filter_bytes + 4 * scratch) / tokens, minimum / tokens


def plans(target, channels):
    """(L, plan) of the long convolution and of the mixer (where it has a plan) at each benchmark length."""
    batches = {length: max(1, 16384 // length) for length in LENGTHS}
    found = [(length, kernels.plan(target, batch, length, channels)) for length, batch in batches.items()]
    mixers = [(length, kernels.mixer_plan(target, batch, length, channels)) for length, batch in batches.items()]
    return found + [(length, p) for length, p in mixers if p is not None]


def table(channels=768):
    rows = []
    for target in kernels.TARGETS.values():
        found = plans(target, channels)
        regs = iter(registers([launch for _, p in found for launch in p.launches]))
        for length, p in found:
            passes, moved, minimum = traffic(p)
            for launch in p.launches:
                constants = dict(launch.constants)
                rows.append(
                    {
                        "target": target.name,
                        "L": length,
                        "B": p.batch,
                        "C": channels,
                        "N": p.n,
                        "kernel": launch.kernel,
                        "threads": launch.threads,
                        "values_per_thread": launch.elems,
                        "radix": 1 << constants["LOG_RADIX"],
                        "threadgroup_bytes": 8 * constants["SMEM"],
                        "registers_cuda_build": next(regs),
                        "passes": passes,
                        "bytes_per_token": round(moved),
                        "min_bytes_per_token": round(minimum),
                    }
                )
    return rows


def markdown(rows):
    lines = [
        (
            "| target | L | N | kernel | threads | values/thread, radix | threadgroup KB | registers (CUDA build) "
            "| passes | bytes/token (min) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["bytes_per_token"] / r["min_bytes_per_token"]
        lines.append(
            f"| {r['target']} | {r['L']} | {r['N']} | {r['kernel']} | {r['threads']} | {r['values_per_thread']}, "
            f"{r['radix']} | {r['threadgroup_bytes'] / 1024:.1f} | {r['registers_cuda_build'] or '-'} | {r['passes']} "
            f"| {r['bytes_per_token']:,} ({r['min_bytes_per_token']:,}, {ratio:.2f}x) |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = table()
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
