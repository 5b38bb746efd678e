import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from m2bert_hf_mlx import M2BertConfig, M2BertForMaskedLM, M2BertModel
from m2bert_hf_mlx.blockdiag_linear import BlockdiagLinear
from m2bert_hf_mlx.quantization import QuantizedBlockdiagLinear, apply_quantization, quantize_model

# Widths that group size 32 divides everywhere (the tiny preset's block width of 16 does not).
CONFIG = dict(hidden_size=128, intermediate_size=512, vocab_size=1000)


def rel_err(got, expected):
    return float(mx.abs(got - expected).max() / mx.abs(expected).max())


def model_and_ids(cls=M2BertForMaskedLM, seed=0):
    mx.random.seed(seed)
    model = cls(M2BertConfig.from_preset("tiny", **CONFIG))
    model.eval()
    return model, mx.random.randint(1, 1000, (2, 32))


def test_quantized_blockdiag_is_a_batched_quantized_matmul_of_the_blocks():
    mx.random.seed(0)
    layer = BlockdiagLinear(256, 512, nblocks=4)
    x = mx.random.normal((2, 7, 256))
    quantized = QuantizedBlockdiagLinear.from_blockdiag(layer, group_size=32, bits=8)
    assert quantized.weight.shape == (4, 128, 64 * 8 // 32) and quantized.scales.shape == (4, 128, 2)
    # Exactly the float layer run with the dequantized blocks ...
    dequantized = BlockdiagLinear(256, 512, nblocks=4)
    dequantized.weight = mx.dequantize(quantized.weight, quantized.scales, quantized.biases, group_size=32, bits=8)
    dequantized.bias = layer.bias
    assert rel_err(quantized(x), dequantized(x)) < 1e-5
    # ... and close to the original at 8 bits.
    assert rel_err(quantized(x), layer(x)) < 1e-2


def test_what_is_quantized_and_what_stays_float():
    model, _ = model_and_ids()
    entry = quantize_model(model, bits=4, group_size=32)
    assert entry == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert model.config.quantization == model.config.quantization_config == entry
    embeddings, layer = model.bert.embeddings, model.bert.encoder.layer[0]
    assert isinstance(embeddings.word_embeddings, nn.QuantizedEmbedding)
    assert isinstance(embeddings.token_type_embeddings, nn.QuantizedEmbedding)
    assert type(embeddings.position_embeddings) is nn.Embedding  # the model slices its table
    assert isinstance(layer.attention.in_linear, nn.QuantizedLinear) and isinstance(
        layer.attention.out_linear, nn.QuantizedLinear
    )
    assert isinstance(layer.mlp.gated_layers, QuantizedBlockdiagLinear) and isinstance(
        layer.mlp.wo, QuantizedBlockdiagLinear
    )
    assert all(type(m) is nn.Linear for m in layer.attention.filter_fn.implicit_filter if isinstance(m, nn.Linear))
    assert isinstance(model.cls.predictions.transform.dense, nn.QuantizedLinear)


@pytest.mark.parametrize("skip", [("embeddings",), ("heads",), ("mlp",), ("embeddings", "heads")])
def test_skipped_groups_stay_float(skip):
    model, ids = model_and_ids()
    quantize_model(model, bits=4, group_size=32, skip=skip)
    assert (type(model.bert.embeddings.word_embeddings) is nn.Embedding) == ("embeddings" in skip)
    assert (type(model.cls.predictions.transform.dense) is nn.Linear) == ("heads" in skip)
    assert (type(model.bert.encoder.layer[1].mlp.wo) is BlockdiagLinear) == ("mlp" in skip)
    assert model(ids).logits.shape == (2, 32, 1000)


def test_layers_the_group_size_does_not_divide_stay_float():
    mx.random.seed(0)
    model = M2BertModel(M2BertConfig.from_preset("tiny"))  # blocks of 16 inputs
    quantize_model(model, bits=4, group_size=32)
    assert type(model.encoder.layer[0].mlp.gated_layers) is BlockdiagLinear
    assert isinstance(model.encoder.layer[0].mlp.wo, QuantizedBlockdiagLinear)  # 256 / 4 = 64 inputs per block


def test_error_shrinks_with_more_bits():
    errors = {}
    for bits in (4, 8):
        model, ids = model_and_ids()
        expected = model(ids).logits
        quantize_model(model, bits=bits, group_size=32)
        errors[bits] = rel_err(model(ids).logits, expected)
    # Each extra bit halves the rounding step: 8 bits should be about 16x closer than 4.
    assert errors[8] < 0.03 and 8 * errors[8] < errors[4] < 0.5


def test_quantized_folder_loads_with_from_pretrained(tmp_path):
    for cls in (M2BertForMaskedLM, M2BertModel):
        model, ids = model_and_ids(cls)
        quantize_model(model, bits=4, group_size=64, skip=("heads",))
        expected = model(ids)
        model.save_pretrained(tmp_path / cls.__name__)
        config = json.loads((tmp_path / cls.__name__ / "config.json").read_text())
        assert (
            config["quantization"] == config["quantization_config"] == {"group_size": 64, "bits": 4, "mode": "affine"}
        )
        loaded = cls.from_pretrained(tmp_path / cls.__name__)
        got = loaded(ids)
        for name in expected:
            np.testing.assert_array_equal(np.array(got[name]), np.array(expected[name]))
        assert (
            type(
                loaded.bert.embeddings.word_embeddings
                if cls is M2BertForMaskedLM
                else loaded.embeddings.word_embeddings
            )
            is nn.QuantizedEmbedding
        )


def test_invalid_settings_are_explained():
    model, _ = model_and_ids()
    with pytest.raises(ValueError, match="bits=7 is not supported"):
        quantize_model(model, bits=7)
    with pytest.raises(ValueError, match="group_size=48 is not supported"):
        quantize_model(model, group_size=48)
    with pytest.raises(ValueError, match=r"Cannot skip \['pooler'\].*embeddings, heads, mlp"):
        quantize_model(model, skip=("pooler",))
    with pytest.raises(ValueError, match="needs integer group_size and bits"):
        apply_quantization(model, {"bits": 4}, {})
