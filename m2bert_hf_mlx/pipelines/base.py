"""Pipelines in the manner of transformers (`pipeline("fill-mask", model=...)`) and `encode` in the manner of
sentence-transformers, for M2-BERT.

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
import os
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..modeling_m2_bert import M2BertForMaskedLM, M2BertForSequenceClassification, M2BertModel
from ..tokenization import has_tokenizer_files, load_tokenizer

logger = logging.getLogger(__name__)

PADDING_CHOICES = ("max_length", "longest")
CONVERT_TO_CHOICES = ("numpy", "mlx")
CLASSIFICATION_FUNCTIONS = ("softmax", "sigmoid", "none")
BATCH_TOKEN_BUDGET = 2**15
MAX_DEFAULT_BATCH_SIZE = 32

# Stands for "top_k not given" in text classification, where top_k=None has a meaning of its own (every label).
_NOT_GIVEN = object()


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer of a model


def default_tokenizer(model):
    """The tokenizer a model runs with: the tokenizer files of the folder it was loaded from, else the
    bert-base-uncased vocabulary shipped with this package, with `model_max_length` set to the model's maximum."""
    folder = getattr(model, "source_folder", None)
    folder = str(folder) if folder is not None and has_tokenizer_files(folder) else None
    return _cached_tokenizer(folder, model.config.max_sequence_length)


@lru_cache(maxsize=8)
def _cached_tokenizer(folder, max_length):
    return load_tokenizer(folder, model_max_length=max_length)


def _check_tokenizer_fits(tokenizer, config):
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size} embedding rows: pass "
            "the tokenizer this model was trained with (M2-BERT uses bert-base-uncased)."
        )


# ---------------------------------------------------------------------------------------------------------------
# Inputs, tokenization, batches


@dataclass
class _Encoding:
    input_ids: list
    token_type_ids: list
    truncated: bool = False


def _as_list(inputs, allowed=(str,)):
    """(the inputs as a list, whether a single input was given)."""
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError("The list of inputs is empty: give at least one text.")
        return list(inputs), False
    if not isinstance(inputs, allowed):
        raise TypeError(f"Expected a string or a list of strings, got {type(inputs).__name__}.")
    return [inputs], True


def _check_text(text, where):
    if not isinstance(text, str):
        raise TypeError(f"{where} is a {type(text).__name__}, not a string: give texts as str.")
    if not text.strip():
        raise ValueError(f"{where} is empty: give a text with at least one word.")


def _where(index, single):
    return "The input" if single else f"Input {index}"


def _check_options(padding, truncation, batch_size):
    if padding not in PADDING_CHOICES:
        raise ValueError(
            f"padding={padding!r} is not supported: use 'max_length' (the default, which reproduces the reference "
            "outputs) or 'longest' (faster, different outputs)."
        )
    if not isinstance(truncation, bool):
        raise ValueError(f"truncation={truncation!r}: use True (cut long inputs, with a warning) or False (refuse them).")
    if batch_size is not None:
        _check_positive_int(batch_size, "batch_size")


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: give a positive integer.")


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


def _tokenize(tokenizer, texts, pairs, *, max_length, truncation):
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
        raise ValueError(f"{problem}: shorten {them}, or pass truncation=True to cut {them} at the maximum.")
    logger.warning("%s; truncated to the maximum. Pass truncation=False to refuse such inputs instead.", problem)
    cut = _call_tokenizer(
        tokenizer, [texts[i] for i in too_long], [pairs[i] for i in too_long], truncation=True, max_length=max_length
    )
    for i, row in zip(too_long, cut):
        row.truncated = True
        rows[i] = row
    return rows


def _batches(rows, *, padding, max_length, batch_size):
    """Groups of input indices to run together, each with the length it is padded to.

    With padding="longest" the inputs are sorted by decreasing length. Ties are broken by content, so which inputs
    share a batch, and hence the outputs, do not depend on the order the inputs were given in.
    """
    if padding == "max_length":
        order = range(len(rows))
    else:
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].input_ids), rows[i].input_ids, rows[i].token_type_ids))
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


def _model_inputs(rows, indices, length, pad_token_id):
    """Right-padded input_ids (with `pad_token_id`), token_type_ids (0 on padding) and attention_mask."""
    input_ids = np.full((len(indices), length), pad_token_id, dtype=np.int32)
    token_type_ids = np.zeros_like(input_ids)
    attention_mask = np.zeros_like(input_ids)
    for r, i in enumerate(indices):
        n = len(rows[i].input_ids)
        input_ids[r, :n] = rows[i].input_ids
        token_type_ids[r, :n] = rows[i].token_type_ids
        attention_mask[r, :n] = 1
    return {"input_ids": mx.array(input_ids), "token_type_ids": mx.array(token_type_ids), "attention_mask": mx.array(attention_mask)}


def _padded_batches(rows, config, *, padding, batch_size, show_progress_bar=None):
    """Yield (input indices, padded model inputs) per batch, under a progress bar when there are several batches
    (None: shown on a terminal when there is more than one batch)."""
    batches = _batches(rows, padding=padding, max_length=config.max_sequence_length, batch_size=batch_size)
    if show_progress_bar is None:
        disable = None if len(batches) > 1 else True  # tqdm's None: shown only on a terminal
    else:
        disable = not show_progress_bar
    for indices, length in tqdm(batches, desc="Batches", unit="batch", disable=disable):
        yield indices, _model_inputs(rows, indices, length, config.pad_token_id)


# ---------------------------------------------------------------------------------------------------------------
# encode


def encode(model, texts, *, tokenizer=None, batch_size=None, normalize=False, padding="max_length", truncation=True,
           show_progress_bar=None, convert_to="numpy"):
    """Embed texts with an M2-BERT model that has a pooler (the retrieval checkpoints), as sentence-transformers'
    `encode` does.

    The embedding is the canonical pooled output `tanh(dense(h[:, 0]))` (the [CLS] pooler), unnormalized unless
    `normalize=True` (L2). Returns a float32 array of shape (N, D) for a list of N texts, in input order, or (D,)
    for one string; `convert_to` is "numpy" or "mlx". `tokenizer` defaults to the model's (see
    `default_tokenizer`). `padding`, `truncation` and `batch_size` follow the module's padding rule: the default
    "max_length" reproduces the reference embeddings. `show_progress_bar`: None shows one on a terminal when the
    texts take more than one batch.
    """
    if not isinstance(model, M2BertModel):
        raise TypeError(f"encode takes an M2BertModel, got {type(model).__name__}.")
    if "pooler" not in model:
        raise ValueError(
            "This model has no pooler, so it has no sentence embedding: MLM checkpoints come without one. Use a "
            "retrieval checkpoint (such as togethercomputer/m2-bert-80M-8k-retrieval), or the 'feature-extraction' "
            "pipeline for per-token hidden states."
        )
    _check_options(padding, truncation, batch_size)
    if convert_to not in CONVERT_TO_CHOICES:
        raise ValueError(f"convert_to={convert_to!r} is not supported; use one of {', '.join(CONVERT_TO_CHOICES)}.")
    tokenizer = default_tokenizer(model) if tokenizer is None else tokenizer
    _check_tokenizer_fits(tokenizer, model.config)
    texts, single = _as_list(texts)
    for i, text in enumerate(texts):
        _check_text(text, _where(i, single))
    rows = _tokenize(tokenizer, texts, [None] * len(texts), max_length=model.config.max_sequence_length, truncation=truncation)

    order, parts = [], []
    batches = _padded_batches(rows, model.config, padding=padding, batch_size=batch_size, show_progress_bar=show_progress_bar)
    for indices, batch in batches:
        pooled = model(**batch).pooler_output.astype(mx.float32)
        if normalize:
            pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        mx.eval(pooled)
        order.extend(indices)
        parts.append(pooled)
    embeddings = mx.concatenate(parts)[mx.array(np.argsort(order))]
    if single:
        embeddings = embeddings[0]
    return np.array(embeddings) if convert_to == "numpy" else embeddings


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
        _check_tokenizer_fits(self.tokenizer, self.model.config)
        self._check_arguments(defaults)
        self._defaults = defaults

    def __call__(self, inputs, **kwargs):
        self._check_arguments(kwargs)
        return self._run(inputs, **{**self._defaults, **kwargs})

    def _check_model(self, model):
        raise NotImplementedError

    def _run(self, inputs, **kwargs):
        raise NotImplementedError

    def _check_arguments(self, kwargs):
        accepted = [name for name, p in inspect.signature(self._run).parameters.items() if p.kind is p.KEYWORD_ONLY]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise TypeError(f"The {self.task} pipeline does not take {', '.join(unknown)}; it takes {', '.join(accepted)}.")

    def _tokenize(self, texts, pairs, truncation):
        return _tokenize(self.tokenizer, texts, pairs, max_length=self.model.config.max_sequence_length, truncation=truncation)

    def _batches(self, rows, padding, batch_size):
        return _padded_batches(rows, self.model.config, padding=padding, batch_size=batch_size)


def _base_model(model, task):
    """The M2BertModel of a model object: itself, or the `bert` of a head model."""
    if isinstance(model, M2BertModel):
        return model
    if isinstance(model, (M2BertForMaskedLM, M2BertForSequenceClassification)):
        return model.bert
    raise TypeError(f"The {task} pipeline needs an M2-BERT model, got {type(model).__name__}.")


class FillMaskPipeline(Pipeline):
    """Predicts the tokens at [MASK], in transformers' format.

    Each prediction is {"score", "token", "token_str", "sequence"}. A string with one mask gives a list of `top_k`
    predictions; with several masks, one such list per mask; a list of strings gives one result per string, except
    that a list of one string gives that string's result, as transformers does. `targets` (a word or a list) limits
    the candidates; a target that is not one token is replaced by its first sub-token, with a warning.

    Scores are the softmax over the tokenizer's real vocabulary: the model's embedding matrix has 6 more rows
    (30528 against bert-base-uncased's 30522, padded for efficiency), which no text can contain, and they are left
    out. transformers' own pipeline would include them.
    """

    task = "fill-mask"

    def __init__(self, model, tokenizer=None, **defaults):
        super().__init__(model, tokenizer, **defaults)
        if self.tokenizer.mask_token_id is None:
            raise ValueError("The tokenizer has no mask token, so there is nothing to fill; use bert-base-uncased's.")

    def _check_model(self, model):
        if not isinstance(model, M2BertForMaskedLM):
            raise TypeError(
                f"The fill-mask pipeline needs an M2BertForMaskedLM (an MLM checkpoint), got {type(model).__name__}. "
                "Retrieval checkpoints have no MLM head: use the 'sentence-embedding' or 'feature-extraction' pipeline."
            )
        return model

    def _run(self, inputs, *, top_k=5, targets=None, tokenizer_kwargs=None, padding="max_length", truncation=True,
             batch_size=None):
        top_k = 5 if top_k is None else top_k
        _check_positive_int(top_k, "top_k")
        padding, truncation = _tokenizer_kwargs(tokenizer_kwargs, padding, truncation)
        _check_options(padding, truncation, batch_size)
        texts, single = _as_list(inputs)
        for i, text in enumerate(texts):
            _check_text(text, _where(i, single))
        target_ids = None if targets is None else self._target_ids(targets)
        rows = self._tokenize(texts, [None] * len(texts), truncation)
        masks = [self._mask_positions(row, _where(i, single)) for i, row in enumerate(rows)]

        vocab = len(self.tokenizer)
        head, words = self.model.cls.predictions, self.model.bert.embeddings.word_embeddings
        found = [None] * len(texts)
        for indices, batch in self._batches(rows, padding, batch_size):
            hidden = self.model.bert(**batch).last_hidden_state
            batch_rows = mx.array([r for r, i in enumerate(indices) for _ in masks[i]])
            positions = mx.array([p for i in indices for p in masks[i]])
            # The head runs on the masked positions only: it is position-wise, and the full (B, L, V) logits are large.
            logits = head(hidden[batch_rows, positions], words)[:, :vocab]
            probs = mx.softmax(logits.astype(mx.float32), axis=-1)
            if target_ids is not None:
                probs = probs[:, mx.array(target_ids)]
            candidates, scores = _top_k(probs, min(top_k, probs.shape[-1]))
            mx.eval(candidates, scores)
            candidates, scores = np.array(candidates), np.array(scores)
            start = 0
            for i in indices:
                found[i] = (candidates[start : start + len(masks[i])], scores[start : start + len(masks[i])])
                start += len(masks[i])

        results = []
        for row, positions, (candidates, scores) in zip(rows, masks, found):
            if target_ids is not None:
                candidates = target_ids[candidates]
            per_mask = [
                self._predictions(row.input_ids, position, ids, values, single_mask=len(positions) == 1)
                for position, ids, values in zip(positions, candidates, scores)
            ]
            results.append(per_mask[0] if len(per_mask) == 1 else per_mask)
        return results[0] if single or len(results) == 1 else results

    def _mask_positions(self, row, where):
        positions = [p for p, token in enumerate(row.input_ids) if token == self.tokenizer.mask_token_id]
        if not positions:
            cut = (
                f" within the model's first {self.model.config.max_sequence_length} tokens (the input was truncated)"
                if row.truncated
                else ""
            )
            raise ValueError(
                f"No mask_token ({self.tokenizer.mask_token}) found in {where.lower()}{cut}: put "
                f"{self.tokenizer.mask_token} where a token should be predicted."
            )
        return positions

    def _target_ids(self, targets):
        targets = [targets] if isinstance(targets, str) else targets
        vocab = self.tokenizer.get_vocab()
        ids = []
        for target in targets:
            if target in vocab:
                ids.append(vocab[target])
                continue
            pieces = self.tokenizer(target, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
            if not pieces:
                logger.warning("The target %r is not in the vocabulary and has no token; it is ignored.", target)
                continue
            logger.warning(
                "The target %r is not in the vocabulary; its first token %r stands for it.",
                target, self.tokenizer.convert_ids_to_tokens(pieces[0]),
            )
            ids.append(pieces[0])
        if not ids:
            raise ValueError(f"None of the targets {targets!r} has a token: give words of the vocabulary.")
        return np.array(sorted(set(ids)))

    def _predictions(self, input_ids, position, token_ids, scores, *, single_mask):
        pad = self.model.config.pad_token_id
        predictions = []
        for token, score in zip(token_ids.tolist(), scores.tolist()):
            filled = [t for t in input_ids[:position] + [token] + input_ids[position + 1 :] if t != pad]
            # With several masks the other [MASK] tokens stay visible in the sequence, as in transformers.
            sequence = self.tokenizer.decode(filled, skip_special_tokens=single_mask)
            predictions.append({"score": score, "token": token, "token_str": self.tokenizer.decode([token]), "sequence": sequence})
        return predictions


def _top_k(probs, k):
    """The indices and values of the k largest entries of each row, largest first."""
    candidates = mx.argpartition(-probs, kth=k - 1, axis=-1)[:, :k]
    values = mx.take_along_axis(probs, candidates, axis=-1)
    ranking = mx.argsort(-values, axis=-1)
    return mx.take_along_axis(candidates, ranking, axis=-1), mx.take_along_axis(values, ranking, axis=-1)


def _tokenizer_kwargs(tokenizer_kwargs, padding, truncation):
    """transformers' `tokenizer_kwargs`: here only `padding` and `truncation`, which override the arguments."""
    if not tokenizer_kwargs:
        return padding, truncation
    unknown = sorted(set(tokenizer_kwargs) - {"padding", "truncation"})
    if unknown:
        raise ValueError(
            f"tokenizer_kwargs {unknown} are not supported: M2-BERT pipelines take only 'padding' ('max_length' or "
            "'longest') and 'truncation' (True or False), because the input length is fixed by the padding rule."
        )
    return tokenizer_kwargs.get("padding", padding), tokenizer_kwargs.get("truncation", truncation)


class FeatureExtractionPipeline(Pipeline):
    """Per-token hidden states (the encoder output), in transformers' format: for each text a nested list of shape
    (1, n_tokens, D) (an `mx.array` with `return_tensors=True`); a list of texts gives a list of those.

    The states are computed with the padding rule, and the rows of the padding positions are left out, so n_tokens
    counts the text's tokens with [CLS] and [SEP].
    """

    task = "feature-extraction"

    def _check_model(self, model):
        return _base_model(model, self.task)

    def _run(self, inputs, *, return_tensors=False, padding="max_length", truncation=True, batch_size=None):
        _check_options(padding, truncation, batch_size)
        texts, single = _as_list(inputs)
        for i, text in enumerate(texts):
            _check_text(text, _where(i, single))
        rows = self._tokenize(texts, [None] * len(texts), truncation)
        results = [None] * len(texts)
        for indices, batch in self._batches(rows, padding, batch_size):
            hidden = self.model(**batch).last_hidden_state.astype(mx.float32)
            mx.eval(hidden)
            for r, i in enumerate(indices):
                states = hidden[r : r + 1, : len(rows[i].input_ids)]
                results[i] = states if return_tensors else states.tolist()
        return results[0] if single else results


class SentenceEmbeddingPipeline(Pipeline):
    """One vector per text: the canonical pooled output, as `encode` computes it (`normalize=True` for unit
    vectors). A list of D floats per text (a list of them for a list of texts); with `return_tensors=True` an
    `mx.array` of shape (D,) or (N, D)."""

    task = "sentence-embedding"

    def _check_model(self, model):
        model = _base_model(model, self.task)
        if "pooler" not in model:
            raise ValueError(
                "The sentence-embedding pipeline needs a model with a pooler, and this one has none (MLM checkpoints "
                "come without one). Use a retrieval checkpoint (such as togethercomputer/m2-bert-80M-8k-retrieval), "
                "or the 'feature-extraction' pipeline for per-token hidden states."
            )
        return model

    def _run(self, inputs, *, normalize=False, return_tensors=False, padding="max_length", truncation=True,
             batch_size=None):
        embeddings = encode(
            self.model, inputs, tokenizer=self.tokenizer, batch_size=batch_size, normalize=normalize,
            padding=padding, truncation=truncation, convert_to="mlx",
        )
        return embeddings if return_tensors else embeddings.tolist()


class TextClassificationPipeline(Pipeline):
    """Labels and scores from a sequence-classification model, in transformers' format.

    Inputs: a text, a {"text", "text_pair"} dict, or a list of those. Without `top_k`, each input gives its best
    {"label", "score"}, and a single string gives a list of that one dict (a single dict input gives the dict), as
    transformers does. With `top_k` (an int, or None for every label) each input gives a list of that many dicts, best
    first. `function_to_apply` is "softmax", "sigmoid" or "none"; by default softmax for several labels, sigmoid
    for one label or multi-label problems, none for regression. Labels come from `config.id2label`.
    """

    task = "text-classification"

    def _check_model(self, model):
        if not isinstance(model, M2BertForSequenceClassification):
            raise TypeError(
                f"The text-classification pipeline needs an M2BertForSequenceClassification (a checkpoint with a "
                f"classifier head), got {type(model).__name__}."
            )
        return model

    def _run(self, inputs, *, top_k=_NOT_GIVEN, function_to_apply=None, padding="max_length", truncation=True,
             batch_size=None):
        legacy = top_k is _NOT_GIVEN
        if not legacy and top_k is not None:
            _check_positive_int(top_k, "top_k")
        function = self._function(function_to_apply)
        _check_options(padding, truncation, batch_size)
        items, single = _as_list(inputs, allowed=(str, dict))
        texts, pairs = zip(*(self._text_and_pair(item, _where(i, single)) for i, item in enumerate(items)))
        rows = self._tokenize(list(texts), list(pairs), truncation)

        scores = [None] * len(items)
        for indices, batch in self._batches(rows, padding, batch_size):
            logits = self.model(**batch).logits.astype(mx.float32)
            if function == "softmax":
                logits = mx.softmax(logits, axis=-1)
            elif function == "sigmoid":
                logits = mx.sigmoid(logits)
            mx.eval(logits)
            for r, i in enumerate(indices):
                scores[i] = np.array(logits[r])

        id2label = self.model.config.id2label
        results = []
        for row_scores in scores:
            labelled = [{"label": id2label[j], "score": float(s)} for j, s in enumerate(row_scores)]
            if legacy:
                results.append(labelled[int(np.argmax(row_scores))])
            else:
                labelled.sort(key=lambda d: d["score"], reverse=True)
                results.append(labelled if top_k is None else labelled[:top_k])
        if not single:
            return results
        return [results[0]] if legacy and isinstance(items[0], str) else results[0]

    def _function(self, function_to_apply):
        if function_to_apply is None:
            config = self.model.config
            if config.problem_type == "regression":
                return "none"
            if config.problem_type == "multi_label_classification" or config.num_labels == 1:
                return "sigmoid"
            return "softmax"
        if not isinstance(function_to_apply, str) or function_to_apply.lower() not in CLASSIFICATION_FUNCTIONS:
            raise ValueError(f"function_to_apply={function_to_apply!r}: use one of {', '.join(CLASSIFICATION_FUNCTIONS)}.")
        return function_to_apply.lower()

    @staticmethod
    def _text_and_pair(item, where):
        if isinstance(item, dict):
            if "text" not in item or set(item) - {"text", "text_pair"}:
                raise ValueError(f'{where} is a dict with keys {sorted(item)}; give {{"text": ..., "text_pair": ...}}.')
            _check_text(item["text"], f"{where}'s text")
            if "text_pair" in item:
                _check_text(item["text_pair"], f"{where}'s text_pair")
            return item["text"], item.get("text_pair")
        if isinstance(item, (list, tuple)):
            raise ValueError(f'{where} is a {type(item).__name__}: give a text pair as {{"text": ..., "text_pair": ...}}.')
        _check_text(item, where)
        return item, None


TASKS = {
    "fill-mask": (FillMaskPipeline, M2BertForMaskedLM),
    "feature-extraction": (FeatureExtractionPipeline, M2BertModel),
    "sentence-embedding": (SentenceEmbeddingPipeline, M2BertModel),
    "text-classification": (TextClassificationPipeline, M2BertForSequenceClassification),
}


def pipeline(task, model=None, tokenizer=None, *, revision=None, token=None, dtype=None, model_kwargs=None, **kwargs):
    """A pipeline for `task`: "fill-mask", "feature-extraction", "sentence-embedding" or "text-classification".

    `model` is a model object, a local folder or a Hub repo id (loaded with `revision`, `token`, `dtype` and
    `model_kwargs`, e.g. {"config": "m2-bert-80m"} for a Composer checkpoint without config.json). `tokenizer` is a
    tokenizer object, a folder or a repo id; by default the model's (see `default_tokenizer`). Other keyword
    arguments are default call arguments of the pipeline (such as `top_k`, `padding` or `batch_size`).
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; available tasks: {', '.join(TASKS)}.")
    pipeline_class, model_class = TASKS[task]
    if model is None:
        raise ValueError(f"pipeline({task!r}) needs model=: a model object, a local model folder or a Hub repo id.")
    if isinstance(model, (str, os.PathLike)):
        model = model_class.from_pretrained(str(model), revision=revision, token=token, dtype=dtype, **(model_kwargs or {}))
    elif revision is not None or token is not None or dtype is not None or model_kwargs:
        raise ValueError("revision, token, dtype and model_kwargs apply when model is a folder or repo id, not a model object.")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(str(tokenizer), model_max_length=model.config.max_sequence_length, token=token)
    return pipeline_class(model, tokenizer, **kwargs)
