"""Training M2-BERT in MLX: masked-language-model pretraining, sequence classification and contrastive embeddings.

A small trainer, not a framework. `Trainer(model, args, train_data, eval_data).train()` runs AdamW with linear
warm-up and cosine decay, global gradient-norm clipping and gradient accumulation, evaluates every `eval_steps`,
and writes checkpoints (`save_pretrained` folders plus the optimizer state) that `train(resume=True)` continues
exactly. The `train` sub-command of `m2bert-mlx` wraps it.

Data. Every example is one line of text (MLM), one text or text pair with a label (classification, TSV), or a
query and its positive passage (contrastive, TSV), encoded as `[CLS] ... [SEP]` and padded with `[PAD]` to
`max_length`: the long convolutions do not read the attention mask, so padding is part of the input, and M2-BERT
models are used padded to their maximum length. For MLM, `pack` puts as many consecutive lines as fit into each
example instead (`[CLS] a [SEP] b [SEP] ... [PAD]`), which spends less compute on padding when lines are short.

Randomness. The batch order, the MLM masks and the dropout masks of a step are drawn from generators seeded with
(seed, step), so a resumed run repeats exactly what an uninterrupted one does, whatever the step it stopped at: to
the bit on the CPU; on MLX's CUDA back end to rounding, because the word-embedding gradient is summed by atomic
additions in no fixed order (on the H100, two four-step runs of a tiny test model, compiled and not, ended with
54 of its 977k embedding weights apart by at most 3.3e-5).
"""

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from tqdm import tqdm

from ..configuration_m2_bert import PRESETS, M2BertConfig
from ..loading import cast_model
from ..modeling_m2_bert import M2BertForMaskedLM, M2BertForSequenceClassification, M2BertModel
from ..tokenization import has_tokenizer_files, load_tokenizer, save_tokenizer

TASKS = ("mlm", "classification", "contrastive")
TASK_MODELS = {"mlm": M2BertForMaskedLM, "classification": M2BertForSequenceClassification, "contrastive": M2BertModel}
CHECKPOINT_PREFIX = "checkpoint-"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
# Training options a resumed run must share with the run it continues, or it would not repeat it.
_RESUME_INVARIANTS = ("task", "seed", "batch_size", "gradient_accumulation_steps", "max_length", "mlm_probability")
# Evaluation draws its masks from a generator of its own, fixed for the whole run, so evaluations compare.
_EVAL_STREAM = 2**32 - 1


class TrainingError(ValueError):
    """Training that cannot go ahead as asked; the message says what to change."""


@dataclass
class TrainingArguments:
    """What `Trainer` does. `batch_size` is the number of examples per optimizer step, split into
    `gradient_accumulation_steps` micro-batches. `learning_rate` is the peak learning rate of every weight except
    the long-convolution filters, which follow the config's `long_conv_kernel_learning_rate` and `hyena_wd`, and
    their positional features (`pos_emb.z`), which follow `hyena_lr_pos_emb`, as the canonical recipes do; all of
    them warm up linearly over `warmup_steps` and then decay to zero along a cosine. `eval_steps`, `save_steps`
    and `logging_steps` of 0 mean: only at the end. `compile` compiles the training step with `mx.compile`, which
    fuses its many small operations; None (the default) compiles on a GPU, where compiling takes seconds, but not on
    the CPU back end, which compiles with the system C++ compiler: a minute or more the first time per model shape."""

    output_dir: str
    max_steps: int
    task: str = "mlm"
    seed: int = 0
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_length: Optional[int] = None
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    bf16: bool = False
    eval_steps: int = 0
    save_steps: int = 0
    save_total_limit: int = 2
    logging_steps: int = 10
    mlm_probability: float = 0.15
    temperature: float = 0.05
    compile: Optional[bool] = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise TrainingError(f"Unknown task {self.task!r}; choose one of {', '.join(TASKS)}.")
        if self.max_steps < 1:
            raise TrainingError(f"max_steps must be at least 1, got {self.max_steps}.")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise TrainingError("batch_size and gradient_accumulation_steps must be at least 1.")
        if self.batch_size % self.gradient_accumulation_steps:
            raise TrainingError(
                f"batch_size {self.batch_size} is not a multiple of gradient_accumulation_steps "
                f"{self.gradient_accumulation_steps}: each micro-batch must hold the same number of examples."
            )
        if self.task == "contrastive" and self.batch_size // self.gradient_accumulation_steps < 2:
            raise TrainingError("Contrastive training needs at least 2 pairs per micro-batch (the in-batch negatives).")
        if not 0 < self.mlm_probability < 1:
            raise TrainingError(f"mlm_probability must be between 0 and 1, got {self.mlm_probability}.")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise TrainingError(f"warmup_steps must be between 0 and max_steps ({self.max_steps}), got {self.warmup_steps}.")
        if self.save_total_limit < 1:
            raise TrainingError("save_total_limit must be at least 1 (the checkpoint to resume from).")

    @property
    def micro_batch_size(self):
        return self.batch_size // self.gradient_accumulation_steps


# ---------------------------------------------------------------------------------------------------------------
# Data


def read_lines(path):
    """The non-empty lines of a UTF-8 text file, stripped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise TrainingError(f"Data file {path} does not exist.") from e
    except (OSError, UnicodeDecodeError) as e:
        raise TrainingError(f"Data file {path} cannot be read as UTF-8 text ({e}).") from e
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise TrainingError(f"Data file {path} holds no text: give one example per line.")
    return lines


def read_tsv(path, min_columns, max_columns, layout):
    """Rows of a tab-separated file as lists of fields; `layout` describes the expected columns for errors."""
    rows = []
    for number, line in enumerate(read_lines(path), 1):
        row = line.split("\t")
        if not min_columns <= len(row) <= max_columns or not all(field.strip() for field in row):
            raise TrainingError(
                f"{path}, line {number}: expected {layout} separated by tabs, got {len(row)} field(s): {line[:80]!r}."
            )
        rows.append([field.strip() for field in row])
    return rows


def _padded_count(n):
    """n rounded up to a power of two, or above 512 to a multiple of 512."""
    return max(8, 1 << (n - 1).bit_length()) if n <= 512 else -(-n // 512) * 512


def _encode(tokenizer, texts, pairs, max_length):
    encoded = tokenizer(
        texts, pairs, truncation=True, max_length=max_length, padding="max_length", return_tensors="np",
        return_attention_mask=True, return_token_type_ids=True,
    )
    return {key: encoded[key].astype(np.int32) for key in ("input_ids", "token_type_ids", "attention_mask")}


def _pack(tokenizer, lines, max_length):
    """Greedy packing of consecutive lines into `[CLS] a [SEP] b [SEP] ...` rows of `max_length`, padded."""
    pieces = tokenizer(lines, add_special_tokens=False, truncation=True, max_length=max_length - 2,
                       return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    rows, row = [], [tokenizer.cls_token_id]
    for piece in pieces:
        if len(row) + len(piece) + 1 > max_length:
            rows.append(row)
            row = [tokenizer.cls_token_id]
        row.extend([*piece, tokenizer.sep_token_id])
    if len(row) > 1:
        rows.append(row)
    input_ids = np.full((len(rows), max_length), tokenizer.pad_token_id, dtype=np.int32)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = row
    attention_mask = (input_ids != tokenizer.pad_token_id).astype(np.int32)
    return {"input_ids": input_ids, "token_type_ids": np.zeros_like(input_ids), "attention_mask": attention_mask}


class MaskedLMData:
    """Lines for masked-language modelling: each step masks `mlm_probability` of the tokens of its lines (never
    [CLS], [SEP] or [PAD], and at least one per example), replacing 80% with [MASK], 10% with a random token and
    leaving 10% unchanged; the loss is computed on those positions only.

    Each line is an example of its own, `[CLS] line [SEP]` padded to `max_length`, unless `pack`: then consecutive
    lines share an example, `[CLS] line [SEP] line [SEP] ... [PAD]`, as many as fit in `max_length` (a longer line
    is cut and stands alone). Packing short lines wastes less compute on padding."""

    def __init__(self, lines, tokenizer, max_length, pack=False):
        if pack:
            self.encoded = _pack(tokenizer, lines, max_length)
        else:
            self.encoded = _encode(tokenizer, lines, None, max_length)
        self.mask_token_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.maskable = ~np.isin(self.encoded["input_ids"], [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id])
        if not self.maskable.any(axis=1).all():
            empty = int(np.flatnonzero(~self.maskable.any(axis=1))[0])
            raise TrainingError(f"Example {empty + 1} of the data has no token to mask after tokenization.")

    def __len__(self):
        return len(self.encoded["input_ids"])

    def batch(self, indices, rng, mlm_probability):
        input_ids = self.encoded["input_ids"][indices].copy()
        maskable = self.maskable[indices]
        chosen = maskable & (rng.random(input_ids.shape) < mlm_probability)
        # An example with no masked token would teach nothing; short ones get one.
        for row in np.flatnonzero(~chosen.any(axis=1)):
            chosen[row, rng.choice(np.flatnonzero(maskable[row]))] = True
        targets = input_ids[chosen]
        action = rng.random(targets.shape)
        replaced = np.where(action < 0.8, self.mask_token_id, targets)
        random_tokens = rng.integers(0, self.vocab_size, targets.shape)
        input_ids[chosen] = np.where((action >= 0.8) & (action < 0.9), random_tokens, replaced)
        # The number of masked tokens varies from batch to batch; padding it up to a few sizes (extra positions
        # weigh 0) lets the compiled training step be reused instead of traced again for every batch.
        padding = _padded_count(targets.size) - targets.size
        return {
            "input_ids": mx.array(input_ids),
            "positions": mx.array(np.pad(np.flatnonzero(chosen), (0, padding)).astype(np.int32)),
            "targets": mx.array(np.pad(targets, (0, padding)).astype(np.int32)),
            "weights": mx.array(np.pad(np.ones(targets.size, np.float32), (0, padding))),
        }

    @staticmethod
    def count(batch):
        return int(batch["weights"].sum().item())


class ClassificationData:
    """Texts (or text pairs) with integer labels, one example per row."""

    def __init__(self, texts, labels, tokenizer, max_length, text_pairs=None):
        if len(texts) != len(labels) or (text_pairs is not None and len(text_pairs) != len(texts)):
            raise TrainingError("texts, text_pairs and labels must have the same length.")
        self.encoded = _encode(tokenizer, texts, text_pairs, max_length)
        self.labels = np.asarray(labels)

    def __len__(self):
        return len(self.labels)

    def batch(self, indices, rng, mlm_probability):
        batch = {key: mx.array(value[indices]) for key, value in self.encoded.items()}
        batch["labels"] = mx.array(self.labels[indices])
        return batch

    @staticmethod
    def count(batch):
        return batch["labels"].shape[0]


class ContrastiveData:
    """(query, positive passage) pairs; the other passages of a micro-batch are each query's negatives."""

    def __init__(self, queries, positives, tokenizer, max_length):
        if len(queries) != len(positives):
            raise TrainingError("queries and positives must have the same length.")
        self.queries = _encode(tokenizer, queries, None, max_length)
        self.positives = _encode(tokenizer, positives, None, max_length)

    def __len__(self):
        return len(self.queries["input_ids"])

    def batch(self, indices, rng, mlm_probability):
        # Queries and passages go through the encoder as one batch: queries first, then their positives.
        return {
            key: mx.array(np.concatenate([self.queries[key][indices], self.positives[key][indices]]))
            for key in ("input_ids", "attention_mask")
        }

    @staticmethod
    def count(batch):
        return batch["input_ids"].shape[0] // 2


def load_task_data(task, path, tokenizer, max_length, label2id=None, pack=False):
    """The training data of `task` from a file: text lines (mlm, packed into shared examples with `pack`),
    `text[<TAB>text_pair]<TAB>label` rows (classification; labels are names, mapped through `label2id`, built from
    the sorted names when None) or `query<TAB>positive` rows (contrastive). Returns (data, label2id)."""
    if pack and task != "mlm":
        raise TrainingError(f"Packing joins lines of text for masked-language modelling; task {task!r} has one example per row.")
    if task == "mlm":
        return MaskedLMData(read_lines(path), tokenizer, max_length, pack), None
    if task == "contrastive":
        rows = read_tsv(path, 2, 2, "a query and a positive passage")
        return ContrastiveData([r[0] for r in rows], [r[1] for r in rows], tokenizer, max_length), None
    rows = read_tsv(path, 2, 3, "a text (and optionally a second text) and a label")
    if len({len(r) for r in rows}) > 1:
        raise TrainingError(f"{path} mixes rows with and without a second text; give every row the same columns.")
    names = [r[-1] for r in rows]
    if label2id is None:
        label2id = {name: i for i, name in enumerate(sorted(set(names), key=_label_order))}
    unknown = sorted(set(names) - set(label2id))
    if unknown:
        raise TrainingError(f"{path} has labels {unknown[:10]} that the training data does not have ({sorted(label2id)}).")
    pairs = [r[1] for r in rows] if len(rows[0]) == 3 else None
    data = ClassificationData([r[0] for r in rows], [label2id[n] for n in names], tokenizer, max_length, pairs)
    return data, label2id


def _label_order(name):
    # Numeric labels sort as numbers ("2" before "10"), names alphabetically.
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


# ---------------------------------------------------------------------------------------------------------------
# Losses: each returns (sum of per-example or per-token losses, number of correct predictions).


def masked_lm_loss_sum(model, batch):
    """Cross-entropy summed over the masked positions (each weighted by `batch["weights"]`: 1, or 0 for padding).
    The prediction head (transform and tied decoder) runs on those positions only, which is the model's own loss
    at a fraction of the cost of the full vocabulary logits."""
    hidden = model.bert(batch["input_ids"]).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])[batch["positions"]]
    logits = model.cls.predictions(hidden, model.bert.embeddings.word_embeddings).astype(mx.float32)
    weights = batch["weights"]
    loss = (nn.losses.cross_entropy(logits, batch["targets"]) * weights).sum()
    return loss, ((logits.argmax(axis=-1) == batch["targets"]) * weights).sum()


def classification_loss_sum(model, batch):
    out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], labels=batch["labels"])
    n = batch["labels"].shape[0]
    correct = (out.logits.argmax(axis=-1) == batch["labels"]).sum() if model.num_labels > 1 else mx.array(0)
    return out.loss * n, correct


def contrastive_loss_sum(model, batch, temperature):
    """In-batch InfoNCE on the cosine similarity of the pooled embeddings: each query against every passage of the
    micro-batch, its own positive being the right answer."""
    pooled = model(batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output.astype(mx.float32)
    pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    queries, passages = mx.split(pooled, 2)
    scores = queries @ passages.T / temperature
    targets = mx.arange(scores.shape[0])
    loss = nn.losses.cross_entropy(scores, targets, reduction="sum")
    return loss, (scores.argmax(axis=-1) == targets).sum()


# ---------------------------------------------------------------------------------------------------------------
# Optimizer


def _is_filter_mlp(path, _):
    return ".implicit_filter" in path or path.endswith(".freq")


def _is_filter_positions(path, _):
    return path.endswith("pos_emb.z")


def _schedule(peak, args):
    """Linear warm-up to `peak` over `warmup_steps` (starting at peak / warmup_steps, not at zero), then a cosine
    decay to zero at `max_steps`. `step` counts the updates made before the current one."""
    warmup, decay_steps = args.warmup_steps, max(args.max_steps - args.warmup_steps, 1)

    def learning_rate(step):
        step = step.astype(mx.float32)
        progress = mx.clip((step - warmup) / decay_steps, 0.0, 1.0)
        return mx.where(step < warmup, peak * (step + 1) / max(warmup, 1), 0.5 * peak * (1 + mx.cos(math.pi * progress)))

    return learning_rate


def build_optimizer(config, args):
    """AdamW (with bias correction) in three groups: the long-conv filter MLPs and their sine frequencies
    (`long_conv_kernel_learning_rate`, `hyena_wd`), the filters' positional features (`hyena_lr_pos_emb`, no
    weight decay), and every other weight (`args.learning_rate`, `args.weight_decay`)."""

    def adamw(peak, weight_decay):
        return optim.AdamW(_schedule(peak, args), betas=[0.9, 0.98], eps=1e-6, weight_decay=weight_decay, bias_correction=True)

    return optim.MultiOptimizer(
        [
            adamw(config.long_conv_kernel_learning_rate, config.hyena_wd),
            adamw(config.hyena_lr_pos_emb, 0.0),
            adamw(args.learning_rate, args.weight_decay),
        ],
        [_is_filter_mlp, _is_filter_positions],
    )


# ---------------------------------------------------------------------------------------------------------------
# Trainer


class Trainer:
    """Trains `model` (the class `TASK_MODELS[args.task]`) on `train_data` (a `MaskedLMData`, `ClassificationData`
    or `ContrastiveData`), evaluating on `eval_data` when given. `tokenizer`, when given, is saved with every
    checkpoint. `log` receives the progress lines (`step=... loss=...`); the progress bar goes to stderr."""

    def __init__(self, model, args, train_data, eval_data=None, tokenizer=None, log=tqdm.write):
        expected = TASK_MODELS[args.task]
        if not isinstance(model, expected):
            raise TrainingError(f"Task {args.task!r} trains a {expected.__name__}, got a {type(model).__name__}.")
        if len(train_data) < args.micro_batch_size:
            raise TrainingError(
                f"The training data has {len(train_data)} examples, fewer than one micro-batch "
                f"({args.micro_batch_size}); lower the batch size or give more data."
            )
        self.model, self.args, self.tokenizer, self.log = model, args, tokenizer, log
        self.train_data, self.eval_data = train_data, eval_data
        if args.bf16:
            cast_model(model, "bfloat16")
        self.optimizer = build_optimizer(model.config, args)
        self.optimizer.init(model.trainable_parameters())
        self._compile = args.compile if args.compile is not None else mx.default_device().type == mx.gpu
        self._update = None
        self.step = 0
        self.history = []
        self.runtime_s = 0.0
        self._eval_batches = None
        self._value_and_grad = None
        self._epoch_order = (None, None)

    # The objective of the task, for one micro-batch: (loss sum / normalizer, number correct).
    def _loss(self, batch, normalizer):
        loss, correct = self._loss_sum(batch)
        return loss / normalizer, correct

    def _loss_sum(self, batch):
        if self.args.task == "mlm":
            return masked_lm_loss_sum(self.model, batch)
        if self.args.task == "classification":
            return classification_loss_sum(self.model, batch)
        return contrastive_loss_sum(self.model, batch, self.args.temperature)

    def _indices(self, step):
        """The examples of a step: consecutive slices of a permutation of the data drawn anew for each epoch."""
        n, size = len(self.train_data), self.args.batch_size
        positions = np.arange(step * size, (step + 1) * size)
        indices = np.empty(size, dtype=np.int64)
        for epoch in np.unique(positions // n):
            if self._epoch_order[0] != epoch:
                self._epoch_order = (epoch, np.random.default_rng([self.args.seed, int(epoch)]).permutation(n))
            in_epoch = positions // n == epoch
            indices[in_epoch] = self._epoch_order[1][positions[in_epoch] % n]
        return indices

    def _train_step(self):
        args = self.args
        rng = np.random.default_rng([args.seed, self.step, 0])
        indices = self._indices(self.step).reshape(args.gradient_accumulation_steps, args.micro_batch_size)
        micro_batches = [self.train_data.batch(i, rng, args.mlm_probability) for i in indices]
        # Normalizing each micro-batch by the step's total count makes the summed gradients those of one big batch.
        total = mx.array(float(sum(self.train_data.count(b) for b in micro_batches)))
        self.model.train()
        grads, loss = None, mx.array(0.0)
        for batch in micro_batches:
            mx.random.seed(int(rng.integers(2**63)))
            (micro_loss, _), micro_grads = self._loss_and_grads(batch, total)
            grads = micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)
            loss = loss + micro_loss
            mx.eval(grads, loss)
        grad_norm = self._clip_and_update(grads)
        mx.eval(self.model.parameters(), self.optimizer.state, grad_norm)
        self.step += 1
        return loss.item(), grad_norm.item()

    def _loss_and_grads(self, batch, normalizer):
        """((loss, number correct), gradients) of one micro-batch. When compiled, MLX fuses the many small
        element-wise operations of the forward and backward passes, and the graph is not rebuilt in Python at every
        step; the weights are outputs too because computing gradients swaps them for traced copies."""
        if self._value_and_grad is None:
            self._value_and_grad = nn.value_and_grad(self.model, self._loss)
            if self._compile:
                state = [self.model.state, mx.random.state]
                self._value_and_grad = mx.compile(self._value_and_grad, inputs=state, outputs=state)
        return self._value_and_grad(batch, normalizer)

    def _clip_and_update(self, grads):
        """Clip the gradients and apply them; returns their norm before clipping. Uncompiled, the update is a few
        small operations per weight array, whose launches (not their arithmetic) cost a GPU as much as the forward
        and backward passes of a small model. Compiled anew after a checkpoint replaces the optimizer state."""
        if self._update is None:

            def update(grads):
                grads, grad_norm = optim.clip_grad_norm(grads, self.args.max_grad_norm)
                self.optimizer.update(self.model, grads)
                return grad_norm

            state = [self.model.state, self.optimizer.state]
            self._update = mx.compile(update, inputs=state, outputs=state) if self._compile else update
        return self._update(grads)

    def evaluate(self):
        """Mean loss and accuracy on the evaluation data: masked-token top-1 (mlm), label accuracy
        (classification) or in-batch top-1 retrieval (contrastive). The MLM masks are the same at every call."""
        if self.eval_data is None:
            raise TrainingError("No evaluation data: give eval_data (the CLI's --eval-data).")
        if self._eval_batches is None:
            rng = np.random.default_rng([self.args.seed, _EVAL_STREAM])
            size = self.args.micro_batch_size
            order = np.arange(len(self.eval_data))
            self._eval_batches = [
                self.eval_data.batch(order[i : i + size], rng, self.args.mlm_probability) for i in range(0, len(order), size)
            ]
        self.model.eval()
        loss, correct, count = 0.0, 0, 0
        for batch in self._eval_batches:
            batch_loss, batch_correct = self._loss_sum(batch)
            loss += batch_loss.item()
            correct += batch_correct.item()
            count += self.eval_data.count(batch)
        return {"eval_loss": loss / count, "eval_accuracy": correct / count}

    def train(self, resume=False):
        """Run until `args.max_steps`; with `resume`, continue from the latest checkpoint in `args.output_dir`
        (weights, optimizer state, step). Returns the log history (a list of dicts)."""
        args = self.args
        if resume:
            checkpoint = latest_checkpoint(args.output_dir)
            if checkpoint is None:
                raise TrainingError(f"resume: {args.output_dir} holds no {CHECKPOINT_PREFIX}* folder to resume from.")
            self.load_checkpoint(checkpoint)
        if self.step >= args.max_steps:
            self.log(f"Already trained for {self.step} steps (max_steps={args.max_steps}); nothing to do.")
        started, window = time.perf_counter(), []
        with tqdm(total=args.max_steps, initial=self.step, unit="step", dynamic_ncols=True, disable=None) as progress:
            while self.step < args.max_steps:
                loss, grad_norm = self._train_step()
                window.append(loss)
                progress.update()
                progress.set_postfix(loss=f"{loss:.4f}")
                last = self.step == args.max_steps
                if _due(self.step, args.logging_steps, last):
                    self._record(
                        {"step": self.step, "loss": sum(window) / len(window), "grad_norm": grad_norm,
                         "learning_rate": self.optimizer.optimizers[-1].learning_rate.item()}
                    )
                    window = []
                if self.eval_data is not None and _due(self.step, args.eval_steps, last):
                    self._record({"step": self.step, **self.evaluate()})
                if _due(self.step, args.save_steps, last):
                    self.runtime_s += time.perf_counter() - started
                    started = time.perf_counter()
                    self.save_checkpoint()
        self.runtime_s += time.perf_counter() - started
        self.save_model(args.output_dir)
        return self.history

    def _record(self, entry):
        self.history.append(entry)
        self.log(" ".join(f"{k}={_format(v)}" for k, v in entry.items()))

    def save_model(self, folder):
        """The model folder: config.json, weights, tokenizer files and trainer_state.json."""
        folder = Path(folder)
        self.model.save_pretrained(folder)
        if self.tokenizer is not None:
            save_tokenizer(self.tokenizer, folder, model_max_length=self.max_length)
        state = {"step": self.step, "runtime_s": self.runtime_s, "args": asdict(self.args), "log_history": self.history}
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    @property
    def max_length(self):
        return self.args.max_length or self.model.config.max_sequence_length

    def save_checkpoint(self):
        """`output_dir/checkpoint-STEP`: the model folder plus the optimizer state. Written under a temporary name
        and renamed, so an interrupted save never leaves a checkpoint that looks complete; only the latest
        `save_total_limit` checkpoints are kept."""
        output = Path(self.args.output_dir)
        final = output / f"{CHECKPOINT_PREFIX}{self.step}"
        partial = output / f".{CHECKPOINT_PREFIX}{self.step}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        self.save_model(partial)
        mx.save_safetensors(str(partial / OPTIMIZER_FILE), dict(tree_flatten(self.optimizer.state)))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in _checkpoints(output)[: -self.args.save_total_limit]:
            shutil.rmtree(old)

    def load_checkpoint(self, folder):
        folder = Path(folder)
        state = json.loads((folder / STATE_FILE).read_text())
        changed = [k for k in _RESUME_INVARIANTS if state["args"].get(k) != getattr(self.args, k)]
        if changed:
            details = ", ".join(f"{k}: {state['args'].get(k)!r} then, {getattr(self.args, k)!r} now" for k in changed)
            raise TrainingError(f"Cannot resume from {folder}: it was trained with other settings ({details}). "
                                "Resume with the same settings, or train into a new output folder.")
        weights = {}
        for path in sorted(folder.glob("model*.safetensors")):
            weights.update(mx.load(str(path)))
        self.model.load_weights(list(weights.items()))
        self.optimizer.state = tree_unflatten(list(mx.load(str(folder / OPTIMIZER_FILE)).items()))
        self._update = None
        self.step, self.runtime_s, self.history = state["step"], state["runtime_s"], state["log_history"]
        mx.eval(self.model.parameters(), self.optimizer.state)


def _due(step, every, last):
    return last or (every > 0 and step % every == 0)


def _format(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _checkpoints(output_dir):
    folders = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()]
    folders = [p for p in folders if p.name[len(CHECKPOINT_PREFIX) :].isdigit() and (p / OPTIMIZER_FILE).is_file()]
    return sorted(folders, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def latest_checkpoint(output_dir):
    """The complete checkpoint of the highest step in `output_dir`, or None."""
    found = _checkpoints(output_dir)
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------------------------
# The `train` sub-command


def register(subparsers):
    parser = subparsers.add_parser(
        "train",
        help="pretrain or fine-tune an M2-BERT model (MLM, classification, contrastive)",
        description="Train an M2-BERT model with MLX on the CPU or GPU: masked-language modelling on a text file "
        "(one example per line), sequence classification on TSV rows (text[<TAB>text pair]<TAB>label) or "
        "contrastive embeddings on TSV pairs (query<TAB>positive passage). Writes the model folder to --output, "
        "and checkpoints that --resume continues.",
    )
    parser.add_argument("--data", required=True, metavar="FILE", help="training data (see above)")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the model and its checkpoints")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=list(PRESETS), metavar="NAME", help=f"a new model of a preset configuration: {', '.join(PRESETS)}")
    source.add_argument("--config", metavar="FILE", help="a new model of a JSON config")
    source.add_argument("--init", metavar="MODEL", help="start from a model folder or Hub repo (fine-tuning)")
    parser.add_argument("--task", choices=TASKS, default="mlm", help="training objective (default: mlm)")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps")
    parser.add_argument("--seed", type=int, required=True, help="seed of the initialisation, data order, masks and dropout")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step (default: 32)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: 1)")
    parser.add_argument("--max-length", type=int, help="tokens per example, padding included (default: the model's maximum)")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default: 5e-4)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: 0.01)")
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default: 0)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clipping (default: 1.0)")
    parser.add_argument("--bf16", action="store_true", help="train with bfloat16 weights (the long-conv filters stay float32)")
    parser.add_argument("--eval-data", metavar="FILE", help="evaluation data, in the format of --data")
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: at the end)")
    parser.add_argument("--save-every", type=int, default=0, help="write a checkpoint every N steps (default: at the end)")
    parser.add_argument("--log-every", type=int, default=10, help="print the mean loss every N steps (default: 10)")
    parser.add_argument("--pack", action="store_true", help="mlm: fill each example with as many consecutive lines as fit")
    parser.add_argument("--mlm-probability", type=float, default=0.15, help="fraction of tokens masked (default: 0.15)")
    parser.add_argument("--temperature", type=float, default=0.05, help="contrastive softmax temperature (default: 0.05)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="compile the training step (default: on a GPU only; the CPU back end compiles slowly)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    parser.set_defaults(func=run_train)


def run_train(args):
    try:
        training_args = TrainingArguments(
            output_dir=args.output, max_steps=args.steps, task=args.task, seed=args.seed, batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum, max_length=args.max_length, learning_rate=args.lr,
            weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm,
            bf16=args.bf16, eval_steps=args.eval_every, save_steps=args.save_every, logging_steps=args.log_every,
            mlm_probability=args.mlm_probability, temperature=args.temperature, compile=args.compile,
        )
        trainer = build_trainer(training_args, preset=args.preset, config=args.config, init=args.init,
                                data=args.data, eval_data=args.eval_data, pack=args.pack)
        trainer.train(resume=args.resume)
    except (TrainingError, ValueError, OSError) as e:
        print(f"m2bert-mlx train: error: {e}", file=sys.stderr)
        return 1
    print(f"Saved the model to {training_args.output_dir}")
    return 0


def build_trainer(args, *, preset=None, config=None, init=None, data, eval_data=None, pack=False):
    """A `Trainer` for `args.task` on the data files (MLM lines packed with `pack`), with a new model of a preset or
    JSON config, or a model loaded from `init` (a folder or Hub repo; task heads it lacks are initialised)."""
    if sum(x is not None for x in (preset, config, init)) != 1:
        raise TrainingError("Give exactly one of preset, config (a new model) or init (a model to start from).")
    mx.random.seed(args.seed)
    tokenizer = load_tokenizer(_tokenizer_source(init))
    if init is not None:
        model_config = M2BertConfig.from_pretrained(init)
    else:
        model_config = M2BertConfig.from_preset(preset) if preset is not None else M2BertConfig.from_json_file(config)
    max_length = args.max_length or model_config.max_sequence_length
    if max_length > model_config.max_sequence_length:
        raise TrainingError(f"max_length {max_length} is longer than the model's maximum of {model_config.max_sequence_length} tokens.")
    if len(tokenizer) > model_config.vocab_size:
        raise TrainingError(f"The tokenizer has {len(tokenizer)} tokens but the model only {model_config.vocab_size} embeddings.")
    train_data, label2id = load_task_data(args.task, data, tokenizer, max_length, pack=pack)
    eval_set = None if eval_data is None else load_task_data(args.task, eval_data, tokenizer, max_length, label2id, pack)[0]

    cls = TASK_MODELS[args.task]
    overrides = {}
    if label2id is not None:
        overrides = {"num_labels": len(label2id), "label2id": label2id, "id2label": {i: n for n, i in label2id.items()}}
    if args.task == "contrastive":
        overrides["add_pooling_layer"] = True
    if init is not None:
        # A head the checkpoint lacks (a new classifier, a pooler) starts from the canonical initialisation.
        model = cls.from_pretrained(init, strict=False, dtype="float32", **overrides)
    else:
        for key, value in overrides.items():
            setattr(model_config, key, value)
        model = cls(model_config)
    return Trainer(model, args, train_data, eval_set, tokenizer=tokenizer)


def _tokenizer_source(init):
    """The model's own tokenizer files when it has them, else (None) bert-base-uncased shipped with the package."""
    if init is None or (Path(init).exists() and not has_tokenizer_files(init)):
        return None
    return init
