"""The encoder's compiled inference (M2BERT_COMPILE): the same numbers as the layers run one operation at a time, one
trace per layer structure and shape, and never a stale weight or spectrum."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from m2bert_hf_mlx import M2BertConfig, M2BertModel
from m2bert_hf_mlx.errors import ConfigError
from m2bert_hf_mlx.modeling_m2_bert import _CompiledLayers, compiles_inference

IDS = mx.array([[101, 2023, 2003, 1037, 3231, 102, 0, 0]] * 2)


@pytest.fixture
def traces(monkeypatch):
    """The layer index of every trace of the compiled layer function (its Python body runs only when traced)."""
    calls = []
    original = _CompiledLayers._layer

    def counted(self, template, *arrays):
        calls.append(template)
        return original(self, template, *arrays)

    monkeypatch.setattr(_CompiledLayers, "_layer", counted)
    return calls


def tiny_model(num_hidden_layers=3):
    config = M2BertConfig.from_preset("tiny", hidden_dropout_prob=0.0, num_hidden_layers=num_hidden_layers)
    model = M2BertModel(config)
    model.eval()
    return model


def forward(model, ids, setting, monkeypatch):
    monkeypatch.setenv("M2BERT_COMPILE", setting)
    out = model(ids).last_hidden_state
    mx.eval(out)
    return out


def test_a_repeated_shape_is_traced_once_for_every_layer_and_computes_the_same(traces, monkeypatch):
    model = tiny_model()
    expected = forward(model, IDS, "0", monkeypatch)
    first = forward(model, IDS, "1", monkeypatch)
    assert traces == []  # a shape's first forward is not compiled
    second = forward(model, IDS, "1", monkeypatch)
    assert traces == [0]  # the three layers share one structure: one trace
    third = forward(model, IDS, "1", monkeypatch)
    assert traces == [0]
    for out in (first, second, third):
        assert mx.allclose(out, expected, rtol=1e-5, atol=1e-5)

    forward(model, IDS[:, :6], "1", monkeypatch)
    assert traces == [0]
    shorter = forward(model, IDS[:, :6], "1", monkeypatch)
    assert traces == [0, 0]
    assert mx.allclose(shorter, forward(model, IDS[:, :6], "0", monkeypatch), rtol=1e-5, atol=1e-5)


def test_new_weights_and_filters_reach_the_compiled_layers(traces, monkeypatch):
    model = tiny_model()
    for _ in range(2):
        forward(model, IDS, "1", monkeypatch)
    layer = model.encoder.layer[1]
    layer.attention.out_linear.weight = layer.attention.out_linear.weight * 2
    layer.attention.filter_fn.bias = layer.attention.filter_fn.bias + 1  # a new filter spectrum
    compiled = forward(model, IDS, "1", monkeypatch)
    assert traces == [0]
    assert mx.allclose(compiled, forward(model, IDS, "0", monkeypatch), rtol=1e-5, atol=1e-5)


def test_layers_of_another_structure_get_their_own_trace(traces, monkeypatch):
    model = tiny_model()
    layer1 = ("encoder.layer.1.attention.in_linear", "encoder.layer.1.attention.out_linear")
    nn.quantize(model, 32, 8, class_predicate=lambda path, module: path in layer1)
    expected = forward(model, IDS, "0", monkeypatch)
    for _ in range(2):
        compiled = forward(model, IDS, "1", monkeypatch)
    assert sorted(traces) == [0, 1]  # layers 0 and 2 share a trace; the quantized layer 1 has its own
    assert mx.allclose(compiled, expected, rtol=1e-5, atol=1e-5)


def test_gradients_through_the_compiled_layers_equal_the_training_path(traces, monkeypatch):
    model = tiny_model(num_hidden_layers=2)

    def loss(model):
        return (model(IDS).last_hidden_state ** 2).sum()

    grad = nn.value_and_grad(model, loss)
    model.train()
    _, trained = grad(model)
    model.eval()
    for _ in range(2):
        forward(model, IDS, "1", monkeypatch)
    assert traces == [0]
    _, compiled = grad(model)
    trained, compiled = dict(tree_flatten(trained)), dict(tree_flatten(compiled))
    assert trained.keys() == compiled.keys()
    for key in trained:
        assert mx.allclose(trained[key], compiled[key], rtol=1e-4, atol=1e-5), key


def test_the_setting_is_checked_and_the_emulator_never_compiles(monkeypatch):
    monkeypatch.setenv("M2BERT_COMPILE", "yes")
    with pytest.raises(ConfigError, match=r"M2BERT_COMPILE='yes' .* use 1 \(compile\), 0"):
        compiles_inference()
    monkeypatch.setenv("M2BERT_COMPILE", "1")
    assert compiles_inference()
    monkeypatch.setenv("M2BERT_LONG_CONV_BACKEND", "emulated")
    assert not compiles_inference()
    monkeypatch.delenv("M2BERT_COMPILE")
    monkeypatch.delenv("M2BERT_LONG_CONV_BACKEND")
    assert compiles_inference() == (mx.default_device().type == mx.gpu)
