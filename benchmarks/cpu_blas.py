"""fp32 matrix-product speed of MLX's CPU back end with its bundled reference BLAS and with the CBLAS that
m2bert_hf_mlx.cpu_blas loads (by default the one the `cpu` extra installs: MKL on x86-64, NVPL BLAS on Arm), next to
torch and numpy, on M2-BERT-80M's shapes (tokens x 768 by 768 x 2304, the mixer's in_linear).

    python benchmarks/cpu_blas.py                                  # M2BERT_BLAS=auto vs off
    M2BERT_BLAS=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/cpu_blas.py
"""

import json
import os
import subprocess
import sys

PROBE = """
import json, statistics, time
import m2bert_hf_mlx, mlx.core as mx
a, b = mx.random.normal((2048, 768)), mx.random.normal((768, 2304))
mx.eval(a, b)
times = []
for _ in range(7):
    start = time.perf_counter(); mx.eval(a @ b); times.append(time.perf_counter() - start)
gflops = 2 * 2048 * 768 * 2304 / statistics.median(times[2:]) / 1e9
print(json.dumps({"blas": m2bert_hf_mlx.cpu_blas.loaded, "gflops": gflops}))
"""


def mlx_gflops(choice):
    env = {**os.environ, "M2BERT_BLAS": choice}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def reference_gflops():
    import statistics
    import time

    import numpy as np
    import torch

    a, b = np.random.randn(2048, 768).astype(np.float32), np.random.randn(768, 2304).astype(np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    results = {}
    for name, fn in (("torch", lambda: ta @ tb), ("numpy", lambda: a @ b)):
        times = []
        for _ in range(7):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        results[name] = 2 * 2048 * 768 * 2304 / statistics.median(times[2:]) / 1e9
    return results


if __name__ == "__main__":
    rows = {
        "mlx (reference BLAS)": mlx_gflops("off"),
        "mlx (M2BERT_BLAS)": mlx_gflops(os.environ.get("M2BERT_BLAS", "auto")),
    }
    rows.update({k: {"gflops": v} for k, v in reference_gflops().items()})
    for name, row in rows.items():
        print(f"{name:22s} {row['gflops']:8.1f} GFLOP/s  {row.get('blas') or ''}")
