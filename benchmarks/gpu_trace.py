"""Where the GPU time of a forward goes, kernel by kernel: a CUPTI trace (torch.profiler) of MLX's CUDA kernels.

    python benchmarks/gpu_trace.py --length 2048 --batch 8 --dtype bfloat16

torch's profiler records every CUDA kernel of the process, MLX's included, with its device time. The table sums them
over `--forwards` forwards of the retrieval encoder after three untimed ones; "Self CUDA time total" divided by the
number of forwards, against the median wall time of one forward printed first (timed without the profiler), says how
much of it the GPU was busy. CUDA only.
"""

import argparse

# m2bert_hf_mlx before mlx.core: on Linux it gives MLX's CPU back end an optimized BLAS (m2bert_hf_mlx.cpu_blas).
from m2bert_hf_mlx import M2BertConfig, M2BertModel  # isort: skip
from m2bert_hf_mlx.loading import cast_model  # isort: skip
from _timing import median_seconds  # isort: skip

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--forwards", type=int, default=3)
    args = parser.parse_args()
    L = args.length
    config = M2BertConfig.from_preset("m2-bert-80m-8k-retrieval", max_position_embeddings=L, long_conv_l_max=L)
    model = M2BertModel(config)
    cast_model(model, args.dtype)
    model.eval()
    ids = mx.array(np.random.default_rng(0).integers(1, 30522, (args.batch, L)))
    wall = median_seconds(lambda: mx.eval(model(ids).pooler_output), 7, warmup=3)
    print(f"L={L} B={args.batch} {args.dtype}: {wall * 1e3:.2f} ms a forward (median of 7)")
    torch.zeros(1, device="cuda")  # torch's CUDA context, for its profiler
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        for _ in range(args.forwards):
            mx.eval(model(ids).pooler_output)
        mx.synchronize()
    print(f"{args.forwards} forwards traced")
    print(trace.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))


if __name__ == "__main__":
    main()
