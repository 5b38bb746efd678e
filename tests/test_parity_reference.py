"""The MLX model against the independent float64 reference on random canonical checkpoints, over every option."""

import mlx.core as mx
import numpy as np
import pytest
from random_checkpoint import canonical_config, random_inputs, random_state_dict
from reference_m2bert import forward

from m2bert_hf_mlx import M2BertConfig, M2BertForMaskedLM, M2BertForSequenceClassification, M2BertModel
from m2bert_hf_mlx.loading import apply_weights

TOL = 2e-5

VARIANTS = {
    "released-layout": {},
    "shorter-than-l_max": dict(long_conv_l_max=64, max_position_embeddings=64, seq_len=20),
    "odd-length": dict(seq_len=27),
    "two-blocks": dict(monarch_mlp_nblocks=2),
    "legacy-hta": dict(hyena_training_additions=True),
    "causal": dict(bidirectional=False),
    "no-residual-long-conv": dict(residual_long_conv=False),
    "plain-mlp": dict(use_glu_mlp=False),
    "dense-mlp": dict(use_monarch_mlp=False),
    "no-positions": dict(use_positional_encodings=False),
    "w_mod": dict(hyena_w_mod=2, hyena_emb_dim=7),
    "long": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        hyena_filter_order=8,
        long_conv_l_max=2048,
        max_position_embeddings=2048,
        batch_size=1,
        seq_len=2048,
    ),
}


def build(config_dict, cls, head, seed=0, **kwargs):
    state = random_state_dict(config_dict, head=head, seed=seed, **kwargs)
    config = M2BertConfig.from_upstream_dict(
        config_dict, add_pooling_layer=head in ("pooler", "classifier"), num_labels=kwargs.get("num_labels", 2)
    )
    model = cls(config)
    apply_weights(model, model.sanitize({k: mx.array(v) for k, v in state.items()}), strict=True)
    model.eval()
    return model, state


def rel_err(got, expected):
    return float(np.abs(np.asarray(got, np.float64) - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_mlm_matches_reference(variant):
    options = dict(VARIANTS[variant])
    batch_size, seq_len = options.pop("batch_size", 2), options.pop("seq_len", None)
    config = canonical_config(**options)
    model, state = build(config, M2BertForMaskedLM, "mlm")
    inputs = random_inputs(config, batch_size=batch_size, seq_len=seq_len)
    expected = forward(config, state, **inputs)
    out = model(*(mx.array(inputs[k]) for k in ("input_ids", "token_type_ids", "attention_mask")))
    hidden = model.bert(mx.array(inputs["input_ids"]), mx.array(inputs["token_type_ids"])).last_hidden_state
    assert rel_err(hidden, expected["sequence_output"]) <= TOL
    assert rel_err(out.logits, expected["mlm_logits"]) <= TOL


@pytest.mark.parametrize("pool_all", [False, True])
def test_pooler_matches_reference(pool_all):
    config = canonical_config(pool_all=pool_all)
    model, state = build(config, M2BertModel, "pooler", seed=1)
    inputs = random_inputs(config, batch_size=3, seed=1)
    expected = forward(config, state, **inputs)
    out = model(*(mx.array(inputs[k]) for k in ("input_ids", "token_type_ids", "attention_mask")))
    assert rel_err(out.pooler_output, expected["pooled_output"]) <= TOL


def test_classifier_matches_reference():
    config = canonical_config()
    model, state = build(config, M2BertForSequenceClassification, "classifier", seed=2, num_labels=3)
    inputs = random_inputs(config, seed=2)
    expected = forward(config, state, **inputs)
    out = model(*(mx.array(inputs[k]) for k in ("input_ids", "token_type_ids", "attention_mask")))
    assert rel_err(out.logits, expected["logits"]) <= TOL


def test_padding_changes_the_outputs_as_in_the_canonical_model():
    config = canonical_config()
    model, state = build(config, M2BertModel, "pooler", seed=3)
    ids = np.array([[5, 17, 42, 9, 3]])
    padded = np.concatenate([ids, np.zeros((1, 27), ids.dtype)], axis=1)
    short = model(mx.array(ids)).pooler_output
    full = model(mx.array(padded)).pooler_output
    assert rel_err(full, forward(config, state, padded)["pooled_output"]) <= TOL
    assert rel_err(short, forward(config, state, ids)["pooled_output"]) <= TOL
    assert not np.allclose(np.array(short), np.array(full), atol=1e-3)
