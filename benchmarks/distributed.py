"""Embedding throughput and training step time of 1 and N processes started by `mlx.launch`, and their scaling.

    python benchmarks/distributed.py --length 512 --texts 8 --batch-size 2 --train-batch 16 --steps 3 --direct \
        --threads-per-rank 1 --out benchmarks/results/distributed-cpu.json
    python benchmarks/distributed.py --backend nccl --length 2048 8192 --texts 64 --train-batch 256 \
        --out benchmarks/results/distributed-h200x2.json      # one process per GPU

For each world size the script launches itself (`mlx.launch -n N --backend B`, or plainly for N = 1) as a user's
job would run. Embedding: `embed_corpus` over the ranks of `--texts` synthetic texts that fill the M2-BERT-80M
retrieval encoder's `--length` (random weights; batches of `--batch-size`), after one warm-up batch per rank;
throughput in tokens/s, and whether the embeddings equal one process's bit for bit. Training: the data-parallel MLM
step of the demo model's configuration (dropout off, so that runs compare) on a global batch of `--train-batch`
packed examples of 128 tokens, median of `--steps` steps after one warm-up, and of the gradient exchange alone
(`nn.utils.average_gradients`); and the largest difference of the loss curve from one process's. Scaling
efficiency: the 1-process time divided by N times the N-process time.
"""

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# m2bert_hf_mlx before mlx.core: on Linux it gives MLX's CPU back end an optimized BLAS (m2bert_hf_mlx.cpu_blas).
import m2bert_hf_mlx  # noqa: F401  # isort: skip

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from _timing import median_seconds
from mlx.utils import tree_map

from m2bert_hf_mlx import M2BertConfig, M2BertModel
from m2bert_hf_mlx.distributed import embed_corpus, init_group
from m2bert_hf_mlx.tokenization import load_tokenizer
from m2bert_hf_mlx.training import MaskedLMData

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes" / "demo_model"))
from train_demo_model import MAX_LENGTH  # noqa: E402
from training_step import demo_trainer  # noqa: E402

RETRIEVAL_PRESET = "m2-bert-80m-2k-retrieval"
WORDS = "the of and a to in is was for on that with as by it from at his an were are which this be".split()


def synthetic_texts(n, tokens, seed=0):
    """Texts of `tokens` - 2 words each, one token per word in bert-base-uncased: with [CLS] and [SEP] they fill L."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=tokens - 2)) for _ in range(n)]


def barrier(group):
    if group.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))


def embed_worker(group, length, texts, batch_size, out):
    config = M2BertConfig.from_preset(RETRIEVAL_PRESET, max_position_embeddings=length, long_conv_l_max=length)
    mx.random.seed(0)
    model = M2BertModel(config, add_pooling_layer=True)
    model.eval()
    mx.eval(model.parameters())
    corpus = synthetic_texts(texts, length)
    embed_corpus(
        model,
        synthetic_texts(batch_size * group.size(), length, seed=1),
        group=group,
        batch_size=batch_size,
        show_progress_bar=False,
    )
    results = []

    def embed():
        barrier(group)
        results.append(embed_corpus(model, corpus, group=group, batch_size=batch_size, show_progress_bar=False))

    seconds = median_seconds(embed, 1)
    embeddings = results[0]
    if group.rank() == 0:
        np.save(out.with_suffix(".npy"), embeddings)
        out.write_text(json.dumps({"seconds": seconds, "tokens_per_s": texts * length / seconds}))


def train_worker(group, batch_size, steps, out):
    tokenizer = load_tokenizer(None, model_max_length=MAX_LENGTH)
    lines = synthetic_texts(batch_size * (steps + 1) * 4, 30, seed=2)
    data = MaskedLMData(lines, tokenizer, MAX_LENGTH, pack=True)
    # Without dropout, so that the ranks' losses equal one process's.
    with demo_trainer(data, batch_size, dropout=False, group=group) as (model, trainer):
        losses = []

        def step():
            barrier(group)
            losses.append(trainer._train_step()[0])

        step_seconds = median_seconds(step, steps, warmup=1)
        # The exchange alone: averaging a step's gradients across the ranks.
        grads = tree_map(mx.zeros_like, model.trainable_parameters())

        def exchange():
            barrier(group)
            mx.eval(nn.utils.average_gradients(grads, group=group))

        exchange_seconds = median_seconds(exchange, steps)
    if group.rank() == 0:
        out.write_text(
            json.dumps(
                {
                    "step_ms": step_seconds * 1000,
                    "gradient_exchange_ms": exchange_seconds * 1000,
                    "losses": losses,
                }
            )
        )


def free_port_pair(count):
    while True:
        port = random.randint(20000, 60000)
        try:
            sockets = [socket.socket() for _ in range(count)]
            for i, s in enumerate(sockets):
                s.bind(("127.0.0.1", port + i))
            return port
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()


def run_worker(ranks, backend, argv, scratch, direct=False, threads=None):
    """Run the worker on `ranks` processes: under mlx.launch, or with `direct` started here with the environment
    the launcher gives the ring back end (MLX_RANK, MLX_HOSTFILE), to tell the launcher's own cost apart. `threads`
    caps each process's BLAS threads."""
    command = [sys.executable, __file__, "--worker", *argv]
    env = dict(os.environ)
    if threads:
        env.update({name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    if direct:
        port = free_port_pair(ranks)
        hostfile = scratch / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(ranks)]))
        processes = [
            subprocess.Popen(
                command,
                env={**env, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r in range(ranks)
        ]
        outputs = [p.communicate()[0] for p in processes]
        if any(p.returncode for p in processes):
            sys.exit(f"{' '.join(command)} failed:\n" + "\n".join(outputs))
        return
    if ranks > 1:
        launcher = str(Path(sys.executable).with_name("mlx.launch"))
        command = [
            launcher,
            "-n",
            str(ranks),
            "--backend",
            backend,
            "--starting-port",
            str(free_port_pair(ranks)),
            "--",
            *command,
        ]
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
    if result.returncode != 0 or "[WARN]" in result.stderr:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes (default: 1 2)")
    parser.add_argument("--backend", default="ring", help="mlx.launch back end (default: ring)")
    parser.add_argument("--length", type=int, nargs="+", default=[512], help="embedding lengths (default: 512)")
    parser.add_argument("--texts", type=int, default=8, help="texts embedded per length (default: 8)")
    parser.add_argument("--batch-size", type=int, default=2, help="embedding batch size (default: 2)")
    parser.add_argument("--train-batch", type=int, default=16, help="global training batch (default: 16)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (default: 5)")
    parser.add_argument(
        "--direct",
        action="store_true",
        help="also start the ring ranks without mlx.launch, to measure what the launcher costs",
    )
    parser.add_argument(
        "--threads-per-rank",
        type=int,
        help="also run the ranks under mlx.launch with this many BLAS threads each (OMP/MKL/OPENBLAS_NUM_THREADS)",
    )
    parser.add_argument("--out", type=Path, help="write the results there as JSON")
    parser.add_argument("--worker", choices=["embed", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        group = init_group()
        if args.worker == "embed":
            embed_worker(group, args.length[0], args.texts, args.batch_size, args.result)
        else:
            train_worker(group, args.train_batch, args.steps, args.result)
        return

    report = {
        "device": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "mlx": mx.__version__,
        "backend": args.backend,
        "default_device": str(mx.default_device()),
        "embedding": [],
        "training": [],
    }
    # (ranks, started without mlx.launch, BLAS threads per rank or None for the library's default)
    runs = [(ranks, False, None) for ranks in args.ranks]
    runs += [(ranks, True, None) for ranks in args.ranks if args.direct and ranks > 1]
    runs += [(ranks, False, args.threads_per_rank) for ranks in args.ranks if args.threads_per_rank and ranks > 1]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for length in args.length:
            single = None
            for ranks, direct, threads in runs:
                result = scratch / f"embed-{length}-{ranks}-{direct}-{threads}.json"
                run_worker(
                    ranks,
                    args.backend,
                    [
                        "embed",
                        "--length",
                        str(length),
                        "--texts",
                        str(args.texts),
                        "--batch-size",
                        str(args.batch_size),
                        "--result",
                        str(result),
                    ],
                    scratch,
                    direct,
                    threads,
                )
                record = {
                    "length": length,
                    "ranks": ranks,
                    "launcher": "direct" if direct else "mlx.launch",
                    "blas_threads": threads or "default",
                    **json.loads(result.read_text()),
                }
                embeddings = np.load(result.with_suffix(".npy"))
                if single is None:
                    single = (record, embeddings)
                record["equal_to_1_process"] = bool(np.array_equal(embeddings, single[1]))
                record["max_abs_difference"] = float(np.abs(embeddings - single[1]).max())
                record["efficiency"] = record["tokens_per_s"] / (ranks * single[0]["tokens_per_s"])
                report["embedding"].append(record)
                print(json.dumps(record))
        single = None
        for ranks, direct, threads in runs:
            result = scratch / f"train-{ranks}-{direct}-{threads}.json"
            run_worker(
                ranks,
                args.backend,
                ["train", "--train-batch", str(args.train_batch), "--steps", str(args.steps), "--result", str(result)],
                scratch,
                direct,
                threads,
            )
            record = {
                "batch_size": args.train_batch,
                "max_length": MAX_LENGTH,
                "ranks": ranks,
                "launcher": "direct" if direct else "mlx.launch",
                "blas_threads": threads or "default",
                **json.loads(result.read_text()),
            }
            single = single or record
            pairs = zip(record["losses"], single["losses"], strict=True)
            record["max_loss_difference"] = max(abs(a - b) for a, b in pairs)
            record["efficiency"] = single["step_ms"] / (ranks * record["step_ms"])
            report["training"].append(record)
            print(json.dumps(record))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
