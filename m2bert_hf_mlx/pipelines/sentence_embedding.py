"""The sentence-embedding pipeline: one vector per text, as `encode` computes it."""

from ..encode import encode
from ..errors import InputError
from .base import Pipeline, base_model_of


class SentenceEmbeddingPipeline(Pipeline):
    """One vector per text: the canonical pooled output, as `encode` computes it (`normalize_embeddings=True` for
    unit vectors). A list of D floats per text (a list of them for a list of texts); with `return_tensors=True` an
    `mx.array` of shape (D,) or (N, D)."""

    task = "sentence-embedding"

    def _check_model(self, model):
        model = base_model_of(model, self.task)
        if "pooler" not in model:
            raise InputError(
                "The sentence-embedding pipeline needs a model with a pooler, and this one has none (MLM checkpoints "
                "come without one). Use a retrieval checkpoint (such as togethercomputer/m2-bert-80M-8k-retrieval), "
                "or the 'feature-extraction' pipeline for per-token hidden states."
            )
        return model

    def _run(
        self,
        inputs,
        *,
        normalize_embeddings=False,
        return_tensors=False,
        padding="max_length",
        truncation=True,
        batch_size=None,
    ):
        embeddings = encode(
            self.model,
            inputs,
            tokenizer=self.tokenizer,
            batch_size=batch_size,
            normalize_embeddings=normalize_embeddings,
            padding=padding,
            truncation=truncation,
            convert_to_tensor=True,
        )
        return embeddings if return_tensors else embeddings.tolist()
