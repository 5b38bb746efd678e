"""Activations and normalisations of M2-BERT: the exact GELU (a fused polynomial on the CPU), the GLU of the MLP,
`ACT2FN`, and the L2 normalisation of embeddings."""

import math

import mlx.core as mx
import mlx.nn as nn

# erf(z)/z as a polynomial in u = z²/8 - 1 for |z| <= 4 (the power form of a degree-16 Chebyshev least-squares fit
# in float64; beyond 4, erf is ±1 in float32). Evaluated in float32 its error is below 2e-7, as small as MLX's erf.
_ERF_POLYNOMIAL = (
    3.535309975e-01,
    -1.765761846e-01,
    1.316748394e-01,
    -1.077128408e-01,
    9.021568369e-02,
    -7.469362173e-02,
    5.982504406e-02,
    -4.598314809e-02,
    3.334546893e-02,
    -2.174387527e-02,
    1.361992458e-02,
    -9.972879060e-03,
    5.934167638e-03,
    -1.156541089e-03,
    3.873904270e-04,
    -1.350484223e-03,
    6.560723874e-04,
)


def gelu(x):
    """The exact (erf) GELU of the canonical model. On the CPU it is computed from multiplies and adds only: there
    MLX's erf is a scalar loop several times slower than the fused polynomial, and the MLP applies GELU to 4x the
    hidden width. GPUs have a fast erf, which beats the polynomial."""
    return _gelu_polynomial(x) if mx.default_device() == mx.cpu else nn.gelu(x)


def glu(gated, non_gated):
    """GELU(gated) * non_gated in one fused pass (the inputs may be strided views; the output is contiguous)."""
    return (_glu_polynomial if mx.default_device() == mx.cpu else _glu_erf)(gated, non_gated)


def _polynomial_gelu(x):
    z = mx.clip(x.astype(mx.float32) * (1 / math.sqrt(2)), -4.0, 4.0)
    u = z * z * 0.125 - 1.0
    acc = _ERF_POLYNOMIAL[-1]
    for c in _ERF_POLYNOMIAL[-2::-1]:
        acc = acc * u + c
    erf = mx.clip(acc * z, -1.0, 1.0)
    return (0.5 * x * (1.0 + erf)).astype(x.dtype)


_gelu_polynomial = mx.compile(_polynomial_gelu)
_glu_polynomial = mx.compile(lambda gated, non_gated: _polynomial_gelu(gated) * non_gated)
_glu_erf = mx.compile(lambda gated, non_gated: nn.gelu(gated) * non_gated)


ACT2FN = {
    "gelu": gelu,
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "relu": nn.relu,
    "silu": nn.silu,
}


def l2_normalize(x):
    """Rows scaled to unit L2 norm (an all-zero row stays zero), as sentence-transformers normalizes embeddings."""
    return x / mx.maximum(mx.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
