"""Training data: the file readers, the three datasets (MLM lines, classification rows, contrastive pairs)."""

from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import TrainingError


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
        texts,
        pairs,
        truncation=True,
        max_length=max_length,
        padding="max_length",
        return_tensors="np",
        return_attention_mask=True,
        return_token_type_ids=True,
    )
    return {key: encoded[key].astype(np.int32) for key in ("input_ids", "token_type_ids", "attention_mask")}


def _pack(tokenizer, lines, max_length):
    """Greedy packing of consecutive lines into `[CLS] a [SEP] b [SEP] ...` rows of `max_length`, padded."""
    pieces = tokenizer(
        lines,
        add_special_tokens=False,
        truncation=True,
        max_length=max_length - 2,
        return_attention_mask=False,
        return_token_type_ids=False,
    )["input_ids"]
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
        self.maskable = ~np.isin(
            self.encoded["input_ids"], [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id]
        )
        if not self.maskable.any(axis=1).all():
            empty = int(np.flatnonzero(~self.maskable.any(axis=1))[0])
            raise TrainingError(f"Example {empty + 1} of the data has no token to mask after tokenization.")

    def __len__(self):
        return len(self.encoded["input_ids"])

    def batch(self, indices, rng, mlm_probability, rows=slice(None)):
        """The examples `indices`, masked; `rows` keeps a part of them (a rank's share), masked as in the whole."""
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
        original = input_ids[rows].copy()
        input_ids[chosen] = np.where((action >= 0.8) & (action < 0.9), random_tokens, replaced)
        input_ids, chosen = input_ids[rows], chosen[rows]
        targets = original[chosen]
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

    def batch(self, indices, rng, mlm_probability, rows=slice(None)):
        indices = indices[rows]
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

    def batch(self, indices, rng, mlm_probability, rows=slice(None)):
        indices = indices[rows]
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
        raise TrainingError(
            f"Packing joins lines of text for masked-language modelling; task {task!r} has one example per row."
        )
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
        raise TrainingError(
            f"{path} has labels {unknown[:10]} that the training data does not have ({sorted(label2id)})."
        )
    pairs = [r[1] for r in rows] if len(rows[0]) == 3 else None
    data = ClassificationData([r[0] for r in rows], [label2id[n] for n in names], tokenizer, max_length, pairs)
    return data, label2id


def _label_order(name):
    # Numeric labels sort as numbers ("2" before "10"), names alphabetically.
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)
