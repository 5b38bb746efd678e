"""The encoder's compiled inference (M2BERT_COMPILE): the same numbers as the layers run one operation at a time,
compiled at the second forward of one shape and set of weights, and never with a stale weight or spectrum."""

import gc
import linecache
import warnings
import weakref

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_map

from m2bert_hf_mlx import M2BertConfig, M2BertForMaskedLM, M2BertModel, modeling_m2_bert
from m2bert_hf_mlx.errors import CompileError, ConfigError
from m2bert_hf_mlx.modeling_m2_bert import M2BertEncoder, compiles_inference

IDS = mx.array([[101, 2023, 2003, 1037, 3231, 102, 0, 0]] * 2)


@pytest.fixture
def runs(monkeypatch):
    """How often the encoder's layers ran in Python: uncompiled, or traced. A compiled forward replays its trace."""
    calls = []
    original = M2BertEncoder._layers

    def counted(self, hidden_states):
        calls.append(hidden_states.shape)
        return original(self, hidden_states)

    monkeypatch.setattr(M2BertEncoder, "_layers", counted)
    monkeypatch.setenv("M2BERT_COMPILE", "1")
    return calls


def tiny_model():
    model = M2BertModel(M2BertConfig.from_preset("tiny", hidden_dropout_prob=0.0, num_hidden_layers=3))
    model.eval()
    return model


def uncompiled(model, ids, monkeypatch):
    monkeypatch.setenv("M2BERT_COMPILE", "0")
    out = model(ids).last_hidden_state
    monkeypatch.setenv("M2BERT_COMPILE", "1")
    return out


def close(a, b):
    # On a GPU float32 products run in TF32, whose rounding the fused element-wise work moves.
    tolerance = 1e-5 if mx.default_device().type == mx.cpu else 2e-3
    return mx.allclose(a, b, rtol=tolerance, atol=tolerance).item()


def test_the_second_forward_of_a_shape_is_compiled_and_computes_the_same(runs, monkeypatch):
    model = tiny_model()
    first = model(IDS).last_hidden_state
    second = model(IDS).last_hidden_state  # traced
    assert len(runs) == 2
    third = model(IDS).last_hidden_state  # replayed
    fourth = model(IDS).last_hidden_state
    assert len(runs) == 2
    expected = uncompiled(model, IDS, monkeypatch)
    assert all(close(out, expected) for out in (first, second, third, fourth))

    shorter = model(IDS[:, :6]).last_hidden_state  # another shape: uncompiled, then compiled anew
    assert close(model(IDS[:, :6]).last_hidden_state, shorter) and len(runs) == 5
    assert close(model(IDS[:, :6]).last_hidden_state, uncompiled(model, IDS[:, :6], monkeypatch))
    assert len(runs) == 6


@pytest.mark.parametrize(
    "change",
    [
        lambda layer: setattr(layer.attention.out_linear, "weight", layer.attention.out_linear.weight * 2),
        lambda layer: setattr(layer.attention.filter_fn, "bias", layer.attention.filter_fn.bias + 1),
        lambda layer: setattr(layer.mlp, "layernorm", nn.LayerNorm(64, eps=1.0)),
        lambda layer: nn.quantize(layer.attention, 32, 8, class_predicate=lambda path, m: path == "in_linear"),
    ],
    ids=["weight", "filter spectrum", "module", "quantized"],
)
def test_new_weights_or_modules_are_never_replayed_stale(runs, monkeypatch, change):
    model = tiny_model()
    before = model(IDS).last_hidden_state
    model(IDS)
    model(IDS)
    assert len(runs) == 2
    change(model.encoder.layer[1])
    after = model(IDS).last_hidden_state
    assert len(runs) == 3  # uncompiled again
    assert not close(after, before)
    assert close(after, uncompiled(model, IDS, monkeypatch))
    assert close(model(IDS).last_hidden_state, after) and len(runs) == 5


def test_training_mode_lets_go_of_what_inference_kept(runs):
    model = tiny_model()
    expected = model(IDS).last_hidden_state
    mx.eval(expected)
    for _ in range(2):
        mx.eval(model(IDS).last_hidden_state)  # compiled
    weights = sum(array.nbytes for _, array in tree_flatten(model.encoder.parameters()))
    model.update(tree_map(lambda array: array + 0, model.parameters()))  # as an optimizer step does
    mx.eval(model.parameters())
    gc.collect()
    held = mx.get_active_memory()
    model.train()
    gc.collect()
    assert held - mx.get_active_memory() >= weights  # the old weights and their spectra
    model.eval()
    assert close(model(IDS).last_hidden_state, expected)


def test_gradients_at_inference_run_uncompiled_and_equal_the_training_path(runs):
    model = tiny_model()

    def loss(model):
        return (model(IDS).last_hidden_state ** 2).sum()

    grad = nn.value_and_grad(model, loss)
    model.train()
    _, trained = grad(model)
    model.eval()
    model(IDS)
    model(IDS)
    traced = len(runs)
    for _ in range(2):
        _, cached = grad(model)
    assert len(runs) == traced + 2  # the weights are new arrays under mx.grad: never a stale trace
    trained, cached = dict(tree_flatten(trained)), dict(tree_flatten(cached))
    assert trained.keys() == cached.keys()
    for key in trained:
        assert mx.allclose(trained[key], cached[key], rtol=1e-4, atol=1e-5), key


def test_a_layer_in_training_mode_never_runs_compiled(runs):
    model = M2BertModel(M2BertConfig.from_preset("tiny", hidden_dropout_prob=0.5, num_hidden_layers=3))
    model.eval()
    model.encoder.layer[1].train()  # the encoder itself stays in inference mode
    outputs = [model(IDS).last_hidden_state for _ in range(4)]
    assert len(runs) == 4
    assert not any(mx.array_equal(a, b).item() for a, b in zip(outputs, outputs[1:]))  # a new dropout mask each time


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


@pytest.fixture
def failing_compile(monkeypatch):
    """mx.compile as the encoder sees it, giving functions whose trace fails; a fresh process-wide verdict."""

    def compile_(function):
        def traced(*args):
            raise RuntimeError("[compile] a stand-in failure\nsecond line")

        return traced

    monkeypatch.setattr(modeling_m2_bert, "_compile_failures", [])
    monkeypatch.setattr(modeling_m2_bert.mx, "compile", compile_)


def test_a_failing_compile_falls_back_with_one_warning(runs, failing_compile, monkeypatch):
    monkeypatch.delenv("M2BERT_COMPILE")
    monkeypatch.setattr(modeling_m2_bert.mx, "default_device", lambda: mx.Device(mx.gpu))  # where it compiles
    model = tiny_model()
    expected = model(IDS).last_hidden_state
    with pytest.warns(modeling_m2_bert.CompileFallbackWarning, match=r"RuntimeError: \[compile\] a stand-in failure\)"):
        out = model(IDS).last_hidden_state
    assert close(out, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            assert close(model(IDS).last_hidden_state, expected)
    assert len(runs) == 4  # uncompiled every time (the stand-in fails before it would trace), never compiled again
    assert not compiles_inference()


@pytest.mark.parametrize("through", ["a head around the model", "the encoder alone"])
def test_the_fallback_warning_names_the_line_that_called_the_model(failing_compile, monkeypatch, through):
    monkeypatch.delenv("M2BERT_COMPILE", raising=False)
    monkeypatch.setattr(modeling_m2_bert.mx, "default_device", lambda: mx.Device(mx.gpu))
    model = M2BertForMaskedLM(M2BertConfig.from_preset("tiny", hidden_dropout_prob=0.0, num_hidden_layers=2))
    model.eval()
    hidden = model.bert.embeddings(IDS, mx.zeros_like(IDS))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # the second forward compiles, and fails
            model(IDS) if through == "a head around the model" else model.bert.encoder(hidden)
    assert [(w.category, w.filename) for w in caught] == [(modeling_m2_bert.CompileFallbackWarning, __file__)]
    line = 'model(IDS) if through == "a head around the model" else model.bert.encoder(hidden)'
    assert linecache.getline(caught[0].filename, caught[0].lineno).strip() == line


def test_a_forced_compile_raises_instead(runs, failing_compile):
    model = tiny_model()
    model(IDS)
    with pytest.raises(CompileError, match=r"stand-in failure\); M2BERT_COMPILE=1 forbids running it uncompiled"):
        model(IDS)


def test_a_deleted_model_is_freed_without_the_cycle_collector(runs):
    model = tiny_model()
    for _ in range(3):
        mx.eval(model(IDS).last_hidden_state)
    encoder = weakref.ref(model.encoder)
    gc.disable()
    try:
        del model
        assert encoder() is None
    finally:
        gc.enable()
