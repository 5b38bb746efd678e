"""The implicit long filter of M2-BERT's long convolutions (the canonical `HyenaFilter`) and its spectrum cache.

A small MLP over positional features generates one length-L kernel per channel (and one more for the reverse
direction when bidirectional), decayed exponentially; the convolution itself runs in `m2bert_hf_mlx.ops`.
"""

import functools
import math
import operator
import os
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import ops


class Buffers:
    """Mixin for modules holding fixed arrays that checkpoints store but training never updates (torch buffers)."""

    buffer_names = ()

    def freeze_buffers(self):
        self.freeze(keys=list(self.buffer_names), recurse=False)


class PositionalEmbedding(nn.Module, Buffers):
    """The filter MLP's input features at l_max positions: z = [t, cos(f w), -sin(f w)] (trained) and t (fixed)."""

    buffer_names = ("t",)

    def __init__(self, emb_dim, seq_len):
        super().__init__()
        t = np.linspace(0, 1, seq_len)[None, :, None]
        w = 2 * math.pi * np.arange(seq_len)[None, :, None] / seq_len
        bands = (emb_dim - 1) // 2
        f = np.linspace(1e-4, bands - 1, bands)[None, None]
        self.z = mx.array(np.concatenate([t, np.cos(f * w), -np.sin(f * w)], axis=-1), dtype=mx.float32)
        self.t = mx.array(t, dtype=mx.float32)
        self.freeze_buffers()


class ExponentialModulation(nn.Module, Buffers):
    """Per-channel decay exp(-t |delta|) applied to the filter; the deltas are fixed (a buffer)."""

    buffer_names = ("deltas",)

    def __init__(self, d_model, fast_decay_pct=0.3, slow_decay_pct=1.5, target=1e-2):
        super().__init__()
        max_decay = math.log(target) / fast_decay_pct
        min_decay = math.log(target) / slow_decay_pct
        self.deltas = mx.array(np.linspace(min_decay, max_decay, d_model)[None, None], dtype=mx.float32)
        self.freeze_buffers()

    def __call__(self, t, h):
        return h * mx.exp(-t * mx.abs(self.deltas))


class Sin(nn.Module):
    """Marks where the implicit filter MLP applies sin(w_mod * freq * x); `freq` lives on the HyenaFilter, shared."""


def _implicit_filter(emb_dim, order, d_model):
    # Indices match the canonical nn.Sequential, so keys read implicit_filter.{0,2,4,6}.*
    return [
        nn.Linear(emb_dim, order),
        Sin(),
        nn.Linear(order, order),
        Sin(),
        nn.Linear(order, order),
        Sin(),
        nn.Linear(order, d_model, bias=False),
    ]


@functools.cache
def max_cached_filter_bytes():
    """The largest filter spectrum kept between calls: 1/256 of the device's memory, so that the 24 of an 80M model
    take under a tenth of it. A 16 GB Mac keeps them up to L = 8192 (1.2 GB), an 8 GB Mac up to 4096, an 80 GB GPU
    at every length (4.8 GB at 32768); beyond that they are recomputed on each call (what that costs is measured in
    docs/benchmarks.md)."""
    info = mx.device_info()
    memory = (
        info.get("memory_size") or info.get("total_memory") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    )
    return memory // 256


@dataclass
class _FilterCache:
    """HyenaFilter's inference cache; a plain object, so MLX never takes it for parameters."""

    key: tuple = ()
    weights: tuple = ()
    spectrum: ops.FilterSpectrum | None = None


class HyenaFilter(nn.Module):
    """Implicit long filter of a long convolution and its D-skip gain (`bias`)."""

    def __init__(self, config):
        super().__init__()
        D, order = config.hidden_size, config.hyena_filter_order
        self.w_mod = config.hyena_w_mod
        self.bias = mx.random.normal((D,))
        # One Sin.freq per filter, shared by the sine activations of both implicit MLPs.
        self.freq = mx.full((1, order), float(config.hyena_w))
        self.pos_emb = PositionalEmbedding(config.hyena_emb_dim, config.long_conv_l_max)
        self.implicit_filter = _implicit_filter(config.hyena_emb_dim, order, D)
        if config.bidirectional:
            self.implicit_filter_rev = _implicit_filter(config.hyena_emb_dim, order, D)
        self.modulation = ExponentialModulation(D)
        self._filter_cache = _FilterCache()

    def _set_training_mode(self, mode):
        # As M2BertEncoder's: the kept spectrum (4.8 GB for an 80M model's 24 at L = 32768) and the weights that
        # made it would otherwise outlive those weights through training, until the next inference.
        super()._set_training_mode(mode)
        if mode:
            self._filter_cache = _FilterCache()

    def _filter(self, mlp, L, after):
        h = self.pos_emb.z[:, :L]
        if after is not None:
            h = mx.depends(h, after)
        for layer in mlp:
            h = mx.sin(self.w_mod * self.freq * h) if isinstance(layer, Sin) else layer(h)
        return self.modulation(self.pos_emb.t[:, :L], h)[0].T

    def filters(self, L, *, after=None):
        """(k_fwd, k_rev) of shape (D, L); k_rev is None for a causal filter. With `after`, an array, they are
        computed only once `after` is (see `inference_spectrum`)."""
        k_fwd = self._filter(self.implicit_filter, L, after)
        k_rev = self._filter(self.implicit_filter_rev, L, after) if "implicit_filter_rev" in self else None
        return k_fwd, k_rev

    def inference_spectrum(self, u):
        """The filters' spectrum at u's length on the current back end, computed once and reused while the
        weights stay the same. A long conv from it alone has gradients for every weight when called through
        `reference_vjp` with `filters` (as the mixer does): the filters themselves are not kept, which halves the
        cache.

        New weights (load_weights, update, a training step) are new array objects: the cache is valid while it
        holds the very arrays the filter has now (an in-place update, `w[...] = v` or `w += v`, is not seen). It
        keeps the latest length only, and only up to `max_cached_filter_bytes()`: at L = 32768 one spectrum takes
        200 MB, and caching all 24 of them would put the 32k model out of reach of small machines.
        """
        L = u.shape[1]
        backend = ops.resolve_backend()
        weights = tuple(weight for _, weight in tree_flatten(self.parameters()))
        cache = self._filter_cache
        if (
            cache.key == (L, backend)
            and len(cache.weights) == len(weights)
            and all(map(operator.is_, cache.weights, weights))
        ):
            return cache.spectrum
        k_fwd, k_rev = self.filters(L)
        spectrum = ops.filter_spectrum(k_fwd, k_rev, self.bias, L, backend=backend)
        if spectrum.values.nbytes <= max_cached_filter_bytes():
            # Kept, it is made from the weights alone: tied to u, it would hold u's graph, which no later forward
            # could evaluate when u was a placeholder of a trace (an outer mx.compile), and which the encoder's
            # compiled forward would compute again at every call when the forward that made it was not evaluated.
            self._filter_cache = _FilterCache((L, backend), weights, spectrum)
            return spectrum
        # Not kept: since the filters do not depend on the input, MLX could compute those of every layer first and
        # hold all their spectra at once (about 5 GB at L = 32768); tying them to this layer's input keeps one at a
        # time.
        k_fwd, k_rev = self.filters(L, after=u)
        return ops.filter_spectrum(k_fwd, k_rev, self.bias, L, backend=backend)
