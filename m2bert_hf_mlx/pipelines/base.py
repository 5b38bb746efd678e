"""The common base of the pipelines (and of `encode`): the padding rule, tokenization, checks and batching.

The padding rule. M2-BERT's sequence mixer ignores the attention mask, so every output depends on how much padding
follows the text (HazyResearch/m2 issues #19, #42, #43). By default every input is right-padded with [PAD] (id 0) to
the model's maximum length (`config.max_sequence_length`): that reproduces the canonical outputs, because the
published models were trained and evaluated that way. `padding="longest"` pads each batch only to its longest input
instead: faster, but the outputs differ from the canonical ones, and an input's output then also depends on the
other inputs of its batch (with `batch_size=1` every input runs without padding). Inputs longer than the maximum are
truncated with a warning, or refused with `truncation=False`.

Inputs run in batches, one forward pass and one `mx.eval` per batch. Without `batch_size`, a batch holds at most
`BATCH_TOKEN_BUDGET` padded tokens and at most `MAX_DEFAULT_BATCH_SIZE` inputs, so long-context models run a few
inputs at a time. With `padding="longest"` the inputs are sorted by length first, so that batches pad little; the
outputs come back in input order.
"""

import inspect
import logging
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..errors import InputError, InputTypeError, check_keywords
from ..modeling_m2_bert import (
    M2BertForMaskedLM,
    M2BertForSequenceClassification,
    M2BertModel,
)
from ..tokenization import check_tokenizer_fits, resolve_tokenizer

logger = logging.getLogger(__name__)

PADDING_CHOICES = ("max_length", "longest")
BATCH_TOKEN_BUDGET = 2**15
MAX_DEFAULT_BATCH_SIZE = 32


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer of a model


def default_tokenizer(model):
    """The tokenizer a model runs with: the tokenizer files of the folder it was loaded from, else the
    bert-base-uncased vocabulary shipped with this package, with `model_max_length` set to the model's maximum."""
    source = None if model.source_folder is None else str(model.source_folder)
    return _cached_tokenizer(source, model.config.max_sequence_length)


@lru_cache(maxsize=8)
def _cached_tokenizer(source, max_length):
    return resolve_tokenizer(source=source, model_max_length=max_length)[0]


# ---------------------------------------------------------------------------------------------------------------
# Inputs, tokenization, batches


@dataclass
class _Encoding:
    input_ids: list
    token_type_ids: list
    truncated: bool = False


def as_list(inputs, allowed=(str,)):
    """(the inputs as a list, whether a single input was given)."""
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise InputError("The list of inputs is empty: give at least one text.")
        return list(inputs), False
    if not isinstance(inputs, allowed):
        raise InputTypeError(f"Expected a string or a list of strings, got {type(inputs).__name__}.")
    return [inputs], True


def check_text(text, where):
    if not isinstance(text, str):
        raise InputTypeError(f"{where} is a {type(text).__name__}, not a string: give texts as str.")
    if not text.strip():
        raise InputError(f"{where} is empty: give a text with at least one word.")


def input_name(index, single):
    return "The input" if single else f"Input {index}"


def check_options(padding, truncation, batch_size):
    if padding not in PADDING_CHOICES:
        raise InputError(
            f"padding={padding!r} is not supported: use 'max_length' (the default, which reproduces the reference "
            "outputs) or 'longest' (faster, different outputs)."
        )
    if not isinstance(truncation, bool):
        raise InputError(
            f"truncation={truncation!r}: use True (cut long inputs, with a warning) or False (refuse them)."
        )
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")


def check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name}={value!r}: give a positive integer.")


def _call_tokenizer(tokenizer, texts, pairs, **kwargs):
    """Token ids (with [CLS]/[SEP]) and token types of each text, or text pair where `pairs[i]` is not None."""
    rows = [None] * len(texts)
    paired = [i for i, pair in enumerate(pairs) if pair is not None]
    alone = [i for i, pair in enumerate(pairs) if pair is None]
    for indices, with_pairs in ((alone, False), (paired, True)):
        if not indices:
            continue
        encoded = tokenizer(
            [texts[i] for i in indices],
            [pairs[i] for i in indices] if with_pairs else None,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=True,
            verbose=False,
            **kwargs,
        )
        for i, ids, types in zip(indices, encoded["input_ids"], encoded["token_type_ids"]):
            rows[i] = _Encoding(ids, types)
    return rows


def tokenize_texts(tokenizer, texts, pairs, *, max_length, truncation):
    rows = _call_tokenizer(tokenizer, texts, pairs, truncation=False)
    too_long = [i for i, row in enumerate(rows) if len(row.input_ids) > max_length]
    if not too_long:
        return rows
    longest = max(len(rows[i].input_ids) for i in too_long)
    if len(rows) == 1:
        problem = f"The input has {longest} tokens, more than the model's maximum of {max_length}"
    else:
        positions = ", ".join(map(str, too_long[:5])) + (", ..." if len(too_long) > 5 else "")
        problem = (
            f"{len(too_long)} of the {len(rows)} inputs (positions {positions}) have more than the model's maximum of "
            f"{max_length} tokens (the longest {longest})"
        )
    if not truncation:
        them = "it" if len(rows) == 1 else "them"
        raise InputError(
            f"{problem}: shorten {them}, or let {them} be cut at the maximum (truncation=True; on the command line, "
            "leave out --no-truncation)."
        )
    logger.warning(
        "%s; truncated to the maximum. To refuse such inputs instead, pass truncation=False (on the command line, "
        "--no-truncation).",
        problem,
    )
    cut = _call_tokenizer(
        tokenizer, [texts[i] for i in too_long], [pairs[i] for i in too_long], truncation=True, max_length=max_length
    )
    for i, row in zip(too_long, cut):
        row.truncated = True
        rows[i] = row
    return rows


def plan_batches(rows, *, padding, max_length, batch_size):
    """Groups of input indices to run together, each with the length it is padded to.

    With padding="longest" the inputs are sorted by decreasing length. Ties are broken by content, so which inputs
    share a batch, and hence the outputs, do not depend on the order the inputs were given in.
    """
    if padding == "max_length":
        order = range(len(rows))
    else:
        order = sorted(
            range(len(rows)), key=lambda i: (-len(rows[i].input_ids), rows[i].input_ids, rows[i].token_type_ids)
        )
    batches, current = [], []
    for i in order:
        if not current:
            length = max_length if padding == "max_length" else len(rows[i].input_ids)
            capacity = batch_size or max(1, min(MAX_DEFAULT_BATCH_SIZE, BATCH_TOKEN_BUDGET // length))
        current.append(i)
        if len(current) == capacity:
            batches.append((current, length))
            current = []
    if current:
        batches.append((current, length))
    return batches


def model_inputs(rows, indices, length, pad_token_id):
    """Right-padded input_ids (with `pad_token_id`), token_type_ids (0 on padding) and attention_mask."""
    input_ids = np.full((len(indices), length), pad_token_id, dtype=np.int32)
    token_type_ids = np.zeros_like(input_ids)
    attention_mask = np.zeros_like(input_ids)
    for r, i in enumerate(indices):
        n = len(rows[i].input_ids)
        input_ids[r, :n] = rows[i].input_ids
        token_type_ids[r, :n] = rows[i].token_type_ids
        attention_mask[r, :n] = 1
    return {
        "input_ids": mx.array(input_ids),
        "token_type_ids": mx.array(token_type_ids),
        "attention_mask": mx.array(attention_mask),
    }


def padded_batches(rows, config, *, padding, batch_size, show_progress_bar=None):
    """Yield (input indices, padded model inputs) per batch, under a progress bar when there are several batches
    (None: shown on a terminal when there is more than one batch)."""
    batches = plan_batches(rows, padding=padding, max_length=config.max_sequence_length, batch_size=batch_size)
    if show_progress_bar is None:
        disable = None if len(batches) > 1 else True  # tqdm's None: shown only on a terminal
    else:
        disable = not show_progress_bar
    for indices, length in tqdm(batches, desc="Batches", unit="batch", disable=disable):
        yield indices, model_inputs(rows, indices, length, config.pad_token_id)


# ---------------------------------------------------------------------------------------------------------------
# Pipelines


class Pipeline:
    """A model, its tokenizer and default call arguments: `pipe(inputs, **kwargs)`.

    Keyword arguments given to the constructor (or to `pipeline(...)`) are defaults that those of a call override.
    Every pipeline takes `padding` ("max_length" or "longest"), `truncation` (True or False) and `batch_size`; see
    the module docstring for the padding rule.
    """

    task = None

    def __init__(self, model, tokenizer=None, **defaults):
        self.model = self._check_model(model)
        # The object given, not its `bert`, knows the folder it was loaded from.
        self.tokenizer = default_tokenizer(model) if tokenizer is None else tokenizer
        check_tokenizer_fits(self.tokenizer, self.model.config)
        self._check_arguments(defaults)
        self._defaults = defaults

    def __call__(self, inputs, **kwargs):
        self._check_arguments(kwargs)
        return self._run(inputs, **{**self._defaults, **kwargs})

    def _check_model(self, model):
        raise NotImplementedError

    def _run(self, inputs, **kwargs):
        raise NotImplementedError

    @classmethod
    def call_options(cls):
        """The names of the keyword arguments a call (or the constructor, as defaults) takes."""
        return [name for name, p in inspect.signature(cls._run).parameters.items() if p.kind is p.KEYWORD_ONLY]

    def _check_arguments(self, kwargs):
        check_keywords(f"The {self.task} pipeline", kwargs, self.call_options())

    def _tokenize(self, texts, pairs, truncation):
        return tokenize_texts(
            self.tokenizer, texts, pairs, max_length=self.model.config.max_sequence_length, truncation=truncation
        )

    def _batches(self, rows, padding, batch_size):
        return padded_batches(rows, self.model.config, padding=padding, batch_size=batch_size)


def base_model_of(model, task):
    """The M2BertModel of a model object: itself, or the `bert` of a head model."""
    if isinstance(model, M2BertModel):
        return model
    if isinstance(model, (M2BertForMaskedLM, M2BertForSequenceClassification)):
        return model.bert
    raise InputTypeError(f"The {task} pipeline needs an M2-BERT model, got {type(model).__name__}.")


def apply_tokenizer_kwargs(tokenizer_kwargs, padding, truncation):
    """transformers' `tokenizer_kwargs`: here only `padding` and `truncation`, which override the arguments."""
    if not tokenizer_kwargs:
        return padding, truncation
    unknown = sorted(set(tokenizer_kwargs) - {"padding", "truncation"})
    if unknown:
        raise InputError(
            f"tokenizer_kwargs {unknown} are not supported: M2-BERT pipelines take only 'padding' ('max_length' or "
            "'longest') and 'truncation' (True or False), because the input length is fixed by the padding rule."
        )
    return tokenizer_kwargs.get("padding", padding), tokenizer_kwargs.get("truncation", truncation)
