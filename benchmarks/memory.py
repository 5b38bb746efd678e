"""Peak memory and speed of the 32k retrieval encoder at batch 1, under the settings that set its peak.

    python benchmarks/memory.py --gpu --out benchmarks/results/memory-h100.json

Two things set the peak besides the activations. The inference cache of each long convolution's filter
spectrum, kept while one takes at most 1/256 of the device's memory (`hyena_filter.max_cached_filter_bytes`):
at L = 32768 an 80 GB GPU keeps all 24 (4.8 GB in float32), an 8 GB Mac none. And how far MLX runs ahead of the
GPU: it frees an intermediate only once the work that reads it has finished, keeps up to 10 command buffers in
flight, each cut after a number of operations and megabytes that it picks per GPU (H100: 100 operations or
1000 MB; Apple M-series: 40-50 operations or 40-50 MB), and waits for the GPU while the active memory is above
`mx.set_memory_limit` (by default 95% of an NVIDIA GPU's memory; on a Mac the smaller of 1.5x the recommended
working set and 95% of the RAM). Each setting runs in a fresh process (MLX reads the command-buffer limits once,
from the environment):

- default: this package's and MLX's own choices on this machine;
- no-cache: the same without the filter cache (each call recomputes the filters and their spectra);
- mac-8gb: what an 8 GB Mac would choose: no filter cache at L = 32768 (its cap is 8 GiB / 256), MLX's command
  buffers of the base and Pro M-series GPUs (MLX_MAX_OPS_PER_BUFFER=40, MLX_MAX_MB_PER_BUFFER=40) and the memory
  limit MLX sets there (8.16 GB: 95% of the RAM, below 1.5x a recommended working set of 2/3 of the RAM).

Each record is the median of `--repeats` forwards after `--warmup`, with the peak memory of the timed ones
(`mx.get_peak_memory`, weights included).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

GiB = 1 << 30
# name: (environment, memory limit in bytes, filter cache cap in bytes); None keeps the default.
SETTINGS = {
    "default": ({}, None, None),
    "no-cache": ({}, None, 0),
    "mac-8gb": ({"MLX_MAX_OPS_PER_BUFFER": "40", "MLX_MAX_MB_PER_BUFFER": "40"}, int(0.95 * 8 * GiB), 8 * GiB // 256),
}


def measure(args):
    """One setting, in this process: prints one JSON record per dtype."""
    # m2bert_hf_mlx before mlx.core: on Linux it gives MLX's CPU back end an optimized BLAS (m2bert_hf_mlx.cpu_blas).
    import m2bert_hf_mlx  # noqa: F401  # isort: skip

    import mlx.core as mx
    import numpy as np

    from m2bert_hf_mlx import M2BertConfig, M2BertModel, __version__, hyena_filter
    from m2bert_hf_mlx.loading import cast_model
    from m2bert_hf_mlx.ops import resolve_backend

    env, limit, cache_cap = SETTINGS[args.setting]
    mx.set_default_device(mx.gpu if args.gpu else mx.cpu)
    if limit is not None:
        mx.set_memory_limit(limit)
    if cache_cap is not None:
        hyena_filter.max_cached_filter_bytes = lambda: cache_cap
    ids = mx.array(np.random.default_rng(0).integers(1000, 30000, (args.batch, args.length)))
    for dtype in args.dtypes:
        model = M2BertModel(M2BertConfig.from_preset(args.model))
        model.eval()
        cast_model(model, dtype)
        mx.eval(model.parameters())
        for _ in range(args.warmup):
            mx.eval(model(ids).pooler_output)
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            mx.eval(model(ids).pooler_output)
            seconds.append(time.perf_counter() - start)
        record = dict(
            model=args.model,
            L=args.length,
            B=args.batch,
            dtype=dtype,
            framework="mlx",
            setting=args.setting,
            env=env,
            memory_limit_gb=mx.get_memory_limit() / 1e9,
            filter_cache_cap_gb=hyena_filter.max_cached_filter_bytes() / 1e9,
            peak_mem_gb=mx.get_peak_memory() / 1e9,
            tokens_per_s=args.batch * args.length / statistics.median(seconds),
            machine=mx.device_info().get("device_name") or platform.processor() or platform.machine(),
            long_conv_backend=resolve_backend(),
            versions=dict(mlx=mx.__version__, m2bert_hf_mlx=__version__, python=platform.python_version()),
        )
        print(json.dumps(record), flush=True)
        del model
        mx.clear_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="run on MLX's GPU (Metal or CUDA) instead of the CPU")
    parser.add_argument("--model", default="m2-bert-80m-32k-retrieval")
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the records to this JSON file")
    parser.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setting:
        return measure(args)
    records = []
    for setting in args.settings:
        command = [
            sys.executable,
            __file__,
            "--setting",
            setting,
            "--model",
            args.model,
            "--length",
            str(args.length),
            "--batch",
            str(args.batch),
            "--warmup",
            str(args.warmup),
            "--repeats",
            str(args.repeats),
            "--dtypes",
            *args.dtypes,
        ] + (["--gpu"] if args.gpu else [])
        env = dict(os.environ, **SETTINGS[setting][0])
        out = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
        for line in out.splitlines():
            record = json.loads(line)
            records.append(record)
            print(
                f"{setting:14s} {record['dtype']:9s} peak {record['peak_mem_gb']:6.2f} GB  "
                f"{record['tokens_per_s']:10.0f} tokens/s",
                flush=True,
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
