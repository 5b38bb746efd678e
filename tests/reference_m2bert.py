"""An independent float64 NumPy reference of the canonical M2-BERT forward pass (HazyResearch/m2, eval mode).

It is written from the architecture notes (``shared/docs/m2bert-architecture.md``, section 2), never from the
MLX package, so the tests can hold the package to it. Every function takes a config dict with the canonical
field names and a canonical state dict (``bert.*``, ``cls.*``, ``classifier.*`` keys, PyTorch shapes) and
computes in float64. Every dropout is the identity and the attention mask is ignored except by the masked-mean
pooler, exactly like the canonical model in eval mode.
"""

import math

import numpy as np

# The canonical BertConfig defaults (configuration_bert.py over transformers.BertConfig) for the options a
# config dict may leave out; note that use_positional_encodings is off there although every M2 yaml sets it.
CANONICAL_DEFAULTS = {
    "bidirectional": True,
    "residual_long_conv": False,
    "hyena_training_additions": False,
    "hyena_w_mod": 1,
    "use_glu_mlp": True,
    "use_monarch_mlp": False,
    "monarch_mlp_nblocks": 4,
    "use_positional_encodings": False,
    "pool_all": False,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "type_vocab_size": 2,
}

# The legacy mixer-input nn.LayerNorm keeps torch's default eps; the MLM transform hard-codes its own.
MIXER_LAYER_NORM_EPS = 1e-5
MLM_LAYER_NORM_EPS = 1e-12


def forward(config, state_dict, input_ids, token_type_ids=None, attention_mask=None):
    """Every output of the canonical model whose weights ``state_dict`` holds.

    Returns a dict with ``sequence_output`` (B, L, D) always, ``pooled_output`` (B, D) when the state dict has
    ``bert.pooler.*``, ``mlm_logits`` (B, L, V) when it has ``cls.*`` and ``logits`` (B, num_labels) when it
    has ``classifier.*`` (the sequence-classification head on the pooled output).
    """
    config = {**CANONICAL_DEFAULTS, **config}
    if config["hidden_act"] != "gelu":
        raise ValueError(f"hidden_act={config['hidden_act']!r}: the reference implements only the exact 'gelu'")
    params = {k: float64_unless_integer(np.asarray(v)) for k, v in state_dict.items()}
    input_ids = np.asarray(input_ids)
    check_sequence_length(config, input_ids.shape[1])
    token_type_ids = np.zeros_like(input_ids) if token_type_ids is None else np.asarray(token_type_ids)
    attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)

    hidden_states = embeddings(config, params, input_ids, token_type_ids)
    for i in range(config["num_hidden_layers"]):
        hidden_states = encoder_layer(config, params, f"bert.encoder.layer.{i}.", hidden_states)

    outputs = {"sequence_output": hidden_states}
    if "bert.pooler.dense.weight" in params:
        outputs["pooled_output"] = pooler(config, params, hidden_states, attention_mask)
    if "classifier.weight" in params:
        outputs["logits"] = linear(outputs["pooled_output"], params["classifier.weight"], params["classifier.bias"])
    if "cls.predictions.decoder.weight" in params:
        outputs["mlm_logits"] = mlm_head(params, hidden_states)
    return outputs


def float64_unless_integer(array):
    """Weights in float64; the integer position_ids buffer stays an index array."""
    return array if np.issubdtype(array.dtype, np.integer) else array.astype(np.float64)


def check_sequence_length(config, length):
    """The filters' positional tables (and the position embeddings) have a fixed number of rows."""
    if length > config["long_conv_l_max"]:
        raise ValueError(
            f"sequence length {length} exceeds long_conv_l_max={config['long_conv_l_max']}: truncate or split the input"
        )
    if config["use_positional_encodings"] and length > config["max_position_embeddings"]:
        raise ValueError(
            f"sequence length {length} exceeds max_position_embeddings={config['max_position_embeddings']}: "
            "truncate or split the input"
        )


def embeddings(config, params, input_ids, token_type_ids):
    """LN(word + token type + learned absolute position embeddings); positions are the buffer's first L ids."""
    prefix = "bert.embeddings."
    h = params[prefix + "word_embeddings.weight"][input_ids]
    h = h + params[prefix + "token_type_embeddings.weight"][token_type_ids]
    if config["use_positional_encodings"]:
        position_ids = params[prefix + "position_ids"][0, : input_ids.shape[1]]
        h = h + params[prefix + "position_embeddings.weight"][position_ids]
    weight, bias = params[prefix + "LayerNorm.weight"], params[prefix + "LayerNorm.bias"]
    return layer_norm(h, weight, bias, config["layer_norm_eps"])


def encoder_layer(config, params, prefix, hidden_states):
    """``MLP(M(h))``: no residual or norm around the mixer; the MLP holds the only residual and the post-LN."""
    mixed = sequence_mixer(config, params, prefix + "attention.", hidden_states)
    return mlp(config, params, prefix + "mlp.", mixed)


def sequence_mixer(config, params, prefix, u):
    """MonarchMixerSequenceMixing on u (B, L, D)."""
    d = config["hidden_size"]
    if config["hyena_training_additions"]:
        u = layer_norm(u, params[prefix + "layernorm.weight"], params[prefix + "layernorm.bias"], MIXER_LAYER_NORM_EPS)
    projected = linear(u, params[prefix + "in_linear.weight"], params[prefix + "in_linear.bias"]).transpose(0, 2, 1)
    uc = causal_short_conv(projected, params[prefix + "short_filter.weight"], params[prefix + "short_filter.bias"])
    x1, x2, v = uc[:, :d], uc[:, d : 2 * d], uc[:, 2 * d :]
    y = hyena_long_conv(config, params, prefix + "filter_fn.", v * x1) * x2
    if config["residual_long_conv"]:
        # The residual branch convolves the mixer input itself (after the legacy LN) and is not gated by x2.
        y = y + hyena_long_conv(config, params, prefix + "filter_fn2.", u.transpose(0, 2, 1))
    return linear(y.transpose(0, 2, 1), params[prefix + "out_linear.weight"], params[prefix + "out_linear.bias"])


def causal_short_conv(x, weight, bias):
    """Depthwise Conv1d(kernel 3, padding 2) keeping the first L outputs: out[t] = w0 x[t-2] + w1 x[t-1] + w2 x[t] + b.

    x is (B, C, L); weight has the PyTorch depthwise shape (C, 1, 3).
    """
    length = x.shape[-1]
    padded = np.pad(x, ((0, 0), (0, 0), (2, 0)))
    taps = weight[:, 0, :, None]
    return sum(taps[:, j] * padded[..., j : j + length] for j in range(3)) + bias[:, None]


def hyena_long_conv(config, params, prefix, u):
    """One HyenaFilter applied to u (B, D, L): its implicit kernels, the long convolution and its D-skip."""
    k_fwd, k_rev = hyena_kernels(config, params, prefix, u.shape[-1])
    return long_conv(u, k_fwd, k_rev, params[prefix + "bias"])


def hyena_kernels(config, params, prefix, length):
    """(k_fwd, k_rev) of shape (D, L) each; k_rev is None when the model is not bidirectional.

    The positional tables are the first L rows of the stored l_max-long ones, never rebuilt for length L.
    """
    z = params[prefix + "pos_emb.z"][0, :length]
    t = params[prefix + "pos_emb.t"][0, :length]
    decay = np.exp(-t * np.abs(params[prefix + "modulation.deltas"][0, 0]))
    k_fwd = (implicit_filter_mlp(config, params, prefix + "implicit_filter.", z) * decay).T
    if not config["bidirectional"]:
        return k_fwd, None
    k_rev = (implicit_filter_mlp(config, params, prefix + "implicit_filter_rev.", z) * decay).T
    return k_fwd, k_rev


def implicit_filter_mlp(config, params, prefix, z):
    """nn.Sequential(Linear, Sin, Linear, Sin, Linear, Sin, Linear without bias) on z (L, emb_dim) -> (L, D)."""
    h = z
    for i in (0, 2, 4):
        h = linear(h, params[f"{prefix}{i}.weight"], params[f"{prefix}{i}.bias"])
        h = np.sin(config["hyena_w_mod"] * params[f"{prefix}{i + 1}.freq"][0] * h)
    return linear(h, params[prefix + "6.weight"])


def long_conv(u, k_fwd, k_rev, d_skip):
    """The canonical FFT convolution of u (B, D, L) with [k_fwd | flip(k_rev)] of size 2L, plus d_skip * u.

    k_fwd[j] weighs u[t - j] (lags 0..L-1); k_rev[j] weighs u[t + 1 + j] (lags -1..-(L-1)), so k_rev[L-1] is
    unused. With k_rev None the convolution is causal.
    """
    length = u.shape[-1]
    kernel = np.zeros((k_fwd.shape[0], 2 * length))
    kernel[:, :length] = k_fwd
    if k_rev is not None:
        kernel[:, length:] = k_rev[:, ::-1]
    spectrum = np.fft.rfft(u, n=2 * length) * np.fft.rfft(kernel, n=2 * length)
    return np.fft.irfft(spectrum, n=2 * length)[..., :length] + u * d_skip[:, None]


def mlp(config, params, prefix, a):
    """GLU (GELU on the first I outputs times the second I) or plain GELU MLP, then LN(wo(.) + a)."""
    inter = config["intermediate_size"]
    if config["use_glu_mlp"]:
        g = mlp_linear(config, params, prefix + "gated_layers.", a, 2 * inter)
        h = gelu(g[..., :inter]) * g[..., inter:]
    else:
        h = gelu(mlp_linear(config, params, prefix + "gated_layers.", a, inter))
    h = mlp_linear(config, params, prefix + "wo.", h, config["hidden_size"])
    weight, bias = params[prefix + "layernorm.weight"], params[prefix + "layernorm.bias"]
    return layer_norm(h + a, weight, bias, config["layer_norm_eps"])


def mlp_linear(config, params, prefix, x, out_features):
    """The MLP's BlockdiagLinear (use_monarch_mlp) or nn.Linear, with its optional bias."""
    bias = params.get(prefix + "bias")
    if config["use_monarch_mlp"]:
        return blockdiag_linear(x, params[prefix + "weight"], bias, out_features)
    return linear(x, params[prefix + "weight"], bias)


def blockdiag_linear(x, weight, bias, out_features):
    """x @ block_diag(W[0], ..., W[nb-1])^T (+ bias) for W of shape (nb, out_block, in_block).

    Block k maps the input slice [k*in_block, (k+1)*in_block) to the output slice [k*out_block, (k+1)*out_block).
    Like the canonical layer, the input is zero-padded up to nb*in_block and the output trimmed to out_features.
    """
    nblocks, _, in_block = weight.shape
    x = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nblocks * in_block - x.shape[-1])])
    y = np.einsum("...kp,kqp->...kq", x.reshape(*x.shape[:-1], nblocks, in_block), weight)
    y = y.reshape(*y.shape[:-2], -1)[..., :out_features]
    return y if bias is None else y + bias


def pooler(config, params, hidden_states, attention_mask):
    """tanh(dense(h[:, 0])), or tanh(dense(masked mean over the sequence)) when pool_all."""
    if config["pool_all"]:
        mask = attention_mask[..., None].astype(np.float64)
        pooled = (hidden_states * mask).sum(axis=1) / mask.sum(axis=1)
    else:
        pooled = hidden_states[:, 0]
    return np.tanh(linear(pooled, params["bert.pooler.dense.weight"], params["bert.pooler.dense.bias"]))


def mlm_head(params, hidden_states):
    """decoder(LN_1e-12(gelu(dense(h)))); the decoder weight is the (tied) word-embedding matrix."""
    prefix = "cls.predictions."
    h = gelu(linear(hidden_states, params[prefix + "transform.dense.weight"], params[prefix + "transform.dense.bias"]))
    weight, bias = params[prefix + "transform.LayerNorm.weight"], params[prefix + "transform.LayerNorm.bias"]
    h = layer_norm(h, weight, bias, MLM_LAYER_NORM_EPS)
    return linear(h, params[prefix + "decoder.weight"], params[prefix + "decoder.bias"])


def linear(x, weight, bias=None):
    """nn.Linear with the PyTorch (out, in) weight layout."""
    y = x @ weight.T
    return y if bias is None else y + bias


def layer_norm(x, weight, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x):
    """The exact (erf) GELU of nn.GELU() and ACT2FN['gelu'], not the tanh approximation."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
