"""Held-out fill-mask accuracy of an M2-BERT MLM, against always guessing the most frequent token.

In each held-out line one token, drawn with a fixed seed among the line's WordPiece tokens, is replaced by [MASK];
the line is padded to the model's maximum length, the way M2-BERT models are used (their long convolutions read
the padding), and the model's top-1 prediction over the tokenizer's vocabulary is compared with the hidden token.
The baseline always answers the most frequent token of the training corpus. The held-out lines of the demo corpus
are short single sentences (WordNet usage examples and chat lines), so the model has little context to go on. Each
file of the held-out folder (one per source) is measured, and all of them together.

Usage: python recipes/demo_model/evaluate_demo_model.py [MODEL] --corpus DIR [--heldout DIR] [--train FILE] [--seed S]
(MODEL defaults to the demo model shipped in the package.)
"""

import argparse
import json
import sys
from pathlib import Path

# m2bert_hf_mlx before mlx.core: on Linux it gives MLX's CPU back end an optimized BLAS (m2bert_hf_mlx.cpu_blas).
import m2bert_hf_mlx  # noqa: F401  # isort: skip

import mlx.core as mx
import numpy as np

from m2bert_hf_mlx import DEMO_MODEL, M2BertForMaskedLM
from m2bert_hf_mlx.tokenization import load_tokenizer

SEED = 0
BATCH_SIZE = 128


def mask_one_token(lines, tokenizer, max_length, seed=SEED):
    """(input_ids (N, max_length) with one [MASK] per line, masked positions (N,), hidden token ids (N,))."""
    encoded = tokenizer(lines, truncation=True, max_length=max_length, padding="max_length", return_tensors="np")
    input_ids = encoded["input_ids"].astype(np.int32)
    specials = [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id]
    maskable = ~np.isin(input_ids, specials)
    keep = maskable.any(axis=1)
    input_ids, maskable = input_ids[keep], maskable[keep]
    rng = np.random.default_rng(seed)
    positions = np.array([rng.choice(np.flatnonzero(row)) for row in maskable], dtype=np.int32)
    rows = np.arange(len(input_ids))
    targets = input_ids[rows, positions].copy()
    input_ids[rows, positions] = tokenizer.mask_token_id
    return input_ids, positions, targets


def unigram_counts(input_ids, tokenizer):
    """How often each token id occurs in tokenized text, special tokens left out."""
    counts = np.bincount(input_ids.reshape(-1), minlength=len(tokenizer))
    counts[tokenizer.all_special_ids] = 0
    return counts


def top1_predictions(model, input_ids, positions, vocab_size, batch_size=BATCH_SIZE):
    """The model's arg max over the first `vocab_size` tokens at one position per row. The prediction head runs on
    those positions only: it is per position, so this equals the arg max of the full logits there."""
    model.eval()
    predictions = []
    for start in range(0, len(input_ids), batch_size):
        ids = mx.array(input_ids[start : start + batch_size])
        rows = mx.arange(ids.shape[0])
        hidden = model.bert(ids).last_hidden_state[rows, mx.array(positions[start : start + batch_size])]
        logits = model.cls.predictions(hidden, model.bert.embeddings.word_embeddings)[:, :vocab_size]
        predictions.append(np.array(logits.argmax(axis=-1)))
    return np.concatenate(predictions)


def evaluate(model, tokenizer, heldout_lines, baseline_token, seed=SEED):
    """Top-1 accuracy of the model and of always answering `baseline_token`, on one masked token per line."""
    input_ids, positions, targets = mask_one_token(heldout_lines, tokenizer, model.config.max_sequence_length, seed)
    predictions = top1_predictions(model, input_ids, positions, len(tokenizer))
    real_tokens = (~np.isin(input_ids, [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id])).sum(
        axis=1
    )
    return {
        "lines": int(len(targets)),
        "mean_tokens_per_line": float(real_tokens.mean()),
        "top1_accuracy": float((predictions == targets).mean()),
        "baseline_token": tokenizer.convert_ids_to_tokens(int(baseline_token)),
        "baseline_accuracy": float((targets == baseline_token).mean()),
    }


def evaluate_heldout(model, tokenizer, folder, baseline_token, seed=SEED):
    """`evaluate` on each `*.txt` file of `folder` (keyed by its name without .txt), and "all": the same lines and
    masks together (line-weighted means)."""
    paths = sorted(Path(folder).glob("*.txt"))
    if not paths:
        raise FileNotFoundError(
            f"{folder} holds no held-out .txt file: build the corpus with recipes/demo_model/prepare_corpus.py."
        )
    results = {path.stem: evaluate(model, tokenizer, read_lines(path), baseline_token, seed) for path in paths}
    lines = sum(result["lines"] for result in results.values())
    results["all"] = {"lines": lines, "baseline_token": results[paths[0].stem]["baseline_token"]} | {
        key: sum(result[key] * result["lines"] for result in results.values()) / lines
        for key in ("mean_tokens_per_line", "top1_accuracy", "baseline_accuracy")
    }
    return results


def read_lines(path):
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=str(DEMO_MODEL), help="MLX model folder (default: the demo model)")
    parser.add_argument("--corpus", type=Path, required=True, help="the folder prepare_corpus.py wrote")
    parser.add_argument(
        "--heldout", type=Path, help="folder of held-out text files, one line each (default: CORPUS/heldout)"
    )
    parser.add_argument("--train", type=Path, help="training text, for the baseline (default: CORPUS/train.txt)")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the masked positions")
    args = parser.parse_args()
    args.heldout = args.heldout or args.corpus / "heldout"
    args.train = args.train or args.corpus / "train.txt"
    for path in (args.heldout, args.train):
        if not path.exists():
            sys.exit(
                f"{path} does not exist: build the corpus with recipes/demo_model/prepare_corpus.py, or pass its path."
            )
    model = M2BertForMaskedLM.from_pretrained(args.model, dtype="float32")
    tokenizer = load_tokenizer(args.model)
    # Counted on lines cut at the model's length, as training saw them.
    train_ids = tokenizer(
        read_lines(args.train),
        truncation=True,
        max_length=model.config.max_sequence_length,
        return_attention_mask=False,
    )["input_ids"]
    counts = unigram_counts(np.concatenate([np.asarray(ids) for ids in train_ids]), tokenizer)
    print(json.dumps(evaluate_heldout(model, tokenizer, args.heldout, int(counts.argmax()), args.seed), indent=2))


if __name__ == "__main__":
    main()
