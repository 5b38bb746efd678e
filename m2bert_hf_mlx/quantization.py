"""Affine weight quantization of M2-BERT (MLX's `mx.quantize`), and the layers a quantized folder loads into.

What `quantize_model` quantizes, in groups of `group_size` inputs with `bits` bits and a float scale and bias each:
- the sequence mixer's `in_linear` and `out_linear` (`nn.QuantizedLinear`);
- the block-diagonal MLP weights `gated_layers` and `wo`, of shape (nblocks, out/nblocks, in/nblocks):
  each block is quantized along its own inputs and the layer runs one batched `mx.quantized_matmul` over the
  blocks (`QuantizedBlockdiagLinear`), so they shrink like the dense layers; skip group "mlp";
- the word and token-type embeddings (`nn.QuantizedEmbedding`); the MLM decoder, tied to the word embeddings,
  then runs quantized too; skip group "embeddings";
- the task heads: the MLM transform, the pooler and the classifier; skip group "heads".

It never quantizes the long-convolution filters (their implicit MLPs generate the convolution kernels, which the
loader keeps in float32), the short depthwise convolution, LayerNorms, biases, the position-embedding table (the
model slices it directly), nor a layer whose input width is not a multiple of `group_size` (the tiny test sizes).
A quantized folder records {"group_size", "bits", "mode"} as `quantization` (and `quantization_config`) in its
config.json; loading rebuilds exactly the layers whose `<name>.scales` the weights hold.
"""

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from .blockdiag_linear import BlockdiagLinear, from_blocks, to_blocks
from .errors import QuantizationError
from .modeling_utils import is_head_weight

SKIPPABLE_GROUPS = ("embeddings", "heads", "mlp")
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


class QuantizedBlockdiagLinear(nn.Module):
    """`BlockdiagLinear` with each block's weight affine-quantized along its inputs: weight (nblocks, out_blk,
    in_blk * bits / 32) uint32, scales and biases (nblocks, out_blk, in_blk / group_size)."""

    def __init__(self, in_features, out_features, nblocks, bias=True, *, group_size=64, bits=4):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.bits = group_size, bits
        blocks = mx.zeros((nblocks, out_features // nblocks, in_features // nblocks))
        self.weight, self.scales, self.biases = mx.quantize(blocks, group_size, bits)
        if bias:
            self.bias = mx.zeros((out_features,))
        self.freeze()

    @classmethod
    def from_blockdiag(cls, layer, group_size, bits):
        nblocks = layer.weight.shape[0]
        quantized = cls(
            layer.in_features, layer.out_features, nblocks, "bias" in layer, group_size=group_size, bits=bits
        )
        quantized.weight, quantized.scales, quantized.biases = mx.quantize(layer.weight, group_size, bits)
        if "bias" in layer:
            quantized.bias = layer.bias
        return quantized

    def _extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.weight.shape[0]}, "
            f"bias={'bias' in self}, group_size={self.group_size}, bits={self.bits}"
        )

    def block_matmul(self, xb):
        """(nblocks, N, in/nblocks) -> (nblocks, N, out/nblocks), as `BlockdiagLinear.block_matmul`."""
        return mx.quantized_matmul(
            xb, self.weight, self.scales, self.biases, transpose=True, group_size=self.group_size, bits=self.bits
        )

    def __call__(self, x):
        y = from_blocks(self.block_matmul(to_blocks(x, self.weight.shape[0])), x.shape[:-1])
        return y + self.bias if "bias" in self else y


def _group(path, module):
    """The quantization group of a layer, or None for layers that stay float."""
    if isinstance(module, BlockdiagLinear):
        nblocks = module.weight.shape[0]
        divides = module.in_features % nblocks == 0 and module.out_features % nblocks == 0
        return "mlp" if divides else None
    if isinstance(module, nn.Embedding):
        return None if path.endswith("position_embeddings") else "embeddings"
    if isinstance(module, nn.Linear):
        if ".filter_fn" in f".{path}":
            return None
        return "heads" if is_head_weight(path) else "mixer"
    return None


def float_groups(model):
    """The groups of `SKIPPABLE_GROUPS` that hold no quantized layer (all of them for a float model)."""
    quantized = {_group(path, module) for path, module in model.named_modules() if "scales" in module}
    return tuple(g for g in SKIPPABLE_GROUPS if g not in quantized)


def _quantize_layers(model, predicate, group_size, bits):
    def convert(path, module):
        if not predicate(path, module):
            return module
        if isinstance(module, BlockdiagLinear):
            return QuantizedBlockdiagLinear.from_blockdiag(module, group_size, bits)
        return module.to_quantized(group_size=group_size, bits=bits)

    model.update_modules(tree_map_with_path(convert, model.leaf_modules(), is_leaf=nn.Module.is_module))


def check_quantization_settings(bits, group_size, skip):
    """Raise a ValueError that says what to change for settings `quantize_model` cannot apply."""
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(
            f"bits={bits} is not supported by MLX affine quantization; use one of {SUPPORTED_BITS}."
        )
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise QuantizationError(f"group_size={group_size} is not supported; use one of {SUPPORTED_GROUP_SIZES}.")
    unknown = set(skip) - set(SKIPPABLE_GROUPS)
    if unknown:
        raise QuantizationError(
            f"Cannot skip {sorted(unknown)}: the groups that can stay float are {', '.join(SKIPPABLE_GROUPS)}."
        )


def quantize_model(model: nn.Module, *, bits: int = 4, group_size: int = 64, skip: Sequence[str] = ()) -> dict:
    """Quantize `model` in place, record it in `model.config` (so `save_pretrained` writes a folder that loads
    quantized) and return the config entry {"group_size", "bits", "mode"}.

    `skip` names groups to keep in float: "embeddings" (word and token-type embeddings, hence also the tied MLM
    decoder), "heads" (MLM transform, pooler, classifier) and "mlp" (the block-diagonal MLP weights).
    """
    check_quantization_settings(bits, group_size, skip)

    def predicate(path, module):
        group = _group(path, module)
        return group is not None and group not in skip and module.weight.shape[-1] % group_size == 0

    _quantize_layers(model, predicate, group_size, bits)
    quantization = {"group_size": group_size, "bits": bits, "mode": "affine"}
    # Both names, as mlx-lm writes them: `quantization` for MLX loaders, `quantization_config` for transformers'.
    model.config.quantization = quantization
    model.config.quantization_config = dict(quantization)
    return quantization


def apply_quantization(model, quantization, weights):
    """Turn the layers whose quantized weights (`<name>.scales`) are in `weights` into quantized layers, so that a
    folder written after `quantize_model` loads. `quantization` is the config.json entry."""
    try:
        group_size, bits = int(quantization["group_size"]), int(quantization["bits"])
    except (KeyError, TypeError, ValueError) as e:
        raise QuantizationError(
            f"The config's quantization entry {quantization!r} needs integer group_size and bits; the folder was "
            "not written by this package. Convert it again with `m2bert-mlx convert -q`."
        ) from e
    if quantization.get("mode", "affine") != "affine":
        raise QuantizationError(
            f"Quantization mode {quantization['mode']!r} is not supported; this package writes affine."
        )

    def stored_quantized(path, module):
        return _group(path, module) is not None and f"{path}.scales" in weights

    _quantize_layers(model, stored_quantized, group_size, bits)
