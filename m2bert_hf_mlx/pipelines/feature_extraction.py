"""The feature-extraction pipeline: per-token hidden states of the encoder."""

import mlx.core as mx

from .base import Pipeline, as_list, base_model_of, check_options, check_text, input_name


class FeatureExtractionPipeline(Pipeline):
    """Per-token hidden states (the encoder output), in transformers' format: for each text a nested list of shape
    (1, n_tokens, D) (an `mx.array` with `return_tensors=True`); a list of texts gives a list of those.

    The states are computed with the padding rule, and the rows of the padding positions are left out, so n_tokens
    counts the text's tokens with [CLS] and [SEP].
    """

    task = "feature-extraction"

    def _check_model(self, model):
        return base_model_of(model, self.task)

    def _run(self, inputs, *, return_tensors=False, padding="max_length", truncation=True, batch_size=None):
        check_options(padding, truncation, batch_size)
        texts, single = as_list(inputs)
        for i, text in enumerate(texts):
            check_text(text, input_name(i, single))
        rows = self._tokenize(texts, [None] * len(texts), truncation)
        results = [None] * len(texts)
        for indices, batch in self._batches(rows, padding, batch_size):
            hidden = self.model(**batch).last_hidden_state.astype(mx.float32)
            mx.eval(hidden)
            for r, i in enumerate(indices):
                states = hidden[r : r + 1, : len(rows[i].input_ids)]
                results[i] = states if return_tensors else states.tolist()
        return results[0] if single else results
