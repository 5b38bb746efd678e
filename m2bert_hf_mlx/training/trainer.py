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
additions in no fixed order (docs/benchmarks.md records how far apart two runs ended).
"""

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from tqdm import tqdm

from ..checkpoint_reader import checkpoint_keys
from ..distributed import DEFAULT_TIMEOUT, Watchdog, check_same_everywhere, checksum, init_group, rank_rows
from ..errors import TrainingError
from ..loading import cast_model, load_weights, save_safetensors
from ..modeling_m2_bert import (
    M2BertForMaskedLM,
    M2BertForSequenceClassification,
    M2BertModel,
)
from ..publishing import write_atomically
from ..tokenization import save_tokenizer
from .checkpoints import (
    CHECKPOINT_PREFIX,
    OPTIMIZER_FILE,
    STATE_FILE,
    complete_checkpoints,
    latest_checkpoint,
    partial_checkpoints,
)
from .losses import classification_loss_sum, contrastive_loss_sum, masked_lm_loss_sum
from .optimizer import build_optimizer

TASK_MODELS = {"mlm": M2BertForMaskedLM, "classification": M2BertForSequenceClassification, "contrastive": M2BertModel}
# Training options a resumed run must share with the run it continues, or it would not repeat it.
_RESUME_INVARIANTS = ("task", "seed", "batch_size", "gradient_accumulation_steps", "max_length", "mlm_probability")
# Evaluation draws its masks from a generator of its own, fixed for the whole run, so evaluations compare.
_EVAL_STREAM = 2**32 - 1


class Trainer:
    """Trains `model` (the class `TASK_MODELS[args.task]`) on `train_data` (a `MaskedLMData`, `ClassificationData`
    or `ContrastiveData`), evaluating on `eval_data` when given. `tokenizer`, when given, is saved with every
    checkpoint. `log` receives the progress lines (`step=... loss=...`); the progress bar goes to stderr.

    With a `group` of several processes (`m2bert_hf_mlx.distributed.init_group()` under `mlx.launch`), each rank
    runs its contiguous share of every micro-batch and the gradients are averaged across the ranks, weighted so that
    they are those of the whole batch; losses and metrics count every rank's masked tokens or examples. Rank 0 alone
    logs and writes checkpoints. Without dropout the run repeats a single process's to float32 rounding; dropout
    masks are drawn by each rank for its own examples. `timeout` bounds a wait for the other ranks."""

    def __init__(
        self,
        model,
        args,
        train_data,
        eval_data=None,
        tokenizer=None,
        log=tqdm.write,
        group=None,
        timeout=DEFAULT_TIMEOUT,
    ):
        expected = TASK_MODELS[args.task]
        if not isinstance(model, expected):
            raise TrainingError(f"Task {args.task!r} trains a {expected.__name__}, got a {type(model).__name__}.")
        if len(train_data) < args.micro_batch_size:
            raise TrainingError(
                f"The training data has {len(train_data)} examples, fewer than one micro-batch "
                f"({args.micro_batch_size}); lower the batch size or give more data."
            )
        self.group = init_group() if group is None else group
        if args.micro_batch_size % self.group.size():
            raise TrainingError(
                f"Micro-batches of {args.micro_batch_size} examples (batch size / gradient accumulation) cannot be "
                f"shared equally by {self.group.size()} processes; make them a multiple of {self.group.size()}."
            )
        self.is_main = self.group.rank() == 0
        self._watchdog = Watchdog(self.group, timeout, "m2bert-mlx train")
        self.model, self.args, self.tokenizer = model, args, tokenizer
        self.log = log if self.is_main else lambda line: None
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

    # The objective of the task, for one micro-batch (this rank's share): (loss sum / normalizer, number correct).
    def _loss(self, batch, normalizer):
        loss, correct = self._loss_sum(batch, self.group)
        return loss / normalizer, correct

    def _loss_sum(self, batch, group=None):
        """`group`: the ranks sharing the micro-batch, for the contrastive negatives."""
        if self.args.task == "mlm":
            return masked_lm_loss_sum(self.model, batch)
        if self.args.task == "classification":
            return classification_loss_sum(self.model, batch)
        return contrastive_loss_sum(self.model, batch, self.args.temperature, group)

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
        loss, grads = self.step_gradients()
        grad_norm = self._clip_and_update(grads)
        mx.eval(self.model.parameters(), self.optimizer.state, grad_norm)
        self.step += 1
        return loss.item(), grad_norm.item()

    def step_gradients(self):
        """(mean loss, gradients) of the batch of the current step, over every rank of the group."""
        args, group = self.args, self.group
        size, rank = group.size(), group.rank()
        rng = np.random.default_rng([args.seed, self.step, 0])
        indices = self._indices(self.step).reshape(args.gradient_accumulation_steps, args.micro_batch_size)
        rows = rank_rows(args.micro_batch_size, group)
        micro_batches = [self.train_data.batch(i, rng, args.mlm_probability, rows) for i in indices]
        self.model.train()
        with self._watchdog.waiting(f"running step {self.step + 1}"):
            total = mx.array(float(sum(self.train_data.count(b) for b in micro_batches)))
            if size > 1:
                total = mx.distributed.all_sum(total, group=group)
            # Normalizing each micro-batch by the step's total count makes the summed gradients those of one big
            # batch; across ranks, average_gradients divides their sum by the group size, so each counts size times.
            normalizer = total / size
            grads, loss = None, mx.array(0.0)
            for batch in micro_batches:
                seed = int(rng.integers(2**63))
                mx.random.seed((seed + rank) % 2**63)
                (micro_loss, _), micro_grads = self._loss_and_grads(batch, normalizer)
                grads = micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)
                loss = loss + micro_loss
                mx.eval(grads, loss)
            if size > 1:
                grads = nn.utils.average_gradients(grads, group=group)
                loss = mx.distributed.all_sum(loss, group=group) / size
                mx.eval(grads, loss)
        return loss, grads

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
                self.eval_data.batch(order[i : i + size], rng, self.args.mlm_probability)
                for i in range(0, len(order), size)
            ]
        self.model.eval()
        size, rank = self.group.size(), self.group.rank()
        loss, correct, count = 0.0, 0, 0
        # Ranks take whole evaluation batches in turn, so each batch's in-batch negatives are those of one process.
        for batch in self._eval_batches[rank::size]:
            batch_loss, batch_correct = self._loss_sum(batch)
            loss += batch_loss.item()
            correct += batch_correct.item()
            count += self.eval_data.count(batch)
        if size > 1:
            with self._watchdog.waiting("summing the evaluation"):
                sums = mx.distributed.all_sum(mx.array([loss, correct, count]), group=self.group)
                loss, correct, count = sums.tolist()
        return {"eval_loss": loss / count, "eval_accuracy": correct / count}

    def train(self, resume=False):
        """Run until `args.max_steps`; with `resume`, continue from the latest checkpoint in `args.output_dir`
        (weights, optimizer state, step). Returns the log history (a list of dicts)."""
        args = self.args
        # Checkpoints a killed run was writing (see `save_checkpoint`); this run owns the output folder.
        for partial in partial_checkpoints(args.output_dir):
            self.log(f"Removing {partial}, left by a run that did not finish saving it.")
            shutil.rmtree(partial, ignore_errors=True)
        if resume:
            checkpoint = latest_checkpoint(args.output_dir)
            if checkpoint is None:
                raise TrainingError(f"resume: {args.output_dir} holds no {CHECKPOINT_PREFIX}* folder to resume from.")
            self.load_checkpoint(checkpoint)
        digest = checksum(
            dict(tree_flatten(self.model.parameters())),
            dict(tree_flatten(self.optimizer.state)),
            *(x for item in tree_flatten(vars(self.train_data)) for x in item),
            asdict(args),
            self.step,
        )
        check_same_everywhere(self.group, digest, "model, optimizer state, data or arguments", self._watchdog)
        if self.step >= args.max_steps:
            self.log(f"Already trained for {self.step} steps (max_steps={args.max_steps}); nothing to do.")
        started, window = time.perf_counter(), []
        bar = {"disable": None if self.is_main else True}
        with tqdm(total=args.max_steps, initial=self.step, unit="step", dynamic_ncols=True, **bar) as progress:
            while self.step < args.max_steps:
                loss, grad_norm = self._train_step()
                window.append(loss)
                progress.update()
                progress.set_postfix(loss=f"{loss:.4f}")
                last = self.step == args.max_steps
                if _due(self.step, args.logging_steps, last):
                    self._record(
                        {
                            "step": self.step,
                            "loss": sum(window) / len(window),
                            "grad_norm": grad_norm,
                            "learning_rate": self.optimizer.optimizers[-1].learning_rate.item(),
                        }
                    )
                    window = []
                if self.eval_data is not None and _due(self.step, args.eval_steps, last):
                    self._record({"step": self.step, **self.evaluate()})
                if _due(self.step, args.save_steps, last):
                    self.runtime_s += time.perf_counter() - started
                    started = time.perf_counter()
                    if self.is_main:
                        self.save_checkpoint()
        self.runtime_s += time.perf_counter() - started
        if self.is_main:
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

        def write(folder):
            self.save_model(folder)
            save_safetensors(folder / OPTIMIZER_FILE, dict(tree_flatten(self.optimizer.state)))

        write_atomically(output / f"{CHECKPOINT_PREFIX}{self.step}", write)
        for old in complete_checkpoints(output)[: -self.args.save_total_limit]:
            shutil.rmtree(old)

    def load_checkpoint(self, folder):
        folder = Path(folder)
        state = _read_trainer_state(folder / STATE_FILE)
        changed = [k for k in _RESUME_INVARIANTS if state["args"].get(k) != getattr(self.args, k)]
        if changed:
            details = ", ".join(f"{k}: {state['args'].get(k)!r} then, {getattr(self.args, k)!r} now" for k in changed)
            raise TrainingError(
                f"Cannot resume from {folder}: it was trained with other settings ({details}). "
                "Resume with the same settings, or train into a new output folder."
            )
        load_weights(self.model, folder)
        # The header is checked by the package's reader first (offsets, shapes and dtypes against the file's size), so
        # MLX's loader, which keeps the bfloat16 state as it is, reads only a well-formed file.
        checkpoint_keys(folder / OPTIMIZER_FILE)
        self.optimizer.state = tree_unflatten(list(mx.load(str(folder / OPTIMIZER_FILE)).items()))
        self._update = None
        self.step, self.runtime_s, self.history = state["step"], state["runtime_s"], state["log_history"]
        mx.eval(self.model.parameters(), self.optimizer.state)


def _read_trainer_state(path):
    """trainer_state.json of a checkpoint, checked to hold what resuming reads."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TrainingError(f"Cannot resume: {path} cannot be read ({type(e).__name__}).") from e
    valid = (
        isinstance(state, dict)
        and isinstance(state.get("args"), dict)
        and type(state.get("step")) is int
        and state["step"] >= 0
        and type(state.get("runtime_s")) in (int, float)
        and isinstance(state.get("log_history"), list)
    )
    if not valid:
        raise TrainingError(f"Cannot resume: {path} is not a trainer state this package wrote (args, step, ...).")
    return state


def _due(step, every, last):
    return last or (every > 0 and step % every == 0)


def _format(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)
