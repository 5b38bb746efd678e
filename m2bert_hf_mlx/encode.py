"""`encode`: sentence embeddings of texts, as sentence-transformers' `SentenceTransformer.encode` gives them.

Inputs follow the padding rule of `m2bert_hf_mlx.pipelines.base`: by default every text is padded to the model's
maximum length, which reproduces the reference embeddings.
"""

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from .activations import l2_normalize
from .errors import checked_keywords
from .modeling_m2_bert import M2BertModel
from .pipelines.base import (
    _as_list,
    _check_options,
    _check_text,
    _padded_batches,
    _tokenize,
    _where,
    default_tokenizer,
)
from .tokenization import check_tokenizer_fits

CONVERT_TO_CHOICES = ("numpy", "mlx")


@checked_keywords
def encode(
    model: M2BertModel,
    texts: str | Sequence[str],
    *,
    tokenizer=None,
    batch_size: int | None = None,
    normalize: bool = False,
    padding: str = "max_length",
    truncation: bool = True,
    show_progress_bar: bool | None = None,
    convert_to: str = "numpy",
) -> np.ndarray | mx.array:
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
    check_tokenizer_fits(tokenizer, model.config)
    texts, single = _as_list(texts)
    for i, text in enumerate(texts):
        _check_text(text, _where(i, single))
    rows = _tokenize(tokenizer, texts, [None] * len(texts), max_length=model.config.max_sequence_length, truncation=truncation)

    order, parts = [], []
    batches = _padded_batches(rows, model.config, padding=padding, batch_size=batch_size, show_progress_bar=show_progress_bar)
    for indices, batch in batches:
        pooled = model(**batch).pooler_output.astype(mx.float32)
        if normalize:
            pooled = l2_normalize(pooled)
        mx.eval(pooled)
        order.extend(indices)
        parts.append(pooled)
    embeddings = mx.concatenate(parts)[mx.array(np.argsort(order))]
    if single:
        embeddings = embeddings[0]
    return np.array(embeddings) if convert_to == "numpy" else embeddings
