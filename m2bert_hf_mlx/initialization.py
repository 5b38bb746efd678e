"""Random initialisers shared by the layers (the canonical model's torch defaults)."""

import mlx.core as mx


def normal(shape, std):
    return mx.random.normal(shape) * std


def uniform(shape, bound):
    return mx.random.uniform(-bound, bound, shape)
