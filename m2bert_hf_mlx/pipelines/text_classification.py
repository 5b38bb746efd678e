"""The text-classification pipeline: labels and scores of a sequence-classification model."""

import mlx.core as mx
import numpy as np

from ..errors import InputError, InputTypeError
from ..modeling_m2_bert import M2BertForSequenceClassification
from .base import (
    Pipeline,
    as_list,
    check_options,
    check_positive_int,
    check_text,
    input_name,
)

CLASSIFICATION_FUNCTIONS = ("softmax", "sigmoid", "none")
# Stands for "top_k not given" in text classification, where top_k=None has a meaning of its own (every label).
_NOT_GIVEN = object()


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
            raise InputTypeError(
                f"The text-classification pipeline needs an M2BertForSequenceClassification (a checkpoint with a "
                f"classifier head), got {type(model).__name__}."
            )
        return model

    def _run(
        self,
        inputs,
        *,
        top_k=_NOT_GIVEN,
        function_to_apply=None,
        padding="max_length",
        truncation=True,
        batch_size=None,
    ):
        legacy = top_k is _NOT_GIVEN
        if not legacy and top_k is not None:
            check_positive_int(top_k, "top_k")
        function = self._function(function_to_apply)
        check_options(padding, truncation, batch_size)
        items, single = as_list(inputs, allowed=(str, dict))
        texts, pairs = zip(*(self._text_and_pair(item, input_name(i, single)) for i, item in enumerate(items)))
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
            raise InputError(
                f"function_to_apply={function_to_apply!r}: use one of {', '.join(CLASSIFICATION_FUNCTIONS)}."
            )
        return function_to_apply.lower()

    @staticmethod
    def _text_and_pair(item, where):
        if isinstance(item, dict):
            if "text" not in item or set(item) - {"text", "text_pair"}:
                raise InputError(f'{where} is a dict with keys {sorted(item)}; give {{"text": ..., "text_pair": ...}}.')
            check_text(item["text"], f"{where}'s text")
            if "text_pair" in item:
                check_text(item["text_pair"], f"{where}'s text_pair")
            return item["text"], item.get("text_pair")
        if isinstance(item, (list, tuple)):
            raise InputError(
                f'{where} is a {type(item).__name__}: give a text pair as {{"text": ..., "text_pair": ...}}.'
            )
        check_text(item, where)
        return item, None
