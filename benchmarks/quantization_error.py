"""How much error quantization adds, per layer kind and end to end on the 80M MLM, and how much it saves.

The published weights are not reachable here, so both parts use random weights:
- per layer: the layers `quantize_model` touches, at the 80M shapes, with Gaussian weights and inputs; the number is
  the relative error of the layer output, ||y_q - y|| / ||y|| (quantization error is scale-free, so the weight
  scale does not matter; trained weights with heavier tails quantize somewhat worse);
- end to end: the 80M MLM with this package's canonical initialisation (BERT's N(0, 0.02)), whose activations stay
  tame through the 12 layers; logits are compared with float32 on one 128-token input.
Read them as the error each setting adds to a model of the published shapes, not as a task-accuracy measurement.

Run from the repository root: .venv/bin/python benchmarks/quantization_error.py
"""

# m2bert_hf_mlx before mlx.core: on Linux it gives MLX's CPU back end an optimized BLAS (m2bert_hf_mlx.cpu_blas).
import m2bert_hf_mlx  # noqa: F401  # isort: skip

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from m2bert_hf_mlx import M2BertConfig, M2BertForMaskedLM
from m2bert_hf_mlx.blockdiag_linear import BlockdiagLinear
from m2bert_hf_mlx.loading import cast_model
from m2bert_hf_mlx.quantization import QuantizedBlockdiagLinear, quantize_model

SETTINGS = [("bfloat16", None), ("q8 g64", (8, 64)), ("q4 g64", (4, 64)), ("q4 g32", (4, 32))]

# (name, float layer) at the 80M MLM's shapes (hidden 768, intermediate 3072, 4 blocks, vocabulary 30528).
LAYERS = [
    ("mixer in_linear 768->2304", lambda: nn.Linear(768, 2304)),
    ("mixer out_linear 768->768", lambda: nn.Linear(768, 768)),
    ("MLP gated_layers (4, 1536, 192)", lambda: BlockdiagLinear(768, 6144, 4, bias=False)),
    ("MLP wo (4, 192, 768)", lambda: BlockdiagLinear(3072, 768, 4)),
    ("word embeddings as decoder", lambda: nn.Embedding(30528, 768)),
]

END_TO_END = [
    ("float32", None, None),
    ("bfloat16", "bfloat16", None),
    ("q8 g64", None, dict(bits=8, group_size=64)),
    ("q4 g64", None, dict(bits=4, group_size=64)),
    ("q4 g32", None, dict(bits=4, group_size=32)),
    ("q4 g64, MLP float", None, dict(bits=4, group_size=64, skip=("mlp",))),
    ("q4 g64, embeddings+heads float", None, dict(bits=4, group_size=64, skip=("embeddings", "heads"))),
]


def layer_output(layer, x):
    return layer.as_linear(x) if isinstance(layer, (nn.Embedding, nn.QuantizedEmbedding)) else layer(x)


def quantized(layer, bits, group_size):
    if isinstance(layer, BlockdiagLinear):
        return QuantizedBlockdiagLinear.from_blockdiag(layer, group_size, bits)
    return layer.to_quantized(group_size=group_size, bits=bits)


def per_layer():
    print("Per layer: ||y_q - y|| / ||y|| on 256 Gaussian inputs, Gaussian weights")
    print(f"  {'layer':34s}" + "".join(f"{name:>11s}" for name, _ in SETTINGS))
    for name, make in LAYERS:
        mx.random.seed(0)
        layer = make()
        layer.weight = mx.random.normal(layer.weight.shape)
        in_features = layer.in_features if isinstance(layer, BlockdiagLinear) else layer.weight.shape[-1]
        x = mx.random.normal((256, in_features))
        y = layer_output(layer, x)
        errors = []
        for _setting, quantization in SETTINGS:
            if quantization is None:
                layer_b = make()
                layer_b.update(layer.parameters())
                layer_b.update({"weight": layer.weight.astype(mx.bfloat16)})
                y_q = layer_output(layer_b, x.astype(mx.bfloat16)).astype(mx.float32)
            else:
                y_q = layer_output(quantized(layer, *quantization), x)
            errors.append(float(mx.linalg.norm(y_q - y) / mx.linalg.norm(y)))
        print(f"  {name:34s}" + "".join(f"{e:11.2e}" for e in errors))


def end_to_end():
    mx.random.seed(0)
    config = M2BertConfig.from_preset("m2-bert-80m")
    weights = tree_flatten(M2BertForMaskedLM(config).parameters())
    input_ids = mx.random.randint(1000, 30000, (1, 128))
    print("\nEnd to end: 80M MLM, canonical random init, one 128-token input; logits vs float32")
    print(f"  {'setting':32s} {'weights MB':>10s} {'max rel err':>12s} {'mean cos':>10s} {'top-1 agree':>12s}")
    reference = None
    for label, dtype, quantization in END_TO_END:
        model = M2BertForMaskedLM(config)
        model.load_weights(weights)
        if dtype:
            cast_model(model, dtype)
        if quantization:
            quantize_model(model, **quantization)
        model.eval()
        logits = np.array(model(input_ids).logits.astype(mx.float32), dtype=np.float64)[0]
        if reference is None:
            reference = logits
        cos = np.mean(
            np.sum(logits * reference, -1) / (np.linalg.norm(logits, axis=-1) * np.linalg.norm(reference, axis=-1))
        )
        top1 = np.mean(logits.argmax(-1) == reference.argmax(-1))
        rel = np.abs(logits - reference).max() / np.abs(reference).max()
        megabytes = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e6
        print(f"  {label:32s} {megabytes:10.1f} {rel:12.2e} {cos:10.5f} {top1:12.3f}")


if __name__ == "__main__":
    per_layer()
    end_to_end()
