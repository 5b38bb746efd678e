"""The long convolution at the heart of the Monarch mixer."""

import mlx.core as mx


def long_conv(u, k_fwd, k_rev, skip, *, backend=None):
    """Bidirectional long convolution with a per-channel skip, channels-last.

    y[b, t, c] = sum_{s<=t} k_fwd[c, t-s] u[b, s, c] + sum_{s>t} k_rev[c, s-t-1] u[b, s, c] + skip[c] u[b, t, c]

    u: (B, L, C); k_fwd, k_rev: (C, L) (k_rev=None: causal); skip: (C,). Returns (B, L, C) in u's dtype.
    """
    L = u.shape[1]
    n = 2 * L
    k = k_fwd if k_rev is None else mx.concatenate([k_fwd, k_rev[:, ::-1]], axis=-1)
    k_f = mx.fft.rfft(k.astype(mx.float32), n=n, axis=-1)
    u32 = u.astype(mx.float32)
    y = mx.fft.irfft(mx.fft.rfft(u32, n=n, axis=1) * k_f.T, n=n, axis=1)[:, :L]
    return (y + u32 * skip.astype(mx.float32)).astype(u.dtype)
