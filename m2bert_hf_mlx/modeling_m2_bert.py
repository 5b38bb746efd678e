"""M2-BERT (Monarch Mixer BERT) in MLX.

The modules mirror the canonical PyTorch code (HazyResearch/m2, bert/src/bert_layers.py and bert/src/mm/) and keep
its parameter names, so a checkpoint key such as `bert.encoder.layer.0.attention.filter_fn.pos_emb.z` names the same
array here. Hidden states are channels-last (B, L, D) throughout; the canonical (B, D, L) transposes are not needed.
"""

import functools
import math
import operator
import os
from dataclasses import dataclass, fields
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from . import ops
from .configuration_m2_bert import M2BertConfig

# erf(z)/z as a polynomial in u = z²/8 - 1 for |z| <= 4 (the power form of a degree-16 Chebyshev least-squares fit
# in float64; beyond 4, erf is ±1 in float32). Evaluated in float32 its error is below 2e-7, as small as MLX's erf.
_ERF_POLYNOMIAL = (
    3.535309975e-01, -1.765761846e-01, 1.316748394e-01, -1.077128408e-01, 9.021568369e-02, -7.469362173e-02,
    5.982504406e-02, -4.598314809e-02, 3.334546893e-02, -2.174387527e-02, 1.361992458e-02, -9.972879060e-03,
    5.934167638e-03, -1.156541089e-03, 3.873904270e-04, -1.350484223e-03, 6.560723874e-04,
)


def gelu(x):
    """The exact (erf) GELU of the canonical model. On the CPU it is computed from multiplies and adds only: there
    MLX's erf is a scalar loop several times slower than the fused polynomial, and the MLP applies GELU to 4x the
    hidden width. GPUs have a fast erf, which beats the polynomial."""
    return _gelu_polynomial(x) if mx.default_device() == mx.cpu else nn.gelu(x)


def glu(gated, non_gated):
    """GELU(gated) * non_gated in one fused pass (the inputs may be strided views; the output is contiguous)."""
    return (_glu_polynomial if mx.default_device() == mx.cpu else _glu_erf)(gated, non_gated)


def _polynomial_gelu(x):
    z = mx.clip(x.astype(mx.float32) * (1 / math.sqrt(2)), -4.0, 4.0)
    u = z * z * 0.125 - 1.0
    acc = _ERF_POLYNOMIAL[-1]
    for c in _ERF_POLYNOMIAL[-2::-1]:
        acc = acc * u + c
    erf = mx.clip(acc * z, -1.0, 1.0)
    return (0.5 * x * (1.0 + erf)).astype(x.dtype)


_gelu_polynomial = mx.compile(_polynomial_gelu)
_glu_polynomial = mx.compile(lambda gated, non_gated: _polynomial_gelu(gated) * non_gated)
_glu_erf = mx.compile(lambda gated, non_gated: nn.gelu(gated) * non_gated)


ACT2FN = {"gelu": gelu, "gelu_new": nn.gelu_approx, "gelu_pytorch_tanh": nn.gelu_approx, "relu": nn.relu, "silu": nn.silu}


@dataclass
class ModelOutput:
    """Outputs readable as attributes and as keys (`out.logits`, `out["logits"]`); keys are the fields that are set."""

    def keys(self):
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key):
        if key not in self.keys():
            raise KeyError(f"{type(self).__name__} has no {key!r}; it holds {self.keys()}")
        return getattr(self, key)

    def __contains__(self, key):
        return key in self.keys()

    def to_tuple(self):
        return tuple(getattr(self, k) for k in self.keys())


@dataclass
class M2BertModelOutput(ModelOutput):
    last_hidden_state: mx.array
    pooler_output: Optional[mx.array] = None


@dataclass
class MaskedLMOutput(ModelOutput):
    logits: mx.array
    loss: Optional[mx.array] = None


@dataclass
class SequenceClassifierOutput(ModelOutput):
    logits: mx.array
    loss: Optional[mx.array] = None


def _normal(shape, std):
    return mx.random.normal(shape) * std


def _uniform(shape, bound):
    return mx.random.uniform(-bound, bound, shape)


class Buffers:
    """Mixin for modules holding fixed arrays that checkpoints store but training never updates (torch buffers)."""

    buffer_names = ()

    def freeze_buffers(self):
        self.freeze(keys=list(self.buffer_names), recurse=False)


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


class PositionalEmbedding(nn.Module, Buffers):
    """The filter MLP's input features at l_max positions: z = [t, cos(f w), -sin(f w)] (trained) and t (fixed)."""

    buffer_names = ("t",)

    def __init__(self, emb_dim, seq_len):
        super().__init__()
        t = np.linspace(0, 1, seq_len)[None, :, None]
        w = 2 * math.pi * np.arange(seq_len)[None, :, None] / seq_len
        bands = (emb_dim - 1) // 2
        f = np.linspace(1e-4, bands - 1, bands)[None, None]
        self.z = mx.array(np.concatenate([t, np.cos(f * w), -np.sin(f * w)], axis=-1), dtype=mx.float32)
        self.t = mx.array(t, dtype=mx.float32)
        self.freeze_buffers()


class ExponentialModulation(nn.Module, Buffers):
    """Per-channel decay exp(-t |delta|) applied to the filter; the deltas are fixed (a buffer)."""

    buffer_names = ("deltas",)

    def __init__(self, d_model, fast_decay_pct=0.3, slow_decay_pct=1.5, target=1e-2):
        super().__init__()
        max_decay = math.log(target) / fast_decay_pct
        min_decay = math.log(target) / slow_decay_pct
        self.deltas = mx.array(np.linspace(min_decay, max_decay, d_model)[None, None], dtype=mx.float32)
        self.freeze_buffers()

    def __call__(self, t, h):
        return h * mx.exp(-t * mx.abs(self.deltas))


class Sin(nn.Module):
    """Marks where the implicit filter MLP applies sin(w_mod * freq * x); `freq` lives on the HyenaFilter, shared."""


def _implicit_filter(emb_dim, order, d_model):
    # Indices match the canonical nn.Sequential, so keys read implicit_filter.{0,2,4,6}.*
    return [nn.Linear(emb_dim, order), Sin(), nn.Linear(order, order), Sin(), nn.Linear(order, order), Sin(), nn.Linear(order, d_model, bias=False)]


@functools.cache
def max_cached_filter_bytes():
    """The largest filter spectrum kept between calls: 1/256 of the device's memory, so that the 24 of an 80M model
    take under a tenth of it. A 16 GB Mac keeps them up to L = 8192 (1.2 GB), an 8 GB Mac up to 4096, an 80 GB GPU
    at every length (4.8 GB at 32768); beyond that they are recomputed on each call (on the H100, 60% of the forward
    at L = 32768)."""
    info = mx.device_info()
    memory = info.get("memory_size") or info.get("total_memory") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return memory // 256


@dataclass
class _FilterCache:
    """HyenaFilter's inference cache; a plain object, so MLX never takes it for parameters."""

    key: tuple = ()
    weights: tuple = ()
    spectrum: Optional[ops.FilterSpectrum] = None
    conv: Optional[mx.custom_function] = None


class HyenaFilter(nn.Module):
    """Implicit long filter of a long convolution and its D-skip gain (`bias`)."""

    def __init__(self, config):
        super().__init__()
        D, order = config.hidden_size, config.hyena_filter_order
        self.w_mod = config.hyena_w_mod
        self.bias = mx.random.normal((D,))
        # One Sin.freq per filter, shared by the sine activations of both implicit MLPs.
        self.freq = mx.full((1, order), float(config.hyena_w))
        self.pos_emb = PositionalEmbedding(config.hyena_emb_dim, config.long_conv_l_max)
        self.implicit_filter = _implicit_filter(config.hyena_emb_dim, order, D)
        if config.bidirectional:
            self.implicit_filter_rev = _implicit_filter(config.hyena_emb_dim, order, D)
        self.modulation = ExponentialModulation(D)
        self._filter_cache = _FilterCache()

    def _filter(self, mlp, L, after):
        h = self.pos_emb.z[:, :L]
        if after is not None:
            h = mx.depends(h, after)
        for layer in mlp:
            h = mx.sin(self.w_mod * self.freq * h) if isinstance(layer, Sin) else layer(h)
        return self.modulation(self.pos_emb.t[:, :L], h)[0].T

    def filters(self, L, *, after=None):
        """(k_fwd, k_rev) of shape (D, L); k_rev is None for a causal filter. With `after`, an array, they are
        computed only once `after` is (see `_inference_conv`)."""
        k_fwd = self._filter(self.implicit_filter, L, after)
        k_rev = self._filter(self.implicit_filter_rev, L, after) if "implicit_filter_rev" in self else None
        return k_fwd, k_rev

    def __call__(self, u):
        L = u.shape[1]
        if self.training:
            k_fwd, k_rev = self.filters(L)
            return ops.long_conv(u, k_fwd, k_rev, self.bias)
        conv, weights = self._inference_conv(u)
        return conv(u, *weights)

    def _inference_conv(self, u):
        """The long conv at u's length from the filters' spectrum alone, and the weights to call it with: the
        spectrum is computed once and reused while the weights stay the same.

        MLX arrays are immutable, so new weights (load_weights, update, a training step) are new array objects:
        the cache is valid while it holds the very arrays the filter has now. It keeps the latest length only, and
        only up to `max_cached_filter_bytes()`: at L = 32768 one spectrum takes 200 MB, and caching all 24 of them
        would put the 32k model out of reach of small machines.
        """
        L = u.shape[1]
        backend = ops.resolve_backend()
        names, weights = zip(*tree_flatten(self.parameters()))
        cache = self._filter_cache
        if cache.key == (L, backend) and len(cache.weights) == len(weights) and all(map(operator.is_, cache.weights, weights)):
            return cache.conv, weights
        # The filters do not depend on the input, so MLX could compute those of every layer first and hold all
        # their spectra at once (about 5 GB at L = 32768): tying them to this layer's input keeps one at a time.
        k_fwd, k_rev = self.filters(L, after=u)
        spectrum = ops.filter_spectrum(k_fwd, k_rev, self.bias, L, backend=backend)
        conv = self._spectrum_conv(spectrum, names)
        if spectrum.values.nbytes <= max_cached_filter_bytes():
            self._filter_cache = _FilterCache((L, backend), weights, spectrum, conv)
        return conv, weights

    def _spectrum_conv(self, spectrum, names):
        """conv(u, *weights) from the spectrum alone: the filters themselves are not kept, which halves the cache.
        Gradients still reach every weight: when one is asked for, the VJP computes the filters again."""

        @mx.custom_function
        def conv(u, *weights):
            return ops.long_conv(u, None, None, self.bias, spectrum=spectrum)

        @conv.vjp
        def conv_vjp(primals, cotangent, output):
            originals = self.parameters()

            def with_filters(u, *weights):
                self.update(tree_unflatten(list(zip(names, weights))))
                k_fwd, k_rev = self.filters(u.shape[1])
                return ops.long_conv(u, k_fwd, k_rev, self.bias, spectrum=spectrum)

            try:
                return mx.vjp(with_filters, list(primals), [cotangent])[1]
            finally:
                self.update(originals)

        return conv


@mx.compile
def _short_conv_gate(x, weight, bias):
    """The causal short conv of in_linear's output, split into (x1, x2, v); returns (v * x1, x2).

    out[t] = w0 x[t-2] + w1 x[t-1] + w2 x[t] + b, as Conv1d(k=3, padding=2) keeping the first L outputs. Compiled,
    so the taps, the split and the pre-gate run as one fused pass over the (B, L, 3D) activations.
    """
    L = x.shape[1]
    w = weight[:, :, 0]
    padded = mx.pad(x, [(0, 0), (2, 0), (0, 0)])
    uc = padded[:, :L] * w[:, 0] + padded[:, 1 : L + 1] * w[:, 1] + x * w[:, 2] + bias
    x1, x2, v = mx.split(uc, 3, axis=-1)
    return v * x1, x2


class CausalShortConv(nn.Module):
    """Depthwise Conv1d(k=3, padding=2) keeping the first L outputs (the canonical `short_filter`); the weight
    has MLX's Conv1d layout (channels, 3, 1). Called with the gating that follows it, see `_short_conv_gate`."""

    def __init__(self, channels):
        super().__init__()
        bound = 1 / math.sqrt(3)
        self.weight = _uniform((channels, 3, 1), bound)
        self.bias = _uniform((channels,), bound)

    def __call__(self, x):
        return _short_conv_gate(x, self.weight, self.bias)


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
        u_orig = u
        gated_v, x2 = self.short_filter(self.in_linear(u))
        y = self.filter_fn(gated_v)
        y = y * x2
        if "filter_fn2" in self:
            y = y + self.filter_fn2(u_orig)
        return self.out_linear(y)


def to_blocks(x, nblocks):
    """(..., F) -> (nblocks, N, F / nblocks), a view: block k holds features [k F / nblocks, (k + 1) F / nblocks)."""
    return x.reshape(-1, nblocks, x.shape[-1] // nblocks).swapaxes(0, 1)


def from_blocks(y, lead):
    """(nblocks, N, W) -> (*lead, nblocks * W), the inverse of `to_blocks` (a copy)."""
    return y.swapaxes(0, 1).reshape(*lead, -1)


class BlockdiagLinear(nn.Module):
    """Block-diagonal linear map: weight (nblocks, out/nblocks, in/nblocks), block k maps input slice k to output slice k."""

    def __init__(self, in_features, out_features, nblocks, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        in_blk, out_blk = -(-in_features // nblocks), -(-out_features // nblocks)
        self.weight = _uniform((nblocks, out_blk, in_blk), 1 / math.sqrt(in_blk))
        if bias:
            self.bias = _uniform((out_features,), 1 / math.sqrt(out_features))

    def block_matmul(self, xb):
        """(nblocks, N, in/nblocks) -> (nblocks, N, out/nblocks): every block through its weight, bias not added."""
        return xb @ self.weight.swapaxes(1, 2)

    def __call__(self, x):
        nblocks, _, in_blk = self.weight.shape
        lead = x.shape[:-1]
        if nblocks * in_blk > self.in_features:
            x = mx.pad(x, [(0, 0)] * len(lead) + [(0, nblocks * in_blk - self.in_features)])
        y = from_blocks(self.block_matmul(to_blocks(x, nblocks)), lead)[..., : self.out_features]
        return y + self.bias if "bias" in self else y


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


class M2BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = [M2BertLayer(config) for _ in range(config.num_hidden_layers)]

    def __call__(self, hidden_states):
        for layer in self.layer:
            hidden_states = layer(hidden_states)
        return hidden_states


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
        if config.hidden_act not in ACT2FN:
            raise ValueError(f"Unsupported hidden_act {config.hidden_act!r}; supported: {', '.join(ACT2FN)}.")
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
            m.weight = _normal(m.weight.shape, std)
            if "bias" in m:
                m.bias = mx.zeros_like(m.bias)
        elif isinstance(m, nn.Embedding):
            m.weight = _normal(m.weight.shape, std)
        elif isinstance(m, nn.LayerNorm):
            m.weight, m.bias = mx.ones_like(m.weight), mx.zeros_like(m.bias)
    words = module.embeddings.word_embeddings if isinstance(module, M2BertModel) else None
    if words is not None and config.pad_token_id is not None:
        words.weight[config.pad_token_id] = 0.0


class M2BertPreTrainedModel(nn.Module):
    """Loading, saving and weight bookkeeping shared by the model classes."""

    config_class = M2BertConfig
    base_model_prefix = "bert"

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, M2BertConfig):
            raise TypeError(f"{type(self).__name__} takes an M2BertConfig, got {type(config).__name__}.")
        self.config = config

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        """Load a model from a local folder or a Hub repo id.

        Arguments: `config`, `revision`, `cache_dir`, `local_files_only`, `token`, `force_download`, `dtype`
        ("float32", "float16", "bfloat16"), `strict` (default True: every checkpoint tensor used and every weight
        filled), `endpoint`; any other keyword overrides a config field.
        """
        from .loading import load_model

        return load_model(cls, name_or_path, **kwargs)

    def save_pretrained(self, save_directory, *, max_shard_size=None):
        """Write config.json and the weights as MLX safetensors (sharded above `max_shard_size` bytes, default 5 GB)."""
        from .loading import save_model

        save_model(self, save_directory, max_shard_size=max_shard_size)

    def push_to_hub(self, repo_id, **kwargs):
        """Upload this model (config, weights, tokenizer, card) to a Hub repo; see `m2bert_hf_mlx.hub.push_to_hub`."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def buffer_keys(self):
        """Names of the fixed arrays (torch buffers): stored in checkpoints, not parameters, never trained."""
        return {
            f"{prefix}.{name}" if prefix else name
            for prefix, module in self.named_modules()
            if isinstance(module, Buffers)
            for name in module.buffer_names
        }

    def num_parameters(self, only_trainable=False):
        """Parameter count as transformers reports it: buffers excluded, the tied decoder counted once."""
        params = self.trainable_parameters() if only_trainable else self.parameters()
        buffers = self.buffer_keys()
        return sum(v.size for k, v in tree_flatten(params) if k not in buffers)

    @property
    def dtype(self):
        """The float dtype of the weights (read from a LayerNorm: embeddings may be quantized)."""
        base = self.bert if "bert" in self else self
        return base.embeddings.LayerNorm.weight.dtype

    def sanitize(self, weights):
        """Map checkpoint tensors onto this model's weight names. Idempotent: MLX weights pass through unchanged.

        Handles the canonical PyTorch names (with the Composer `model.` or DDP `module.` prefixes), the depthwise
        conv layout, the shared `freq` copies and the tied decoder (checked, not silently dropped), the
        `position_ids` buffer (checked to be arange), and the `bert.` prefix of head models.
        """
        from .loading import sanitize_weights

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

    def __call__(self, input_ids, token_type_ids=None, attention_mask=None):
        """The attention mask is not used by the sequence mixer (the canonical M2 path ignores it too): outputs
        depend on padding. It only enters the mean pooler when `config.pool_all`."""
        input_ids = _check_input_ids(input_ids, self.config)
        if token_type_ids is None:
            token_type_ids = mx.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = mx.ones_like(input_ids)
        hidden_states = self.encoder(self.embeddings(input_ids, token_type_ids))
        pooled = self.pooler(hidden_states, attention_mask) if "pooler" in self else None
        return M2BertModelOutput(last_hidden_state=hidden_states, pooler_output=pooled)

    def encode(self, texts, **kwargs):
        """Sentence embeddings (the pooled output) of one text or a list of texts, as a float32 (N, D) array, like
        sentence-transformers' `encode`. Arguments: `tokenizer`, `batch_size`, `normalize`, `padding`,
        `truncation`, `show_progress_bar`, `convert_to`; see `m2bert_hf_mlx.pipelines.encode`."""
        from .pipelines import encode

        return encode(self, texts, **kwargs)


class M2BertForMaskedLM(M2BertPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.bert = M2BertModel(config, add_pooling_layer=False)
        self.cls = M2BertOnlyMLMHead(config)
        _init_like_canonical(self.cls, config)

    def __call__(self, input_ids, token_type_ids=None, attention_mask=None, labels=None):
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

    def __call__(self, input_ids, token_type_ids=None, attention_mask=None, labels=None):
        pooled = self.bert(input_ids, token_type_ids, attention_mask).pooler_output
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else classification_loss(logits, labels, self.config)
        return SequenceClassifierOutput(logits=logits, loss=loss)


def masked_lm_loss(logits, labels):
    """Mean cross-entropy over the positions whose label is not -100 (transformers' ignore index)."""
    mask = labels != -100
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), mx.where(mask, labels, 0), reduction="none")
    return (ce * mask).sum() / mx.maximum(mask.sum(), 1)


def classification_loss(logits, labels, config):
    """Regression (MSE) for one label, else single- or multi-label cross-entropy, as transformers decides it."""
    logits = logits.astype(mx.float32)
    problem = config.problem_type
    if problem is None:
        problem = "regression" if config.num_labels == 1 else "single_label_classification"
        if config.num_labels > 1 and labels.ndim == 2:
            problem = "multi_label_classification"
    if problem == "regression":
        return nn.losses.mse_loss(logits.squeeze(-1) if config.num_labels == 1 else logits, labels.astype(mx.float32))
    if problem == "multi_label_classification":
        return nn.losses.binary_cross_entropy(logits, labels.astype(mx.float32), reduction="mean")
    return nn.losses.cross_entropy(logits, labels, reduction="mean")


def _check_input_ids(input_ids, config):
    if not isinstance(input_ids, mx.array):
        input_ids = mx.array(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}.")
    L = input_ids.shape[1]
    if L == 0:
        raise ValueError("input_ids is empty: give at least one token per sequence.")
    if L > config.max_sequence_length:
        raise ValueError(
            f"Input of length {L} is longer than this model's maximum of {config.max_sequence_length} tokens "
            "(max_position_embeddings / long_conv_l_max). Truncate the input (tokenizer truncation=True)."
        )
    return input_ids
