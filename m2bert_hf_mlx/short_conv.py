"""The causal depthwise short convolution of the sequence mixer, fused with the gating that follows it."""

import math

import mlx.core as mx
import mlx.nn as nn

from .initialization import uniform


@mx.compile
def short_conv_gate(x, weight, bias):
    """The causal short conv of in_linear's output, split into (x1, x2, v); returns (v * x1, x2).

    out[t] = w0 x[t-2] + w1 x[t-1] + w2 x[t] + b, as Conv1d(k=3, padding=2) keeping the first L outputs. Compiled,
    so the taps, the split and the pre-gate run as one fused pass over the (B, L, 3D) activations.
    """
    L = x.shape[1]
    w = weight[:, :, 0]
    padded = mx.pad(x, [(0, 0), (2, 0), (0, 0)])
    uc = padded[:, :L] * w[:, 0] + padded[:, 1 : L + 1] * w[:, 1] + x * w[:, 2] + bias
    x1, x2, v = mx.split(uc, 3, axis=-1)
    return v * x1, x2


class CausalShortConv(nn.Module):
    """Depthwise Conv1d(k=3, padding=2) keeping the first L outputs (the canonical `short_filter`); the weight
    has MLX's Conv1d layout (channels, 3, 1). Called with the gating that follows it, see `short_conv_gate`."""

    def __init__(self, channels):
        super().__init__()
        bound = 1 / math.sqrt(3)
        self.weight = uniform((channels, 3, 1), bound)
        self.bias = uniform((channels,), bound)

    def __call__(self, x):
        return short_conv_gate(x, self.weight, self.bias)
