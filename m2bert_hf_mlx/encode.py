"""`encode`: sentence embeddings of texts, as sentence-transformers' `SentenceTransformer.encode` gives them.

Inputs follow the padding rule of `m2bert_hf_mlx.pipelines.base`: by default every text is padded to the model's
maximum length, which reproduces the reference embeddings.
"""

import logging
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from .activations import l2_normalize
from .embedding_precision import check_precision, quantize_embeddings
from .errors import InputError, InputTypeError, checked_keywords
from .modeling_m2_bert import M2BertModel
from .pipelines.base import (
    as_list,
    check_options,
    check_text,
    default_tokenizer,
    input_name,
    padded_batches,
    tokenize_texts,
)
from .tokenization import check_tokenizer_fits

logger = logging.getLogger(__name__)

OUTPUT_VALUES = ("sentence_embedding", "token_embeddings", None)


@checked_keywords
def encode(
    model: M2BertModel,
    sentences: str | Sequence[str],
    *,
    batch_size: int | None = None,
    show_progress_bar: bool | None = None,
    normalize_embeddings: bool = False,
    convert_to_numpy: bool = True,
    convert_to_tensor: bool = False,
    prompt: str | None = None,
    prompt_name: str | None = None,
    precision: str = "float32",
    output_value: str | None = "sentence_embedding",
    tokenizer=None,
    padding: str = "max_length",
    truncation: bool = True,
) -> np.ndarray | mx.array | list:
    """Embed texts as sentence-transformers' `SentenceTransformer.encode` does, with its arguments and meanings.

    The sentence embedding is the canonical pooled output `tanh(dense(h[:, 0]))` (the [CLS] pooler of the retrieval
    checkpoints), unnormalized unless `normalize_embeddings=True` (L2). A list of N texts gives an (N, D) numpy
    array in input order, one string a (D,) one; `convert_to_tensor=True` gives one `mx.array` instead, and
    `convert_to_numpy=False` (without it) a list of `mx.array` rows. `precision` ("float32", "int8", "uint8",
    "binary", "ubinary") quantizes the embeddings together, by `embedding_precision.quantize_embeddings`.
    `output_value="token_embeddings"` gives each text's per-token hidden states, an (n_tokens, D) `mx.array` per
    text ([CLS] and [SEP] included, padding left out); `output_value=None` a dict per text with "input_ids",
    "token_embeddings" and, with a pooler, "sentence_embedding".

    `prompt` is put before every text; `prompt_name` names one of `model.config.prompts` (default:
    `config.default_prompt_name`); `prompt` wins over `prompt_name`. `tokenizer` defaults to the model's (see
    `default_tokenizer`). `padding`, `truncation` and `batch_size` follow the padding rule: the default
    "max_length" reproduces the reference embeddings. `show_progress_bar`: None shows one on a terminal when the
    texts take more than one batch.
    """
    if not isinstance(model, M2BertModel):
        raise InputTypeError(f"encode takes an M2BertModel, got {type(model).__name__}.")
    if output_value not in OUTPUT_VALUES:
        raise InputError(
            f"output_value={output_value!r} is not supported; use one of {', '.join(map(repr, OUTPUT_VALUES))}."
        )
    if output_value == "sentence_embedding" and "pooler" not in model:
        raise InputError(
            "This model has no pooler, so it has no sentence embedding: MLM checkpoints come without one. Use a "
            "retrieval checkpoint (such as togethercomputer/m2-bert-80M-8k-retrieval), or "
            "output_value='token_embeddings' for per-token hidden states."
        )
    check_precision(precision)
    check_options(padding, truncation, batch_size)
    tokenizer = default_tokenizer(model) if tokenizer is None else tokenizer
    check_tokenizer_fits(tokenizer, model.config)
    texts, single = as_list(sentences)
    for i, text in enumerate(texts):
        check_text(text, input_name(i, single))
    prompt = resolve_prompt(model.config, prompt, prompt_name)
    if prompt:
        texts = [prompt + text for text in texts]
    rows = tokenize_texts(
        tokenizer, texts, [None] * len(texts), max_length=model.config.max_sequence_length, truncation=truncation
    )

    pooled, tokens = None, [None] * len(texts)
    wants_sentence = output_value != "token_embeddings" and "pooler" in model
    wants_tokens = output_value != "sentence_embedding"
    batches = padded_batches(
        rows, model.config, padding=padding, batch_size=batch_size, show_progress_bar=show_progress_bar
    )
    for indices, batch in batches:
        out = model(**batch)
        sentence = out.pooler_output.astype(mx.float32) if wants_sentence else None
        if sentence is not None and normalize_embeddings:
            sentence = l2_normalize(sentence)
        hidden = out.last_hidden_state.astype(mx.float32) if wants_tokens else None
        mx.eval(*(x for x in (sentence, hidden) if x is not None))
        if sentence is not None:
            if pooled is None:
                pooled = np.empty((len(texts), sentence.shape[1]), dtype=np.float32)
            pooled[indices] = np.array(sentence)
        if hidden is not None:
            for r, i in enumerate(indices):
                tokens[i] = hidden[r, : len(rows[i].input_ids)]

    if output_value == "sentence_embedding":
        embeddings = quantize_embeddings(pooled, precision)
        if convert_to_tensor:
            result = mx.array(embeddings)
        elif convert_to_numpy:
            result = embeddings
        else:
            result = [mx.array(row) for row in embeddings]
    else:
        if precision != "float32":
            tokens = [mx.array(t) for t in quantize_embeddings([np.array(t) for t in tokens], precision)]
        result = tokens
        if output_value is None:
            vectors = (
                [None] * len(rows) if pooled is None else [mx.array(v) for v in quantize_embeddings(pooled, precision)]
            )
            result = [
                {"input_ids": mx.array(row.input_ids), "token_embeddings": states}
                | ({} if vector is None else {"sentence_embedding": vector})
                for row, states, vector in zip(rows, tokens, vectors)
            ]
    return result[0] if single else result


def resolve_prompt(config, prompt, prompt_name):
    """sentence-transformers' rule: `prompt`, else the prompt named `prompt_name`, else the default prompt."""
    if prompt is not None:
        if prompt_name is not None:
            logger.warning(
                "Both prompt and prompt_name were given; prompt_name=%r is ignored in favour of prompt.", prompt_name
            )
        return prompt
    if prompt_name is not None:
        if prompt_name not in config.prompts:
            raise InputError(
                f"prompt_name={prompt_name!r} is not one of this model's prompts ({sorted(config.prompts) or 'none'}): "
                "set config.prompts, or pass prompt='...'."
            )
        return config.prompts[prompt_name]
    return config.prompts.get(config.default_prompt_name) if config.default_prompt_name is not None else None


def pooled_embeddings(model: M2BertModel, batch: dict, normalize: bool) -> mx.array:
    """The float32 pooled output of one padded batch (L2-normalized with `normalize`), evaluated: what `encode`
    gives per batch for the sentence embedding, for `m2bert_hf_mlx.distributed` to run batch by batch."""
    pooled = model(**batch).pooler_output.astype(mx.float32)
    if normalize:
        pooled = l2_normalize(pooled)
    mx.eval(pooled)
    return pooled
