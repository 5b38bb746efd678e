"""One call of the fused long convolution per length, for Nsight Compute: the kernels' own counters.

    ncu --clock-control none --kernel-name regex:m2_long_conv --launch-skip 10 --launch-count 5 --csv --page details \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \
        python benchmarks/profile_long_conv.py > benchmarks/results/long_conv-h200-ncu.csv

fp32, C = 768, B = 16384 // L for L = 2048 and 8192 (single pass on CUDA) and 32768 (four-step, three launches).
Every convolution runs once first (with the back end's self-check before it): the 10 launches that --launch-skip
passes over; the second round's 5 launches are the ones profiled. (The CSV in benchmarks/results was taken when
L = 8192 was four-step too: --launch-skip 14 --launch-count 7.)
"""

import os

# m2bert_hf_mlx before mlx.core: on Linux it gives MLX's CPU back end an optimized BLAS (m2bert_hf_mlx.cpu_blas).
import m2bert_hf_mlx  # noqa: F401  # isort: skip

import mlx.core as mx
import numpy as np

from m2bert_hf_mlx import ops

LENGTHS = [2048, 8192, 32768]


def main():
    backend = ops.resolve_backend()
    os.environ[ops.BACKEND_ENV] = backend  # a kernel that fails its self-check raises
    rng = np.random.default_rng(0)
    calls = []
    for length in LENGTHS:
        channels, batch = 768, max(1, 16384 // length)
        u = mx.array(rng.standard_normal((batch, length, channels)).astype(np.float32))
        k_fwd, k_rev = (mx.array(rng.standard_normal((channels, length)).astype(np.float32)) for _ in "fr")
        skip = mx.array(rng.standard_normal(channels).astype(np.float32))
        spectrum = ops.filter_spectrum(k_fwd, k_rev, skip, length, backend=backend)
        mx.eval(u, spectrum.values)
        calls.append(lambda u=u, skip=skip, spectrum=spectrum: ops.long_conv(u, None, None, skip, spectrum=spectrum))
    for _ in range(2):
        for call in calls:
            mx.eval(call())
            mx.synchronize()


if __name__ == "__main__":
    main()
