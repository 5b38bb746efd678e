"""Pipelines in the manner of transformers: `pipeline("fill-mask", model=...)`, one module per task on the common
`Pipeline` of `base` (which also states the padding rule every pipeline follows)."""

import inspect
import os

from ..errors import InputError, InputTypeError, check_keywords, did_you_mean, quote
from ..modeling_m2_bert import (
    M2BertForMaskedLM,
    M2BertForSequenceClassification,
    M2BertModel,
)
from ..tokenization import resolve_tokenizer
from .base import PADDING_CHOICES, Pipeline, default_tokenizer
from .feature_extraction import FeatureExtractionPipeline
from .fill_mask import FillMaskPipeline
from .sentence_embedding import SentenceEmbeddingPipeline
from .text_classification import TextClassificationPipeline

__all__ = [
    "PADDING_CHOICES",
    "TASKS",
    "FeatureExtractionPipeline",
    "FillMaskPipeline",
    "Pipeline",
    "SentenceEmbeddingPipeline",
    "TextClassificationPipeline",
    "default_tokenizer",
    "pipeline",
]

TASKS = {
    "fill-mask": (FillMaskPipeline, M2BertForMaskedLM),
    "feature-extraction": (FeatureExtractionPipeline, M2BertModel),
    "sentence-embedding": (SentenceEmbeddingPipeline, M2BertModel),
    "text-classification": (TextClassificationPipeline, M2BertForSequenceClassification),
}


def pipeline(
    task: str,
    model=None,
    tokenizer=None,
    *,
    revision: str | None = None,
    token: str | None = None,
    dtype: str | None = None,
    model_kwargs: dict | None = None,
    **kwargs,
) -> Pipeline:
    """A pipeline for `task`: "fill-mask", "feature-extraction", "sentence-embedding" or "text-classification".

    `model` is a model object, a local folder or a Hub repo id (loaded with `revision`, `token`, `dtype` and
    `model_kwargs`, e.g. {"config": "m2-bert-80m"} for a Composer checkpoint without config.json). `tokenizer` is a
    tokenizer object, a folder or a repo id; by default the model's (see `default_tokenizer`). Other keyword
    arguments are default call arguments of the pipeline (such as `top_k`, `padding` or `batch_size`).
    """
    if not isinstance(task, str):
        raise InputTypeError(
            f"pipeline() takes the task as a string, not {quote(task)}; available tasks: {', '.join(TASKS)}."
        )
    if task not in TASKS:
        hint = did_you_mean(task, TASKS, end=" ")
        raise InputError(f"Unknown task {task!r}; {hint}available tasks: {', '.join(TASKS)}.")
    pipeline_class, model_class = TASKS[task]
    # Before the model loads; the factory's own names too, for a misspelt one of them.
    factory = [name for name, p in inspect.signature(pipeline).parameters.items() if p.kind is not p.VAR_KEYWORD]
    check_keywords(f"The {task} pipeline", kwargs, [*pipeline_class.call_options(), *factory])
    if model is None:
        raise InputError(f"pipeline({task!r}) needs model=: a model object, a local model folder or a Hub repo id.")
    if isinstance(model, (str, os.PathLike)):
        model = model_class.from_pretrained(
            str(model), revision=revision, token=token, dtype=dtype, **(model_kwargs or {})
        )
    elif revision is not None or token is not None or dtype is not None or model_kwargs:
        raise InputError(
            "revision, token, dtype and model_kwargs apply when model is a folder or repo id, not a model object."
        )
    if isinstance(tokenizer, (str, os.PathLike)):
        max_length = model.config.max_sequence_length
        tokenizer = resolve_tokenizer(tokenizer, model_max_length=max_length, revision=revision, token=token)[0]
    return pipeline_class(model, tokenizer, **kwargs)
