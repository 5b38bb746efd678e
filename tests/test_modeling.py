import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import load_fixture

from m2bert_hf_mlx import M2BertConfig, M2BertForMaskedLM, M2BertForSequenceClassification, M2BertModel
from m2bert_hf_mlx.loading import apply_weights

# Max error relative to the output's scale: float32 noise is about 1e-6; a tanh GELU instead of erf shows as 4e-5.
TOL = 2e-5


def rel_err(got, expected):
    return float(np.abs(np.asarray(got, dtype=np.float64) - expected).max() / np.abs(expected).max())


def fixture_model(name):
    config_dict, params, data = load_fixture(name)
    retrieval = name == "retrieval"
    config = M2BertConfig.from_upstream_dict(config_dict, add_pooling_layer=retrieval)
    model = (M2BertModel if retrieval else M2BertForMaskedLM)(config)
    apply_weights(model, model.sanitize({k: mx.array(v) for k, v in params.items()}), strict=not retrieval)
    model.eval()
    return model, data


def fixture_cases(data):
    lengths = sorted({k.split("/")[1] for k in data.files if k.startswith("input/L")})
    return [(f"input/{L}/", f"expected/{L}/") for L in lengths] or [("input/", "expected/")]


def test_fixture_parity(fixture_name):
    model, data = fixture_model(fixture_name)
    for inp, exp in fixture_cases(data):
        token_types = data[inp + "token_type_ids"] if inp + "token_type_ids" in data.files else None
        out = model(
            mx.array(data[inp + "input_ids"]),
            None if token_types is None else mx.array(token_types),
            mx.array(data[inp + "attention_mask"]),
        )
        if isinstance(model, M2BertForMaskedLM):
            assert rel_err(out.logits, data[exp + "mlm_logits"]) <= TOL
            hidden = model.bert(
                mx.array(data[inp + "input_ids"]), None if token_types is None else mx.array(token_types)
            )
            assert rel_err(hidden.last_hidden_state, data[exp + "sequence_output"]) <= TOL
        else:
            assert rel_err(out.last_hidden_state, data[exp + "sequence_output"]) <= TOL
            assert rel_err(out.pooler_output, data[exp + "pooled_output"]) <= TOL


def test_attention_mask_is_ignored_by_the_mixer():
    model, data = fixture_model("mlm_hta0")
    ids = mx.array(data["input/L32/input_ids"])
    a = model(ids, attention_mask=mx.ones_like(ids)).logits
    b = model(ids, attention_mask=mx.zeros_like(ids)).logits
    assert mx.array_equal(a, b)


# Counts from instantiating the canonical model (architecture doc §1.2); the 80M MLM preset adds the legacy
# mixer LayerNorms (2 x 768 per layer) it was trained with.
PRESET_COUNTS = {
    "m2-bert-80m": (M2BertForMaskedLM, 80_267_328 + 12 * 2 * 768),
    "m2-bert-110m": (M2BertForMaskedLM, 115_583_616),
    "m2-bert-260m": (M2BertForMaskedLM, 259_133_760),
    "m2-bert-341m": (M2BertForMaskedLM, 341_038_144),
    "m2-bert-341m-2k": (M2BertForMaskedLM, 344_709_184),
    "m2-bert-80m-2k-retrieval": (M2BertModel, 81_940_224),
    "m2-bert-80m-8k-retrieval": (M2BertModel, 87_396_096),
    "m2-bert-80m-32k-retrieval": (M2BertModel, 109_219_584),
}


@pytest.mark.parametrize("preset", sorted(PRESET_COUNTS))
def test_preset_parameter_counts(preset):
    cls, expected = PRESET_COUNTS[preset]
    assert cls(M2BertConfig.from_preset(preset)).num_parameters() == expected


def test_buffers_are_frozen_and_not_counted():
    model = M2BertModel(M2BertConfig.from_preset("tiny"))
    buffers = model.buffer_keys()
    assert "encoder.layer.0.attention.filter_fn.pos_emb.t" in buffers
    assert "encoder.layer.1.attention.filter_fn2.modulation.deltas" in buffers
    from mlx.utils import tree_flatten

    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert not buffers & set(trainable)
    assert "encoder.layer.0.attention.filter_fn.pos_emb.z" in trainable
    assert model.num_parameters(only_trainable=True) == model.num_parameters()


def test_outputs_read_as_attributes_and_keys():
    config = M2BertConfig.from_preset("tiny", num_labels=3)
    ids = mx.array([[101, 2023, 2003, 102]])
    mlm = M2BertForMaskedLM(config)
    out = mlm(ids)
    assert out["logits"] is out.logits and out.keys() == ["logits"]
    assert out.logits.shape == (1, 4, config.vocab_size)
    with pytest.raises(KeyError, match="loss"):
        out["loss"]
    base = M2BertModel(config)(ids)
    assert base.keys() == list(base) == ["last_hidden_state", "pooler_output"]
    assert base.pooler_output.shape == (1, config.hidden_size)
    assert M2BertModel(M2BertConfig.from_preset("tiny", add_pooling_layer=False))(ids).pooler_output is None
    assert M2BertForSequenceClassification(config)(ids).logits.shape == (1, 3)


def test_mlm_loss_only_counts_labelled_positions():
    config = M2BertConfig.from_preset("tiny")
    model = M2BertForMaskedLM(config)
    model.eval()
    ids = mx.array([[101, 2023, 2003, 1037, 102]])
    labels = mx.array([[-100, 2023, -100, -100, -100]])
    out = model(ids, labels=labels)
    logp = out.logits[0, 1] - mx.logsumexp(out.logits[0, 1])
    assert abs(out.loss.item() + logp[2023].item()) < 1e-4


def test_classification_losses():
    config = M2BertConfig.from_preset("tiny", num_labels=3)
    model = M2BertForSequenceClassification(config)
    model.eval()
    ids = mx.array([[101, 2023, 102], [101, 2003, 102]])
    out = model(ids, labels=mx.array([0, 2]))
    logits = out.logits
    expected = -(logits[0, 0] - mx.logsumexp(logits[0]) + logits[1, 2] - mx.logsumexp(logits[1])) / 2
    assert abs(out.loss.item() - expected.item()) < 1e-5
    regression = M2BertForSequenceClassification(M2BertConfig.from_preset("tiny", num_labels=1))
    out = regression(ids, labels=mx.array([0.5, -1.0]))
    assert abs(out.loss.item() - mx.mean((out.logits[:, 0] - mx.array([0.5, -1.0])) ** 2).item()) < 1e-6


def test_too_long_input_is_refused_with_advice():
    model = M2BertModel(M2BertConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="longer than this model's maximum of 128"):
        model(mx.zeros((1, 129), dtype=mx.int32))
    with pytest.raises(ValueError, match="batch, length"):
        model(mx.zeros((4,), dtype=mx.int32))


def test_short_conv_is_causal_and_gates_in_the_canonical_order():
    from m2bert_hf_mlx.short_conv import CausalShortConv

    conv = CausalShortConv(6)  # D = 2: channels [x1 | x2 | v]
    x = mx.random.normal((1, 6, 6))
    gated_v, x2 = conv(x)
    later = mx.concatenate([x[:, :4], mx.random.normal((1, 2, 6))], axis=1)
    assert all(mx.allclose(a[:, :4], b[:, :4]) for a, b in zip(conv(later), (gated_v, x2)))
    w, b, xn = np.array(conv.weight[:, :, 0]), np.array(conv.bias), np.array(x)[0]
    uc = w[:, 0] * xn[1] + w[:, 1] * xn[2] + w[:, 2] * xn[3] + b  # t = 3
    assert np.allclose(np.array(x2)[0, 3], uc[2:4], atol=1e-6)
    assert np.allclose(np.array(gated_v)[0, 3], uc[4:6] * uc[0:2], atol=1e-6)


def test_blockdiag_matches_dense_block_diagonal_matrix():
    from m2bert_hf_mlx.blockdiag_linear import BlockdiagLinear

    layer = BlockdiagLinear(12, 8, nblocks=4)
    x = mx.random.normal((2, 3, 12))
    W = np.zeros((8, 12), dtype=np.float32)
    w = np.array(layer.weight)
    for k in range(4):
        W[2 * k : 2 * k + 2, 3 * k : 3 * k + 3] = w[k]
    expected = np.array(x) @ W.T + np.array(layer.bias)
    assert np.allclose(np.array(layer(x)), expected, atol=1e-5)


def test_filter_spectra_are_cached_at_inference_and_dropped_when_weights_change():
    model = M2BertModel(M2BertConfig.from_preset("tiny", hidden_dropout_prob=0.0))
    ids = mx.array([[101, 2023, 2003, 1037, 3231, 102]])
    model.train()  # the training path computes the filters and their FFT on every call, without the cache
    uncached = model(ids).last_hidden_state
    model.eval()
    first = model(ids).last_hidden_state
    assert mx.allclose(first, uncached, atol=1e-6)
    mixer = model.encoder.layer[0].attention.filter_fn
    spectrum = mixer._filter_cache.spectrum
    assert mx.array_equal(model(ids).last_hidden_state, first) and mixer._filter_cache.spectrum is spectrum

    mixer.bias = mixer.bias + 1.0  # new weights are new arrays: the spectrum is made again
    changed = model(ids).last_hidden_state
    assert mixer._filter_cache.spectrum is not spectrum
    model.train()
    assert mx.allclose(changed, model(ids).last_hidden_state, atol=1e-6)
    model.eval()
    model(ids[:, :4])
    assert mixer._filter_cache.key[0] == 4


@pytest.mark.parametrize("transform", ["compile", "vmap"])
def test_a_spectrum_cached_under_a_transformation_serves_the_later_forwards(transform):
    """The first forward at inference may run inside mx.compile or mx.vmap, whose inputs are placeholders: the
    spectra it keeps must not depend on them."""
    model = M2BertModel(M2BertConfig.from_preset("tiny", hidden_dropout_prob=0.0))
    ids = mx.array([[101, 2023, 2003, 1037, 3231, 102]] * 2)
    hidden = model.embeddings(ids, mx.zeros_like(ids))
    model.train()  # without the cache
    expected = model.encoder(hidden)
    model.eval()
    if transform == "compile":
        first = mx.compile(model.encoder)(hidden)
    else:
        first = mx.vmap(model.encoder)(hidden[None])[0]
    assert mx.allclose(first, expected, atol=1e-5)
    assert mx.allclose(model.encoder(hidden), expected, atol=1e-5)


def test_gradients_at_inference_reach_the_filter_weights_like_in_training():
    from mlx.utils import tree_flatten

    model = M2BertModel(M2BertConfig.from_preset("tiny", hidden_dropout_prob=0.0))
    ids = mx.array([[101, 2023, 2003, 1037, 3231, 102]])

    def loss(model):
        return (model(ids).last_hidden_state ** 2).sum()

    grad = nn.value_and_grad(model, loss)
    model.train()
    _, trained = grad(model)
    model.eval()  # the convolution runs from the spectrum alone; its VJP computes the filters again
    _, cached = grad(model)
    trained, cached = dict(tree_flatten(trained)), dict(tree_flatten(cached))
    assert trained.keys() == cached.keys()
    filter_keys = [k for k in trained if ".filter_fn" in k]
    assert any("implicit_filter_rev" in k for k in filter_keys) and any(k.endswith("pos_emb.z") for k in filter_keys)
    for k in trained:
        assert mx.allclose(trained[k], cached[k], rtol=1e-4, atol=1e-5), k
    assert all(mx.abs(cached[k]).max() > 0 for k in filter_keys if not k.endswith("freq"))


def test_gelu_is_the_exact_erf_gelu_to_float32_accuracy():
    import math

    from m2bert_hf_mlx.activations import gelu

    x = np.linspace(-9, 9, 100_001).astype(np.float32)
    expected = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    assert np.abs(np.array(gelu(mx.array(x))) - expected).max() < 1e-6
    assert gelu(mx.array(x).astype(mx.bfloat16)).dtype == mx.bfloat16
