"""Throughput of `encode` and of the fill-mask pipeline, against bare forwards of the same model on the same batches.

    python benchmarks/pipelines.py --out benchmarks/results/pipelines-cpu.json
    python benchmarks/pipelines.py --preset m2-bert-80m-2k-retrieval --max-length 2048 --gpu --out ...

A randomly initialised model with the preset's dimensions (at `--max-length`) embeds `--texts` texts whose token
counts spread evenly from 8 to the maximum, as a collection of documents shorter than the context does:
- `encode(padding="max_length")` (the default, the canonical outputs) against a bare `model(ids)` forward over the
  same padded batches, tokenized beforehand: the difference is what tokenizing, padding and gathering cost;
- `encode(padding="longest")`, which sorts the texts by length and pads each batch to its longest;
- the fill-mask pipeline (one [MASK] per text) against bare forwards that compute the full (B, L, 30528) logits,
  as transformers' pipeline does; the pipeline runs the MLM head on the masked positions only.
Each time is the median of `--repeats` runs after one warm-up run.
"""

import argparse
import json
import platform
from pathlib import Path

# m2bert_hf_mlx before mlx.core: on Linux it gives MLX's CPU back end an optimized BLAS (m2bert_hf_mlx.cpu_blas).
import m2bert_hf_mlx  # noqa: F401  # isort: skip

import mlx.core as mx
import numpy as np
from _timing import median_seconds

from m2bert_hf_mlx import M2BertConfig, M2BertForMaskedLM, M2BertModel, __version__, pipeline
from m2bert_hf_mlx.pipelines import default_tokenizer


def corpus(tokenizer, count, max_length, seed=0):
    """Texts of whole-word tokens, from 8 tokens (with [CLS] and [SEP]) to `max_length`, in shuffled order."""
    words = [w for w, i in tokenizer.get_vocab().items() if w.isalpha() and w.islower() and i > 1000]
    rng = np.random.default_rng(seed)
    lengths = np.linspace(8, max_length, count).astype(int) - 2
    return [" ".join(rng.choice(words, size=n)) for n in rng.permutation(lengths)]


def padded_batches(tokenizer, texts, max_length, batch_size):
    ids = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")[
        "input_ids"
    ]
    return [mx.array(ids[i : i + batch_size]) for i in range(0, len(texts), batch_size)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="model dimensions (default: tiny)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="run on MLX's GPU back end")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    mx.set_default_device(mx.gpu if args.gpu else mx.cpu)
    L, B = args.max_length, args.batch_size
    config = M2BertConfig.from_preset(args.preset, max_position_embeddings=L, long_conv_l_max=L, add_pooling_layer=True)
    encoder = M2BertModel(config)
    mlm = M2BertForMaskedLM(config)
    for model in (encoder, mlm):
        model.eval()
        mx.eval(model.parameters())
    tokenizer = default_tokenizer(encoder)
    texts = corpus(tokenizer, args.texts, L)
    batches = padded_batches(tokenizer, texts, L, B)

    def bare_embeddings():
        for ids in batches:
            mx.eval(encoder(ids).pooler_output)

    masked = [text.split(" ", 1)[0] + " [MASK] " + text.split(" ", 2)[-1] for text in texts]
    masked_batches = padded_batches(tokenizer, masked, L, B)
    fill_mask = pipeline("fill-mask", model=mlm, tokenizer=tokenizer)

    def bare_logits():
        for ids in masked_batches:
            mx.eval(mlm(ids).logits)

    seconds = {
        "bare_forward_max_length": median_seconds(bare_embeddings, args.repeats, warmup=1),
        "encode_max_length": median_seconds(
            lambda: encoder.encode(texts, batch_size=B, show_progress_bar=False), args.repeats, warmup=1
        ),
        "encode_longest": median_seconds(
            lambda: encoder.encode(texts, batch_size=B, padding="longest", show_progress_bar=False),
            args.repeats,
            warmup=1,
        ),
        "bare_forward_full_logits": median_seconds(bare_logits, args.repeats, warmup=1),
        "fill_mask_max_length": median_seconds(lambda: fill_mask(masked, batch_size=B), args.repeats, warmup=1),
    }
    record = {
        "preset": args.preset,
        "max_length": L,
        "texts": args.texts,
        "batch_size": B,
        "device": "gpu" if args.gpu else f"cpu ({platform.machine()})",
        "versions": {"mlx": mx.__version__, "m2bert_hf_mlx": __version__, "python": platform.python_version()},
        "seconds": seconds,
        "texts_per_s": {name: args.texts / s for name, s in seconds.items()},
        "encode_overhead_vs_bare_forward": seconds["encode_max_length"] / seconds["bare_forward_max_length"] - 1,
        "longest_speedup_vs_max_length": seconds["encode_max_length"] / seconds["encode_longest"],
        "fill_mask_speedup_vs_full_logits": seconds["bare_forward_full_logits"] / seconds["fill_mask_max_length"],
    }
    print(json.dumps(record, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
