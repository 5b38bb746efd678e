"""Time of one training step of the demo model's configuration, with and without `mx.compile`, on this device.

    python benchmarks/training_step.py --out benchmarks/results/training-step-h100.json

The model is recipes/demo_model/train_demo_model.py's (hidden size 192, 5 layers, maximum length 128, dropout 0.1),
trained with the package's Trainer on packed MLM examples (batch 256 x 128 tokens, AdamW, clipping). Each record is the
median wall time of `--steps` steps after `--warmup` (the warm-up includes compiling), for a whole step and for
its two parts: the forward and backward passes of the batch, and the clipped AdamW update.
"""

import argparse
import contextlib
import json
import platform
import sys
import tempfile
from pathlib import Path

# m2bert_hf_mlx before mlx.core: on Linux it gives MLX's CPU back end an optimized BLAS (m2bert_hf_mlx.cpu_blas).
import m2bert_hf_mlx  # noqa: F401  # isort: skip

import mlx.core as mx
import numpy as np
from _timing import median_seconds

from m2bert_hf_mlx import M2BertConfig, M2BertForMaskedLM
from m2bert_hf_mlx.tokenization import load_tokenizer
from m2bert_hf_mlx.training import MaskedLMData, Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes" / "demo_model"))
from train_demo_model import BASE_PRESET, DEMO_CONFIG, MAX_LENGTH  # noqa: E402


@contextlib.contextmanager
def demo_trainer(data, batch_size, *, compile_=False, dropout=True, group=None):
    """(model, its Trainer) of the demo configuration on `data`, checkpointing into a temporary folder."""
    mx.random.seed(0)
    config = DEMO_CONFIG if dropout else {**DEMO_CONFIG, "hidden_dropout_prob": 0.0}
    model = M2BertForMaskedLM(M2BertConfig.from_preset(BASE_PRESET, **config))
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=10**6,
            batch_size=batch_size,
            max_length=MAX_LENGTH,
            learning_rate=1e-3,
            warmup_steps=100,
            compile=compile_,
        )
        yield model, Trainer(model, args, data, log=lambda line: None, group=group)


def measure(data, batch_size, compile_, warmup, steps):
    with demo_trainer(data, batch_size, compile_=compile_) as (model, trainer):
        args = trainer.args
        record = {"compile": compile_, "step_ms": median_seconds(trainer._train_step, steps, warmup=warmup) * 1000}
        batch = data.batch(np.arange(batch_size), np.random.default_rng(0), args.mlm_probability)
        total = mx.array(float(data.count(batch)))

        def forward_backward():
            mx.eval(trainer._loss_and_grads(batch, total))

        record["forward_backward_ms"] = median_seconds(forward_backward, steps, warmup=warmup) * 1000
        (_, _), grads = trainer._loss_and_grads(batch, total)
        mx.eval(grads)

        def update():
            mx.eval(trainer._clip_and_update(grads), model.parameters(), trainer.optimizer.state)

        record["update_ms"] = median_seconds(update, steps, warmup=warmup) * 1000
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, help="write the records as JSON here")
    args = parser.parse_args()
    tokenizer = load_tokenizer(None, model_max_length=MAX_LENGTH)
    # Random words: the step's cost depends on the shapes only, and packing fills the examples as real text does.
    words = np.array(list(tokenizer.vocab))[1000:]
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, rng.integers(5, 60))) for _ in range(4 * args.batch_size)]
    data = MaskedLMData(lines, tokenizer, MAX_LENGTH, pack=True)
    result = {
        "device": mx.device_info().get("device_name", platform.processor()),
        "mlx": mx.__version__,
        "batch_size": args.batch_size,
        "max_length": MAX_LENGTH,
        "records": [],
    }
    for compile_ in (False, True):
        record = measure(data, args.batch_size, compile_, args.warmup, args.steps)
        print(json.dumps(record), flush=True)
        result["records"].append(record)
        if args.out:  # after every measurement, so that an interrupted run keeps what it measured
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    result["speedup"] = result["records"][0]["step_ms"] / result["records"][1]["step_ms"]
    print(f"compiled step {result['speedup']:.2f}x faster", flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
