"""Whole-model forward throughput and peak memory: MLX (this package) vs the PyTorch baseline, same weights, one
process.

    python benchmarks/model.py --out benchmarks/results/model-cpu.json                 # CPU, MLX CPU back end
    # MLX vs torch CUDA, in both matmul precisions:
    python benchmarks/model.py --gpu --precision tf32 strict --out benchmarks/results/model-h200.json
    python benchmarks/model.py --gpu --canonical-src m2/bert --out ...   # also the canonical HazyResearch/m2 code

float32 matrix products run in one of two modes on a GPU, on both sides alike: `--precision tf32` (MLX's CUDA default;
torch with `allow_tf32`, which the canonical code switches on when it is imported) or `--precision strict` (MLX with
MLX_ENABLE_TF32=0, torch at "highest"). `--precision tf32 strict` runs both, each in a child process, since MLX reads
its setting once. Every record carries `matmul_precision`, the mode each side actually ran in; the CPU is strict.
It also carries `mlx_compiled`: whether MLX ran the encoder's layers compiled (on a GPU unless M2BERT_COMPILE=0).
A shape's first forward runs uncompiled and its second is traced, so with `--warmup 2` or more (the default) every
timed forward replays the compiled one. torch runs eagerly, as the canonical code does.

`--canonical-src` is the `bert` folder of a checkout of github.com/HazyResearch/m2 (with `bert/src/__init__.py`
emptied, as its CPU/GPU imports need; see the architecture doc §4); that code is read for the run, never shipped.

Both frameworks run the M2-BERT-80M configurations (the MLM model and the retrieval encoder with its pooler) with
identical random weights: the PyTorch model is built first with the canonical initialisation, and its state dict is
loaded into the MLX model through `sanitize`, exactly as a canonical checkpoint would be. Before timing, the outputs
of the two are compared. Each record is the median of `--repeats` timed forwards after `--warmup` untimed ones.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

# m2bert_hf_mlx before mlx.core: on Linux it gives MLX's CPU back end an optimized BLAS (m2bert_hf_mlx.cpu_blas).
from m2bert_hf_mlx import M2BertConfig, M2BertForMaskedLM, M2BertModel, __version__, cpu_blas  # isort: skip
from m2bert_hf_mlx import ops  # isort: skip
from m2bert_hf_mlx.loading import apply_weights, cast_model  # isort: skip
from m2bert_hf_mlx.modeling_m2_bert import compiles_inference  # isort: skip
from _timing import median_seconds  # isort: skip

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from torch_m2bert import BertForMaskedLM, BertWithPooler  # noqa: E402

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


def warm_up(fn, times):
    for _ in range(times):
        fn()


def bench_mlx(model, ids, dtype, warmup, repeats):
    cast_model(model, dtype)
    mx.eval(model.parameters())
    run = lambda: mx.eval(mlx_output(model, ids))  # noqa: E731
    warm_up(run, warmup)
    mx.clear_cache()
    mx.reset_peak_memory()  # after the warm-up: the steady state, without the float32 copies a cast leaves behind
    seconds = median_seconds(run, repeats)
    return seconds, mx.get_peak_memory() / 1e9


def bench_torch(model, ids, dtype, warmup, repeats, device, output=None):
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    output = output or torch_output

    def run():
        with torch.inference_mode(), autocast:
            output(model, ids)
        if device == "cuda":
            torch.cuda.synchronize()

    warm_up(run, warmup)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds = median_seconds(run, repeats)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    return seconds, peak


def canonical_model(src, name, config, reference, device):
    """The canonical code's model for `name`, with the baseline's weights (same state-dict keys)."""
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    from src import bert_layers, configuration_bert

    fields = {
        k: v
        for k, v in config.to_dict().items()
        if k not in ("model_type", "transformers_version", "dtype", "use_flash_fft")
    }
    canonical_config = configuration_bert.BertConfig(
        **fields, use_flash_fft=False, use_cls_token=False, sequence_token_planting=False
    )
    if name == "m2-bert-80m-mlm":
        model = bert_layers.BertForMaskedLM(canonical_config)
    else:
        model = bert_layers.BertModel(canonical_config, add_pooling_layer=True)
    state = reference.state_dict() if name == "m2-bert-80m-mlm" else reference.bert.state_dict()
    model.load_state_dict(state, strict=True)
    return model.eval().to(device)


def canonical_output(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out[1]


def set_torch_precision(precision):
    """Puts torch's float32 matrix products (and cuDNN's) in `precision`; the canonical import changes them."""
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def matmul_precision(gpu):
    """The float32 matrix-product mode each side runs in now: "tf32" or "strict"."""
    mlx_tf32 = gpu and os.environ.get("MLX_ENABLE_TF32", "1") != "0"
    torch_tf32 = gpu and torch.backends.cuda.matmul.allow_tf32
    return {"mlx": "tf32" if mlx_tf32 else "strict", "torch": "tf32" if torch_tf32 else "strict"}


def run_modes(args):
    """One child process per precision mode (MLX reads MLX_ENABLE_TF32 once), their records into args.out."""
    records = []
    for precision in args.precision:
        out = args.out.with_name(f"{args.out.stem}.{precision}{args.out.suffix}")
        # argparse keeps the last value of a repeated option.
        argv = [*sys.argv[1:], "--precision", precision, "--out", str(out)]
        env = dict(os.environ, MLX_ENABLE_TF32="1" if precision == "tf32" else "0")
        subprocess.run([sys.executable, __file__, *argv], env=env, check=True)
        records += json.loads(out.read_text())
        out.unlink()
    args.out.write_text(json.dumps(records, indent=1) + "\n")


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
    parser.add_argument(
        "--canonical-src", type=Path, help="HazyResearch/m2's bert folder: also time the canonical code"
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["tf32"],
        choices=["tf32", "strict"],
        help="float32 matrix-product mode of both sides on a GPU (two values: both, one after the other)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.gpu and len(args.precision) > 1:
        return run_modes(args)
    precision = args.precision[0] if args.gpu else "strict"
    if args.gpu and (os.environ.get("MLX_ENABLE_TF32", "1") != "0") != (precision == "tf32"):
        raise SystemExit(
            f"--precision {precision} needs MLX_ENABLE_TF32={int(precision == 'tf32')} in the environment."
        )

    device = "cuda" if args.gpu else "cpu"
    if args.gpu:
        os.environ[ops.BACKEND_ENV] = "cuda"  # a kernel that fails its self-check raises rather than time mx.fft
    mx.set_default_device(mx.gpu if args.gpu else mx.cpu)
    machine = (
        torch.cuda.get_device_name()
        if args.gpu
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    versions = {
        "mlx": mx.__version__,
        "torch": torch.__version__,
        "m2bert_hf_mlx": __version__,
        "python": platform.python_version(),
        "mlx_cpu_blas": cpu_blas.loaded,
    }
    records = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.dtypes = sorted(set(args.dtypes), key=["float32", "bfloat16"].index)  # fp32 first: the cast is one-way
    for name in args.models:
        for L in args.lengths:
            B = max(1, args.tokens // L)
            set_torch_precision(precision)
            model, reference = build_pair(name, L, device)
            ids_np = np.random.default_rng(L).integers(1, 30522, size=(B, L))
            err = check_same_function(model, reference, ids_np[:1], device)
            canonical = None
            if args.canonical_src:
                canonical = canonical_model(args.canonical_src, name, model.config, reference, device)
                set_torch_precision(precision)
                with torch.inference_mode():
                    probe = torch.from_numpy(ids_np[:1]).to(device)
                    a, b = canonical_output(canonical, probe).float(), torch_output(reference, probe).float()
                    canonical_err = float((a - b).abs().max() / b.abs().max())
            for dtype in args.dtypes:
                row = dict(
                    model=name,
                    L=L,
                    B=B,
                    dtype=dtype,
                    machine=machine,
                    versions=versions,
                    matmul_precision=matmul_precision(args.gpu),
                    mlx_compiled=compiles_inference(),
                )
                mlx_s, mlx_mem = bench_mlx(model, mx.array(ids_np), dtype, args.warmup, args.repeats)
                mlx_rec = dict(
                    row, framework="mlx", tokens_per_s=B * L / mlx_s, peak_mem_gb=mlx_mem, max_rel_err_vs_torch_fp32=err
                )
                if dtype == "bfloat16" and device == "cpu":
                    # torch.fft rejects bf16 and CPU autocast breaks the canonical bmm (architecture doc §4):
                    # the canonical code has no CPU bf16 path to compare with.
                    torch_rec = None
                else:
                    torch_s, torch_mem = bench_torch(
                        reference, torch.from_numpy(ids_np).to(device), dtype, args.warmup, args.repeats, device
                    )
                    torch_rec = dict(row, framework="torch", tokens_per_s=B * L / torch_s, peak_mem_gb=torch_mem)
                    mlx_rec["speedup_vs_torch"] = mlx_rec["tokens_per_s"] / torch_rec["tokens_per_s"]
                canonical_rec = None
                if canonical is not None and torch_rec is not None:
                    canon_s, canon_mem = bench_torch(
                        canonical,
                        torch.from_numpy(ids_np).to(device),
                        dtype,
                        args.warmup,
                        args.repeats,
                        device,
                        canonical_output,
                    )
                    canonical_rec = dict(
                        row,
                        framework="torch-canonical",
                        tokens_per_s=B * L / canon_s,
                        peak_mem_gb=canon_mem,
                        max_rel_err_vs_baseline_fp32=canonical_err,
                        baseline_over_canonical=torch_rec["tokens_per_s"] / (B * L / canon_s),
                    )
                for rec in (mlx_rec, torch_rec, canonical_rec):
                    if rec is not None:
                        records.append(rec)
                        print(
                            json.dumps({k: v for k, v in rec.items() if k not in ("versions", "machine")}), flush=True
                        )
                # After every measurement, so that an interrupted run keeps what it measured.
                args.out.write_text(json.dumps(records, indent=1) + "\n")
            del model, reference, canonical


if __name__ == "__main__":
    main()
