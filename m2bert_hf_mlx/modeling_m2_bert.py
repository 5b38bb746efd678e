"""M2-BERT (Monarch Mixer BERT) in MLX.

The modules mirror the canonical PyTorch code (HazyResearch/m2, bert/src/bert_layers.py and bert/src/mm/) and keep
its parameter names, so a checkpoint key such as `bert.encoder.layer.0.attention.filter_fn.pos_emb.z` names the same
array here. Hidden states are channels-last (B, L, D) throughout; the canonical (B, D, L) transposes are not needed.
"""

import operator
import os
import weakref

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import ops
from .activations import ACT2FN, gelu, glu
from .blockdiag_linear import BlockdiagLinear, from_blocks, to_blocks
from .configuration_m2_bert import M2BertConfig, validate_config
from .errors import CompileError, ConfigError, InputError, WeightsMismatchError, first_line, quote, warn_at_caller
from .hyena_filter import HyenaFilter
from .initialization import normal
from .losses import classification_loss, masked_lm_loss
from .modeling_outputs import (
    M2BertModelOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
)
from .modeling_utils import PreTrainedModel
from .recompute import reference_vjp
from .short_conv import CausalShortConv
from .similarity import check_similarity_fn_name, similarity, similarity_pairwise

COMPILE_ENV = "M2BERT_COMPILE"
# Why mx.compile failed on an encoder in this process, if it did: inference then stays uncompiled.
_compile_failures = []


class CompileFallbackWarning(RuntimeWarning):
    """mx.compile failed on the encoder: inference runs uncompiled for the rest of the process."""


class M2BertEmbeddings(nn.Module):
    """Word + token-type (+ learned absolute position) embeddings, then LayerNorm (`BertEmbeddings`)."""

    def __init__(self, config):
        super().__init__()
        D = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, D)
        if config.use_positional_encodings:
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, D)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, D)
        self.LayerNorm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def __call__(self, input_ids, token_type_ids):
        embeddings = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        if "position_embeddings" in self:
            embeddings = embeddings + self.position_embeddings.weight[: input_ids.shape[1]]
        return self.dropout(self.LayerNorm(embeddings))


class MonarchMixerSequenceMixing(nn.Module):
    """The M2 sequence mixer: gated short conv, then a bidirectional long conv, plus a residual long conv of u."""

    def __init__(self, config):
        super().__init__()
        D = config.hidden_size
        self.hidden_size = D
        if config.hyena_training_additions:
            # The legacy mixer-input LayerNorm uses torch's default eps, not config.layer_norm_eps.
            self.layernorm = nn.LayerNorm(D, eps=1e-5)
        self.in_linear = nn.Linear(D, 3 * D)
        self.out_linear = nn.Linear(D, D)
        self.short_filter = CausalShortConv(3 * D)
        self.filter_fn = HyenaFilter(config)
        if config.residual_long_conv:
            self.filter_fn2 = HyenaFilter(config)

    def __call__(self, u):
        if "layernorm" in self:
            u = self.layernorm(u)
        return self.out_linear(self._mix(self.in_linear(u), u))

    def _mix(self, z, u):
        """ops.monarch_mixer of in_linear's output z and the layer input u (the residual long conv's input); at
        inference from the filters' cached spectra, with the gradients of the filters themselves."""
        short = self.short_filter
        filters = [self.filter_fn] + ([self.filter_fn2] if "filter_fn2" in self else [])
        L = u.shape[1]

        def mix(z, u, spectra=None, with_filters=True):
            convs = [(*(f.filters(L) if with_filters else (None, None)), f.bias) for f in filters]
            return ops.monarch_mixer(z, u, short.weight, short.bias, *convs, spectra=spectra)

        if self.training:
            return mix(z, u)
        spectra = [f.inference_spectrum(u) for f in filters]
        return reference_vjp(
            self,
            lambda z, u: mix(z, u, spectra, with_filters=False),
            lambda z, u: mix(z, u, spectra),
            keys=("short_filter", "filter_fn", "filter_fn2")[: 1 + len(filters)],
        )(z, u)


def _mlp_linear(config, in_features, out_features, bias):
    if config.use_monarch_mlp:
        return BlockdiagLinear(in_features, out_features, config.monarch_mlp_nblocks, bias=bias)
    return nn.Linear(in_features, out_features, bias=bias)


def _glu(h):
    """Exact GELU of the first half times the second half."""
    gated, non_gated = mx.split(h, 2, axis=-1)
    return glu(gated, non_gated)


class M2BertMLP(nn.Module):
    """State mixer with the layer's only residual and post-LayerNorm: LN(wo(act(gated_layers(a))) + a).

    With `use_glu_mlp` (every published model) gated_layers outputs 2I and act is GELU(first I) * second I.
    """

    def __init__(self, config):
        super().__init__()
        self.glu = config.use_glu_mlp
        I, D, nblocks = config.intermediate_size, config.hidden_size, config.monarch_mlp_nblocks
        self.gated_layers = _mlp_linear(config, config.hidden_size, 2 * I if self.glu else I, bias=False)
        self.wo = _mlp_linear(config, I, config.hidden_size, bias=True)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.glu_in_blocks = (
            self.glu and config.use_monarch_mlp and nblocks % 2 == 0 and D % nblocks == 0 and I % nblocks == 0
        )

    def __call__(self, a):
        if self.glu_in_blocks:
            return self.layernorm(self._block_glu(a) + a)
        h = self.gated_layers(a)
        h = _glu(h) if self.glu else gelu(h)
        return self.layernorm(self.wo(self.dropout(h)) + a)

    def _block_glu(self, a):
        """wo(GLU(gated_layers(a))) in the blocks' own layout. With an even number of blocks the GLU's halves are
        gated_layers' first and last nblocks/2 output blocks, and each of those holds the inputs of two wo blocks,
        so the GLU can write wo's input layout directly: the (N, 2I) activations, the widest in the model, are
        never transposed (a copy of 0.8 GB per layer at L = 32768 in float32, and the peak memory with it)."""
        nblocks = self.gated_layers.weight.shape[0]
        h = self.gated_layers.block_matmul(to_blocks(a, nblocks))
        half, N, width = nblocks // 2, h.shape[1], h.shape[2] // 2

        def wo_layout(x):  # (half, N, 2 * width) -> the strided view (half, 2, N, width)
            return x.reshape(half, N, 2, width).transpose(0, 2, 1, 3)

        z = glu(wo_layout(h[:half]), wo_layout(h[half:])).reshape(nblocks, N, width)
        return from_blocks(self.wo.block_matmul(self.dropout(z)), a.shape[:-1]) + self.wo.bias


class M2BertLayer(nn.Module):
    """h <- MLP(Mixer(h)): no residual or norm around the mixer (its residual long conv is the skip path)."""

    def __init__(self, config):
        super().__init__()
        self.attention = MonarchMixerSequenceMixing(config)
        self.mlp = M2BertMLP(config)

    def __call__(self, hidden_states):
        return self.mlp(self.attention(hidden_states))


def compiles_inference():
    """Whether the encoder runs its layers through `mx.compile` at inference: M2BERT_COMPILE=1 or 0, unset on a GPU
    only (the CPU back end compiles with the system C++ compiler, which takes seconds for each new shape). Never on
    the "emulated" long-convolution back end, whose kernels run on numpy arrays outside MLX's graph."""
    value = os.environ.get(COMPILE_ENV, "")
    if value not in ("", "0", "1"):
        raise ConfigError(f"{COMPILE_ENV}={value!r} is not a valid setting; use 1 (compile), 0 (do not) or unset it.")
    if ops.resolve_backend() == "emulated" or _compile_failures:
        return False
    return mx.default_device().type == mx.gpu if value == "" else value == "1"


class M2BertEncoder(nn.Module):
    """The layers in turn; at inference compiled (`compiles_inference`), since launching a layer's many small
    kernels one by one costs a GPU more time than their arithmetic (docs/benchmarks.md)."""

    def __init__(self, config):
        super().__init__()
        self.layer = [M2BertLayer(config) for _ in range(config.num_hidden_layers)]
        self._compiled = _CompiledForward()

    def __call__(self, hidden_states):
        if self.training or not compiles_inference():
            return self._layers(hidden_states)
        return self._compiled(self, hidden_states)

    def _set_training_mode(self, mode):
        # What nn.Module.train() and eval() call on every module. Training replaces the weights at every step, and
        # the compiled forward holds the arrays it was traced with: kept, they would be a second copy of the
        # encoder's weights until the next inference.
        super()._set_training_mode(mode)
        if mode:
            self._compiled = _CompiledForward()

    def _layers(self, hidden_states):
        for layer in self.layer:
            hidden_states = layer(hidden_states)
        return hidden_states


class _CompiledForward:
    """M2BertEncoder's compiled inference; a plain object, so MLX never takes it for parameters.

    The compiled function reads the weights and the filters' cached spectra as constants, so it serves only the very
    arrays and modules it was traced with, at one shape: any other makes a new one. Like the spectrum cache it keeps
    the latest only, and it compiles at the second forward of the same shape and weights, so that inputs of
    ever-changing shapes, and gradients of the weights (whose traced copies are new arrays at every call), run
    uncompiled and pay for no trace. The first forward also runs the kernels' self-checks and fills the spectrum caches.
    """

    def __init__(self):
        self.key, self.contents, self.function = None, [], None

    def __call__(self, encoder, hidden_states):
        key = (tuple(hidden_states.shape), hidden_states.dtype, ops.resolve_backend())
        contents = _contents(encoder)
        # Every module's mode, not only the encoder's: a trace of a layer in training mode would replay one dropout
        # mask at every call.
        if any(isinstance(item, nn.Module) and item.training for item in contents):
            return encoder._layers(hidden_states)
        if (
            key != self.key
            or len(contents) != len(self.contents)
            or not all(map(operator.is_, contents, self.contents))
        ):
            self.key, self.contents, self.function = key, contents, None
            return encoder._layers(hidden_states)
        if self.function is not None:
            return self.function(hidden_states)
        # Through a weak reference: the encoder holds this object, and a cycle would keep a deleted model's arrays
        # alive until Python's cycle collector happens to run.
        encoder_ref = weakref.ref(encoder)
        self.function = mx.compile(lambda hidden_states: encoder_ref()._layers(hidden_states))
        try:
            return self.function(hidden_states)  # traced here
        except Exception as e:  # noqa: BLE001 -- the same forward just ran uncompiled: this failure is compile's
            self.function = None
            _compile_failed(e)
            return encoder._layers(hidden_states)


def _compile_failed(error):
    """Warn once and stay uncompiled for the rest of the process, unless M2BERT_COMPILE=1 asks for compiling."""
    what = first_line(error)
    if os.environ.get(COMPILE_ENV) == "1":
        raise CompileError(
            f"mx.compile failed on the M2-BERT encoder ({what}); {COMPILE_ENV}=1 forbids running it uncompiled: "
            "unset it, and please report this to the m2bert-hf-mlx issue tracker."
        ) from error
    warn_at_caller(
        f"mx.compile failed on the M2-BERT encoder ({what}). Inference now runs uncompiled for the rest of this "
        "process, which took up to 1.65x as long on an NVIDIA H200 (docs/benchmarks.md of m2bert-hf-mlx). Please "
        f"report this message with your device, OS and MLX versions to the m2bert-hf-mlx issue tracker; set "
        f"{COMPILE_ENV}=0 to skip compiling.",
        CompileFallbackWarning,
    )
    _compile_failures.append(what)


def _contents(tree):
    """Every module, container and array below a module, depth first: what identifies the weights a compiled forward
    read. New weights (load_weights, update, an optimizer step) are new array objects; an in-place update
    (`w[...] = v`, `w += v`) keeps the object and is not seen, as the README says."""
    found = []
    for value in tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ():
        found += [value, *_contents(value)]
    return found


class M2BertPooler(nn.Module):
    """tanh(dense(h[:, 0])), or of the attention-masked mean of h when `pool_all`."""

    def __init__(self, config):
        super().__init__()
        self.pool_all = config.pool_all
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def __call__(self, hidden_states, attention_mask):
        if self.pool_all:
            mask = attention_mask.astype(hidden_states.dtype)[..., None]
            pooled = (hidden_states * mask).sum(axis=1) / mask.sum(axis=1)
        else:
            pooled = hidden_states[:, 0]
        return mx.tanh(self.dense(pooled))


class M2BertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.act = ACT2FN[config.hidden_act]
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)  # hard-coded in the canonical head

    def __call__(self, hidden_states):
        return self.LayerNorm(self.act(self.dense(hidden_states)))


class M2BertLMPredictionHead(nn.Module):
    """Transform, then the decoder tied to the word embeddings, with its own bias (`decoder.bias`)."""

    def __init__(self, config):
        super().__init__()
        self.transform = M2BertPredictionHeadTransform(config)
        self.decoder = {"bias": mx.zeros((config.vocab_size,))}

    def __call__(self, hidden_states, word_embeddings):
        return word_embeddings.as_linear(self.transform(hidden_states)) + self.decoder["bias"]


class M2BertOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = M2BertLMPredictionHead(config)


def _init_like_canonical(module, config):
    """The canonical initialisation (transformers' BERT `_init_weights` on Linear/Embedding/LayerNorm)."""
    std = config.initializer_range
    for _, m in module.named_modules():
        if isinstance(m, nn.Linear):
            m.weight = normal(m.weight.shape, std)
            if "bias" in m:
                m.bias = mx.zeros_like(m.bias)
        elif isinstance(m, nn.Embedding):
            m.weight = normal(m.weight.shape, std)
        elif isinstance(m, nn.LayerNorm):
            m.weight, m.bias = mx.ones_like(m.weight), mx.zeros_like(m.bias)
    words = module.embeddings.word_embeddings if isinstance(module, M2BertModel) else None
    if words is not None and config.pad_token_id is not None:
        words.weight[config.pad_token_id] = 0.0


class M2BertPreTrainedModel(PreTrainedModel):
    """The M2-BERT model classes' base: their config class and the checkpoint-name mapping."""

    config_class = M2BertConfig
    base_model_prefix = "bert"

    def __init__(self, config):
        super().__init__(config)
        validate_config(config)  # again: fields may have been changed since the config was built

    @property
    def dtype(self):
        """The float dtype of the weights (read from a LayerNorm: embeddings may be quantized)."""
        base = self.bert if "bert" in self else self
        return base.embeddings.LayerNorm.weight.dtype

    def sanitize(self, weights: dict) -> dict:
        """Map checkpoint tensors onto this model's weight names. Idempotent: MLX weights pass through unchanged.

        Handles the canonical PyTorch names (with the Composer `model.` or DDP `module.` prefixes), the depthwise
        conv layout, the shared `freq` copies and the tied decoder (checked, not silently dropped), the
        `position_ids` buffer (checked to be arange), and the `bert.` prefix of head models.
        """
        return sanitize_weights(self, weights)


class M2BertModel(M2BertPreTrainedModel):
    """Embeddings, encoder and, when `config.add_pooling_layer`, the pooler (the retrieval models' embedding)."""

    def __init__(self, config, add_pooling_layer=None):
        super().__init__(config)
        self.embeddings = M2BertEmbeddings(config)
        self.encoder = M2BertEncoder(config)
        if config.add_pooling_layer if add_pooling_layer is None else add_pooling_layer:
            self.pooler = M2BertPooler(config)
        _init_like_canonical(self, config)

    def __call__(
        self, input_ids: mx.array, token_type_ids: mx.array | None = None, attention_mask: mx.array | None = None
    ) -> M2BertModelOutput:
        """The attention mask is not used by the sequence mixer (the canonical M2 path ignores it too): outputs
        depend on padding. It only enters the mean pooler when `config.pool_all`."""
        input_ids = _check_input_ids(input_ids, self.config)
        if token_type_ids is None:
            token_type_ids = mx.zeros_like(input_ids)
        else:
            token_type_ids = _check_token_type_ids(token_type_ids, input_ids, self.config)
        if attention_mask is None:
            attention_mask = mx.ones_like(input_ids)
        hidden_states = self.encoder(self.embeddings(input_ids, token_type_ids))
        pooled = self.pooler(hidden_states, attention_mask) if "pooler" in self else None
        return M2BertModelOutput(last_hidden_state=hidden_states, pooler_output=pooled)

    def encode(self, sentences, **kwargs) -> "np.ndarray | mx.array | list":
        """Sentence embeddings (the pooled output) of one text or a list of texts, with sentence-transformers'
        arguments: `batch_size`, `show_progress_bar`, `normalize_embeddings`, `convert_to_numpy`,
        `convert_to_tensor`, `prompt`, `prompt_name`, `precision`, `output_value`, plus `tokenizer`, `padding` and
        `truncation`; see `m2bert_hf_mlx.encode.encode`."""
        from .encode import encode

        return encode(self, sentences, **kwargs)

    def encode_query(self, sentences, *, prompt: str | None = None, prompt_name: str | None = None, **kwargs):
        """`encode` for search queries, as sentence-transformers' `encode_query`: with the "query" prompt of
        `config.prompts` when it has one and no prompt is given."""
        if prompt is None and prompt_name is None and "query" in self.config.prompts:
            prompt_name = "query"
        return self.encode(sentences, prompt=prompt, prompt_name=prompt_name, **kwargs)

    def encode_document(self, sentences, *, prompt: str | None = None, prompt_name: str | None = None, **kwargs):
        """`encode` for the documents searched, as sentence-transformers' `encode_document`: with the first of the
        "document", "passage" and "corpus" prompts of `config.prompts` when no prompt is given."""
        if prompt is None and prompt_name is None:
            prompt_name = next((n for n in ("document", "passage", "corpus") if n in self.config.prompts), None)
        return self.encode(sentences, prompt=prompt, prompt_name=prompt_name, **kwargs)

    @property
    def similarity_fn_name(self) -> str:
        """sentence-transformers' name of the similarity `similarity` computes (config.similarity_fn_name, by
        default "cosine")."""
        return self.config.similarity_fn_name or "cosine"

    @similarity_fn_name.setter
    def similarity_fn_name(self, name: str) -> None:
        self.config.similarity_fn_name = check_similarity_fn_name(name)

    def similarity(self, embeddings1, embeddings2) -> mx.array:
        """(N, M) similarities of two sets of embeddings by `similarity_fn_name`; see `m2bert_hf_mlx.similarity`."""
        return similarity(embeddings1, embeddings2, self.similarity_fn_name)

    def similarity_pairwise(self, embeddings1, embeddings2) -> mx.array:
        """(N,) similarities of `embeddings1[i]` and `embeddings2[i]` by `similarity_fn_name`."""
        return similarity_pairwise(embeddings1, embeddings2, self.similarity_fn_name)


class M2BertForMaskedLM(M2BertPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.bert = M2BertModel(config, add_pooling_layer=False)
        self.cls = M2BertOnlyMLMHead(config)
        _init_like_canonical(self.cls, config)

    def __call__(
        self,
        input_ids: mx.array,
        token_type_ids: mx.array | None = None,
        attention_mask: mx.array | None = None,
        labels: mx.array | None = None,
    ) -> MaskedLMOutput:
        """Logits over the padded vocabulary (config.vocab_size); with `labels`, the mean cross-entropy over the
        positions whose label is not -100."""
        hidden_states = self.bert(input_ids, token_type_ids, attention_mask).last_hidden_state
        logits = self.cls.predictions(hidden_states, self.bert.embeddings.word_embeddings)
        loss = None if labels is None else masked_lm_loss(logits, labels)
        return MaskedLMOutput(logits=logits, loss=loss)


class M2BertForSequenceClassification(M2BertPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = M2BertModel(config, add_pooling_layer=True)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        _init_like_canonical(self.classifier, config)

    def __call__(
        self,
        input_ids: mx.array,
        token_type_ids: mx.array | None = None,
        attention_mask: mx.array | None = None,
        labels: mx.array | None = None,
    ) -> SequenceClassifierOutput:
        pooled = self.bert(input_ids, token_type_ids, attention_mask).pooler_output
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else classification_loss(logits, labels, self.config)
        return SequenceClassifierOutput(logits=logits, loss=loss)


def check_token_ids(ids, size, what="input_ids"):
    """Raise an InputError unless every id is in [0, size): MLX's gather does not check its indices, so an id
    outside a table reads (or, in a scatter, writes) memory outside it. `ids` is an MLX or numpy array; every path
    to an embedding lookup runs this first. Inside mx.compile or vmap nothing can be evaluated, so there the caller
    checks its ids (the trainer checks its tokenizer against the model with `check_tokenizer_fits` and draws random
    ids below its size)."""
    integer = mx.issubdtype(ids.dtype, mx.integer) if isinstance(ids, mx.array) else ids.dtype.kind in "iu"
    if not integer:
        raise InputError(f"{what} must hold integer token ids, got {ids.dtype}.")
    if ids.size == 0:
        return
    try:
        low, high = ids.min().item(), ids.max().item()
    except ValueError:  # a traced array: see above
        return
    if low < 0 or high >= size:
        bad = low if low < 0 else high
        raise InputError(
            f"{what} holds the id {bad}, outside this model's table of {size} (valid ids: 0 to {size - 1}); check "
            "that the tokenizer is the model's."
        )


def _as_ids(ids, size, what):
    """`ids` as an MLX array, checked against a table of `size` rows; lists and numpy arrays are checked before
    they become MLX arrays, which cannot hold every Python int."""
    if not isinstance(ids, mx.array):
        try:
            checked = np.asarray(ids)
        except (ValueError, TypeError) as e:
            raise InputError(f"{what} must be a (batch, length) array of integer token ids.") from e
        check_token_ids(checked, size, what)
        return mx.array(checked)
    check_token_ids(ids, size, what)
    return ids


def _check_input_ids(input_ids, config):
    input_ids = _as_ids(input_ids, config.vocab_size, "input_ids")
    if input_ids.ndim != 2:
        raise InputError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}.")
    L = input_ids.shape[1]
    if L == 0:
        raise InputError("input_ids is empty: give at least one token per sequence.")
    if L > config.max_sequence_length:
        raise InputError(
            f"Input of length {L} is longer than this model's maximum of {config.max_sequence_length} tokens "
            "(max_position_embeddings / long_conv_l_max). Truncate the input (tokenizer truncation=True)."
        )
    return input_ids


def _check_token_type_ids(token_type_ids, input_ids, config):
    token_type_ids = _as_ids(token_type_ids, config.type_vocab_size, "token_type_ids")
    if token_type_ids.shape != input_ids.shape:
        raise InputError(
            f"token_type_ids has shape {tuple(token_type_ids.shape)}, input_ids {tuple(input_ids.shape)}; "
            "they must match."
        )
    return token_type_ids


# ---------------------------------------------------------------------------------------------------------------
# sanitize: checkpoint names -> this package's names


def strip_training_prefixes(key):
    """DDP's `module.` and Composer's `model.` name the wrappers of a training run, not the model."""
    while key.startswith(("module.", "model.")):
        key = key.split(".", 1)[1]
    return key


def _same(a, b):
    return a.shape == b.shape and bool(mx.array_equal(a.astype(mx.float32), b.astype(mx.float32)))


def sanitize_weights(model, weights):
    """See `M2BertPreTrainedModel.sanitize`."""
    has_base_prefix = "bert" in model
    out = {}
    for original, value in weights.items():
        key = strip_training_prefixes(original)
        if has_base_prefix and key.split(".")[0] in ("embeddings", "encoder", "pooler"):
            key = "bert." + key
        elif not has_base_prefix and key.startswith("bert."):
            key = key[len("bert.") :]
        if key in out:
            raise WeightsMismatchError(
                f"{quote(original)} and another tensor of the checkpoint both name the weight {quote(key)}."
            )
        out[key] = value

    for key in [k for k in out if k.endswith("embeddings.position_ids")]:
        ids = np.asarray(out.pop(key)).reshape(-1)
        if not np.array_equal(ids, np.arange(ids.size)):
            raise WeightsMismatchError(
                f"{key} is not arange({ids.size}); this checkpoint's positions are not canonical."
            )

    for key in [k for k in out if k.endswith("short_filter.weight")]:
        w = out[key]
        if w.ndim == 3 and w.shape[1] == 1 and w.shape[2] != 1:
            out[key] = w.transpose(0, 2, 1)  # torch depthwise (C, 1, k) -> MLX Conv1d (C, k, 1)

    _merge_shared_freq(out)

    base = "bert." if has_base_prefix else ""
    words_key = f"{base}embeddings.word_embeddings.weight"
    decoder_key = "cls.predictions.decoder.weight"
    if decoder_key in out:
        decoder = out.pop(decoder_key)
        if words_key not in out:
            out[words_key] = decoder
        elif not _same(decoder, out[words_key]):
            raise WeightsMismatchError(
                f"{decoder_key} differs from {words_key}: M2-BERT ties the MLM decoder to the word embeddings, so "
                "this checkpoint cannot be represented faithfully."
            )
    return out


def _merge_shared_freq(out):
    """The six `freq` copies of a HyenaFilter are one tensor in the canonical model: keep one, check the others."""
    copies = {}
    for key in list(out):
        parts = key.split(".")
        if parts[-1] == "freq" and len(parts) >= 3 and parts[-3] in ("implicit_filter", "implicit_filter_rev"):
            copies.setdefault(".".join(parts[:-3]), []).append(key)
    for filter_prefix, keys in copies.items():
        keys.sort(key=lambda k: (k.split(".")[-3] != "implicit_filter", k))
        target = f"{filter_prefix}.freq"
        reference = out.get(target, out[keys[0]])
        for key in keys:
            if not _same(out[key], reference):
                raise WeightsMismatchError(
                    f"{key} differs from {target}: the canonical HyenaFilter shares one Sin.freq between all its sine "
                    "activations, so this checkpoint does not describe an M2-BERT filter."
                )
            del out[key]
        out[target] = reference
