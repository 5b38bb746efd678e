"""Block-diagonal linear layers (the Monarch MLP's `gated_layers` and `wo`) and their block layout helpers."""

import math

import mlx.core as mx
import mlx.nn as nn

from .initialization import uniform


def to_blocks(x, nblocks):
    """(..., F) -> (nblocks, N, F / nblocks), a view: block k holds features [k F / nblocks, (k + 1) F / nblocks)."""
    return x.reshape(-1, nblocks, x.shape[-1] // nblocks).swapaxes(0, 1)


def from_blocks(y, lead):
    """(nblocks, N, W) -> (*lead, nblocks * W), the inverse of `to_blocks` (a copy)."""
    return y.swapaxes(0, 1).reshape(*lead, -1)


class BlockdiagLinear(nn.Module):
    """Block-diagonal linear map: weight (nblocks, out/nblocks, in/nblocks); block k maps input slice k to output
    slice k."""

    def __init__(self, in_features, out_features, nblocks, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        in_blk, out_blk = -(-in_features // nblocks), -(-out_features // nblocks)
        self.weight = uniform((nblocks, out_blk, in_blk), 1 / math.sqrt(in_blk))
        if bias:
            self.bias = uniform((out_features,), 1 / math.sqrt(out_features))

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
