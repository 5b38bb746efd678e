"""Random checkpoints in the canonical M2-BERT state-dict format, for tests that need more than the fixtures.

``random_state_dict`` returns what ``state_dict()`` of the canonical PyTorch modules (HazyResearch/m2
``bert_layers.py``) holds: the same keys in the same order, shapes and dtypes, the buffers at their canonical
values, and the tied copies (the six ``freq`` keys of each HyenaFilter, the MLM decoder weight) equal.

The trained values are random. At BERT's N(0, 0.02) scale everywhere (as in the fixtures) the gated long-conv
branch (v * x1 -> long conv -> * x2) is about 1e-6 of the output, so a swapped x1/x2 split or a tanh GELU would
go unseen; the mixer projections, the short conv and the MLP therefore get unit fan-in scales here, and the
rest keeps BERT's 0.02.
"""

import math

import numpy as np
from reference_m2bert import CANONICAL_DEFAULTS

HEADS = ("mlm", "pooler", "classifier", None)


def canonical_config(**overrides):
    """A tiny config with the canonical field names and the values of the released models (like the fixtures')."""
    config = {
        "vocab_size": 120,
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_act": "gelu",
        "type_vocab_size": 2,
        "pad_token_id": 0,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 32,
        "monarch_mixer_sequence_mixing": True,
        "long_conv_l_max": 32,
        "long_conv_kernel_learning_rate": 1e-3,
        "hyena_lr_pos_emb": 1e-5,
        "hyena_w": 10,
        "hyena_w_mod": 1,
        "hyena_wd": 0.1,
        "hyena_emb_dim": 5,
        "hyena_filter_order": 16,
        "bidirectional": True,
        "residual_long_conv": True,
        "hyena_training_additions": False,
        "use_glu_mlp": True,
        "use_monarch_mlp": True,
        "monarch_mlp_nblocks": 4,
        "use_positional_encodings": True,
        "pool_all": False,
    }
    config.update(overrides)
    return config


def random_state_dict(config, *, head="mlm", seed=0, num_labels=2):
    """A canonical-format state dict of float32 arrays (and the int64 ``position_ids`` buffer).

    ``head`` picks the canonical model it mirrors: ``"mlm"`` is BertForMaskedLM (``bert.*`` without a pooler,
    plus ``cls.*``), ``"pooler"`` is the retrieval encoder (``bert.*`` with ``bert.pooler.*``),
    ``"classifier"`` is BertForSequenceClassification (that plus ``classifier.*`` with ``num_labels`` rows) and
    ``None`` is BertModel without a pooler. ``config`` uses the canonical field names; the options it leaves
    out take the canonical BertConfig defaults.
    """
    if head not in HEADS:
        raise ValueError(f"head={head!r} is not one of {HEADS}")
    config = {**CANONICAL_DEFAULTS, **config}
    rng = np.random.default_rng(seed)
    state = embeddings_state(config, rng)
    for i in range(config["num_hidden_layers"]):
        state.update(layer_state(config, rng, f"bert.encoder.layer.{i}."))
    d = config["hidden_size"]
    if head in ("pooler", "classifier"):
        state.update(linear_state(rng, "bert.pooler.dense.", d, d))
    if head == "classifier":
        state.update(linear_state(rng, "classifier.", d, num_labels))
    if head == "mlm":
        state.update(linear_state(rng, "cls.predictions.transform.dense.", d, d))
        state.update(layer_norm_state(rng, "cls.predictions.transform.LayerNorm.", d))
        state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].copy()
        state["cls.predictions.decoder.bias"] = normal(rng, (config["vocab_size"],), 0.02)
    return state


def random_inputs(config, *, batch_size=2, seq_len=None, seed=0):
    """Model inputs like the fixtures': the first row switches to token type 1 halfway, the last row is
    right-padded with token 0 (attention mask 0) over its final third. ``seq_len`` defaults to long_conv_l_max."""
    length = config["long_conv_l_max"] if seq_len is None else seq_len
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(1, config["vocab_size"], size=(batch_size, length), dtype=np.int64)
    token_type_ids = np.zeros_like(input_ids)
    token_type_ids[0, length // 2 :] = 1
    attention_mask = np.ones_like(input_ids)
    if batch_size > 1:
        padded_from = length - length // 3
        input_ids[-1, padded_from:] = 0
        attention_mask[-1, padded_from:] = 0
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}


def embeddings_state(config, rng):
    prefix = "bert.embeddings."
    d = config["hidden_size"]
    # Registration order: BertEmbeddings' own buffer comes before its submodules' weights.
    state = {}
    if config["use_positional_encodings"]:
        state[prefix + "position_ids"] = np.arange(config["max_position_embeddings"], dtype=np.int64)[None]
    # The PAD row is random too: padding_idx only freezes it in training, and its value reaches the outputs.
    state[prefix + "word_embeddings.weight"] = normal(rng, (config["vocab_size"], d), 0.02)
    if config["use_positional_encodings"]:
        state[prefix + "position_embeddings.weight"] = normal(rng, (config["max_position_embeddings"], d), 0.02)
    state[prefix + "token_type_embeddings.weight"] = normal(rng, (config["type_vocab_size"], d), 0.02)
    state.update(layer_norm_state(rng, prefix + "LayerNorm.", d))
    return state


def layer_state(config, rng, prefix):
    d = config["hidden_size"]
    mixer = prefix + "attention."
    state = hyena_filter_state(config, rng, mixer + "filter_fn.")
    if config["residual_long_conv"]:
        state.update(hyena_filter_state(config, rng, mixer + "filter_fn2."))
    state.update(linear_state(rng, mixer + "in_linear.", d, 3 * d, std=1 / math.sqrt(d)))
    state.update(linear_state(rng, mixer + "out_linear.", d, d, std=1 / math.sqrt(d)))
    if config["hyena_training_additions"]:
        state.update(layer_norm_state(rng, mixer + "layernorm.", d))
    state[mixer + "short_filter.weight"] = normal(rng, (3 * d, 1, 3), 1 / math.sqrt(3))
    state[mixer + "short_filter.bias"] = normal(rng, (3 * d,), 0.02)

    inter = config["intermediate_size"]
    gated_out = 2 * inter if config["use_glu_mlp"] else inter
    state.update(mlp_linear_state(config, rng, prefix + "mlp.gated_layers.", d, gated_out, bias=False))
    state.update(mlp_linear_state(config, rng, prefix + "mlp.wo.", inter, d, bias=True))
    state.update(layer_norm_state(rng, prefix + "mlp.layernorm.", d))
    return state


def hyena_filter_state(config, rng, prefix):
    d = config["hidden_size"]
    order = config["hyena_filter_order"]
    emb_dim = config["hyena_emb_dim"]
    l_max = config["long_conv_l_max"]
    # The D-skip gain keeps the canonical randn init scale.
    state = {prefix + "bias": normal(rng, (d,), 1.0)}
    z = positional_features(emb_dim, l_max) + rng.normal(0.0, 0.01, size=(l_max, emb_dim))
    state[prefix + "pos_emb.z"] = z[None].astype(np.float32)
    state[prefix + "pos_emb.t"] = linspace_float32(0.0, 1.0, l_max)[None, :, None]
    # One Sin module serves every activation slot of both MLPs, so all its state-dict entries hold one tensor.
    freq = (config["hyena_w"] + rng.normal(0.0, 0.5, size=(1, order))).astype(np.float32)
    mlps = ["implicit_filter."] + (["implicit_filter_rev."] if config["bidirectional"] else [])
    for mlp in mlps:
        state.update(linear_state(rng, prefix + mlp + "0.", emb_dim, order))
        state[prefix + mlp + "1.freq"] = freq.copy()
        state.update(linear_state(rng, prefix + mlp + "2.", order, order))
        state[prefix + mlp + "3.freq"] = freq.copy()
        state.update(linear_state(rng, prefix + mlp + "4.", order, order))
        state[prefix + mlp + "5.freq"] = freq.copy()
        state[prefix + mlp + "6.weight"] = normal(rng, (d, order), 0.02)
    deltas = linspace_float32(math.log(1e-2) / 1.5, math.log(1e-2) / 0.3, d)
    state[prefix + "modulation.deltas"] = deltas[None, None]
    return state


def positional_features(emb_dim, l_max):
    """The initial z table (l_max, emb_dim): [t, cos(f_b w) for each band, -sin(f_b w) for each band]."""
    t = np.linspace(0.0, 1.0, l_max)
    w = 2 * math.pi * np.arange(l_max) / l_max
    bands = (emb_dim - 1) // 2
    fw = np.linspace(1e-4, bands - 1, bands)[None] * w[:, None]
    return np.concatenate([t[:, None], np.cos(fw), -np.sin(fw)], axis=1)


def linspace_float32(start, stop, num):
    """torch.linspace in float32 to within its rounding (one ulp; torch's CPU kernel rounds per SIMD width)."""
    return np.linspace(start, stop, num).astype(np.float32)


def mlp_linear_state(config, rng, prefix, in_features, out_features, *, bias):
    """BlockdiagLinear (bias registered before weight) or nn.Linear (weight, then bias), at a unit fan-in scale.

    A block's fan-in is its input width, so a block-diagonal weight and its dense equivalent have the same scale.
    """
    state = {}
    if config["use_monarch_mlp"]:
        nblocks = config["monarch_mlp_nblocks"]
        in_block = math.ceil(in_features / nblocks)
        out_block = math.ceil(out_features / nblocks)
        if bias:
            state[prefix + "bias"] = normal(rng, (out_features,), 0.02)
        state[prefix + "weight"] = normal(rng, (nblocks, out_block, in_block), 1 / math.sqrt(in_block))
        return state
    state[prefix + "weight"] = normal(rng, (out_features, in_features), 1 / math.sqrt(in_features))
    if bias:
        state[prefix + "bias"] = normal(rng, (out_features,), 0.02)
    return state


def linear_state(rng, prefix, in_features, out_features, std=0.02):
    """nn.Linear, by default at BERT's N(0, 0.02) init scale, with a small bias as after training."""
    return {
        prefix + "weight": normal(rng, (out_features, in_features), std),
        prefix + "bias": normal(rng, (out_features,), 0.02),
    }


def layer_norm_state(rng, prefix, size):
    return {
        prefix + "weight": (1.0 + rng.normal(0.0, 0.1, size=size)).astype(np.float32),
        prefix + "bias": normal(rng, (size,), 0.1),
    }


def normal(rng, shape, std):
    return rng.normal(0.0, std, size=shape).astype(np.float32)
