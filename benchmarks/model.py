"""Whole-model forward throughput and peak memory: MLX (this package) vs the PyTorch baseline, same weights, one process.

    python benchmarks/model.py --out benchmarks/results/model-cpu.json                 # CPU, MLX CPU back end
    python benchmarks/model.py --gpu --out benchmarks/results/model-h100.json          # MLX CUDA vs torch CUDA

Both frameworks run the M2-BERT-80M configurations (the MLM model and the retrieval encoder with its pooler) with
identical random weights: the PyTorch model is built first with the canonical initialisation, and its state dict is
loaded into the MLX model through `sanitize`, exactly as a canonical checkpoint would be. Before timing, the outputs
of the two are compared. Each record is the median of `--repeats` timed forwards after `--warmup` untimed ones.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from torch_m2bert import BertForMaskedLM, BertWithPooler  # noqa: E402

from m2bert_hf_mlx import M2BertConfig, M2BertForMaskedLM, M2BertModel, __version__  # noqa: E402
from m2bert_hf_mlx.loading import apply_weights, cast_model  # noqa: E402

MODELS = {
    # name: (preset whose dimensions are used, MLX class, torch class)
    "m2-bert-80m-mlm": ("m2-bert-80m", M2BertForMaskedLM, BertForMaskedLM),
    "m2-bert-80m-retrieval": ("m2-bert-80m-8k-retrieval", M2BertModel, BertWithPooler),
}


def config_for(preset, L):
    return M2BertConfig.from_preset(preset, max_position_embeddings=L, long_conv_l_max=L)


def build_pair(name, L, device):
    preset, mlx_cls, torch_cls = MODELS[name]
    config = config_for(preset, L)
    torch.manual_seed(0)
    reference = torch_cls(config).eval().to(device)
    state = {k: mx.array(v.detach().cpu().numpy()) for k, v in reference.state_dict().items()}
    model = mlx_cls(config)
    apply_weights(model, model.sanitize(state), strict=True)
    model.eval()
    return model, reference


def mlx_output(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.pooler_output


def torch_output(model, ids):
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out[1]


def time_it(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_mlx(model, ids, dtype, warmup, repeats):
    cast_model(model, dtype)
    mx.eval(model.parameters())
    mx.clear_cache()
    mx.reset_peak_memory()
    seconds = time_it(lambda: mx.eval(mlx_output(model, ids)), warmup, repeats)
    return seconds, mx.get_peak_memory() / 1e9


def bench_torch(model, ids, dtype, warmup, repeats, device):
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def run():
        with torch.inference_mode(), autocast:
            torch_output(model, ids)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds = time_it(run, warmup, repeats)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    return seconds, peak


def check_same_function(model, reference, ids_np, device):
    with torch.inference_mode():
        expected = torch_output(reference, torch.from_numpy(ids_np).to(device)).float().cpu().numpy()
    got = np.array(mlx_output(model, mx.array(ids_np)).astype(mx.float32))
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="MLX on its GPU back end, torch on CUDA")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048, 8192, 32768])
    parser.add_argument("--tokens", type=int, default=16384, help="batch size = tokens // L (at least 1)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    device = "cuda" if args.gpu else "cpu"
    mx.set_default_device(mx.gpu if args.gpu else mx.cpu)
    machine = torch.cuda.get_device_name() if args.gpu else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    versions = {"mlx": mx.__version__, "torch": torch.__version__, "m2bert_hf_mlx": __version__, "python": platform.python_version()}
    records = []
    args.dtypes = sorted(set(args.dtypes), key=["float32", "bfloat16"].index)  # fp32 first: the cast is one-way
    for name in args.models:
        for L in args.lengths:
            B = max(1, args.tokens // L)
            model, reference = build_pair(name, L, device)
            ids_np = np.random.default_rng(L).integers(1, 30522, size=(B, L))
            err = check_same_function(model, reference, ids_np[:1], device)
            for dtype in args.dtypes:
                row = dict(model=name, L=L, B=B, dtype=dtype, machine=machine, versions=versions)
                mlx_s, mlx_mem = bench_mlx(model, mx.array(ids_np), dtype, args.warmup, args.repeats)
                mlx_rec = dict(row, framework="mlx", tokens_per_s=B * L / mlx_s, peak_mem_gb=mlx_mem, max_rel_err_vs_torch_fp32=err)
                if dtype == "bfloat16" and device == "cpu":
                    # torch.fft rejects bf16 and CPU autocast breaks the canonical bmm (architecture doc §4):
                    # the canonical code has no CPU bf16 path to compare with.
                    torch_rec = None
                else:
                    torch_s, torch_mem = bench_torch(reference, torch.from_numpy(ids_np).to(device), dtype, args.warmup, args.repeats, device)
                    torch_rec = dict(row, framework="torch", tokens_per_s=B * L / torch_s, peak_mem_gb=torch_mem)
                    mlx_rec["speedup_vs_torch"] = mlx_rec["tokens_per_s"] / torch_rec["tokens_per_s"]
                for rec in (mlx_rec, torch_rec):
                    if rec is not None:
                        records.append(rec)
                        print(json.dumps({k: v for k, v in rec.items() if k not in ("versions", "machine")}), flush=True)
            del model, reference
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
