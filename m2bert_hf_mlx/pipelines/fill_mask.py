"""The fill-mask pipeline: the tokens an MLM model predicts at [MASK]."""

import logging

import mlx.core as mx
import numpy as np

from ..errors import InputError, InputTypeError, TokenizerError
from ..modeling_m2_bert import M2BertForMaskedLM
from .base import (
    Pipeline,
    apply_tokenizer_kwargs,
    as_list,
    check_options,
    check_positive_int,
    check_text,
    input_name,
)

logger = logging.getLogger(__name__)


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
            raise TokenizerError(
                "The tokenizer has no mask token, so there is nothing to fill; use bert-base-uncased's."
            )

    def _check_model(self, model):
        if not isinstance(model, M2BertForMaskedLM):
            raise InputTypeError(
                f"The fill-mask pipeline needs an M2BertForMaskedLM (an MLM checkpoint), got {type(model).__name__}. "
                "Retrieval checkpoints have no MLM head: use the 'sentence-embedding' or 'feature-extraction' pipeline."
            )
        return model

    def _run(
        self,
        inputs,
        *,
        top_k=5,
        targets=None,
        tokenizer_kwargs=None,
        padding="max_length",
        truncation=True,
        batch_size=None,
    ):
        top_k = 5 if top_k is None else top_k
        check_positive_int(top_k, "top_k")
        padding, truncation = apply_tokenizer_kwargs(tokenizer_kwargs, padding, truncation)
        check_options(padding, truncation, batch_size)
        texts, single = as_list(inputs)
        for i, text in enumerate(texts):
            check_text(text, input_name(i, single))
        target_ids = None if targets is None else self._target_ids(targets)
        rows = self._tokenize(texts, [None] * len(texts), truncation)
        masks = [self._mask_positions(row, input_name(i, single)) for i, row in enumerate(rows)]

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
            raise InputError(
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
            pieces = self.tokenizer(
                target, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False
            )["input_ids"]
            if not pieces:
                logger.warning("The target %r is not in the vocabulary and has no token; it is ignored.", target)
                continue
            logger.warning(
                "The target %r is not in the vocabulary; its first token %r stands for it.",
                target,
                self.tokenizer.convert_ids_to_tokens(pieces[0]),
            )
            ids.append(pieces[0])
        if not ids:
            raise InputError(f"None of the targets {targets!r} has a token: give words of the vocabulary.")
        return np.array(sorted(set(ids)))

    def _predictions(self, input_ids, position, token_ids, scores, *, single_mask):
        pad = self.model.config.pad_token_id
        predictions = []
        for token, score in zip(token_ids.tolist(), scores.tolist()):
            filled = [t for t in input_ids[:position] + [token] + input_ids[position + 1 :] if t != pad]
            # With several masks the other [MASK] tokens stay visible in the sequence, as in transformers.
            sequence = self.tokenizer.decode(filled, skip_special_tokens=single_mask)
            predictions.append(
                {"score": score, "token": token, "token_str": self.tokenizer.decode([token]), "sequence": sequence}
            )
        return predictions


def _top_k(probs, k):
    """The indices and values of the k largest entries of each row, largest first."""
    candidates = mx.argpartition(-probs, kth=k - 1, axis=-1)[:, :k]
    values = mx.take_along_axis(probs, candidates, axis=-1)
    ranking = mx.argsort(-values, axis=-1)
    return mx.take_along_axis(candidates, ranking, axis=-1), mx.take_along_axis(values, ranking, axis=-1)
