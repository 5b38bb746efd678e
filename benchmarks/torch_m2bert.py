"""The PyTorch baseline for the speed benchmarks: M2-BERT in eval mode, structured as the canonical code runs it.

Channels-first (B, D, L) around the convolutions as in `MonarchMixerSequenceMixing`, a `torch.fft` long convolution
(`fftconv_ref`), a depthwise `nn.Conv1d` short filter, and the block-diagonal MLP as a `torch.bmm` over blocks
(`blockdiag_multiply`). Parameter names are the canonical state-dict keys, so canonical checkpoints load with
`load_state_dict`, and the benchmark can check that both frameworks compute the same function.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def fftconv(u, k, skip):
    """u (B, D, L), k (D, 2L) = [k_fwd | flip(k_rev)] or (D, L) causal, skip (D,): the canonical fftconv_ref."""
    L = u.shape[-1]
    n = 2 * L
    k_f = torch.fft.rfft(k, n=n) / n
    u_f = torch.fft.rfft(u.to(k.dtype), n=n)
    y = torch.fft.irfft(u_f * k_f, n=n, norm="forward")[..., :L]
    return (y + u * skip[None, :, None]).to(u.dtype)


class Sin(nn.Module):
    def __init__(self, order, w, w_mod):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, order))
        self.w_mod = w_mod

    def forward(self, x):
        return torch.sin(self.w_mod * self.freq * x)


class PositionalEmbedding(nn.Module):
    def __init__(self, emb_dim, seq_len):
        super().__init__()
        t = torch.linspace(0, 1, seq_len)[None, :, None]
        w = 2 * math.pi * torch.linspace(0, seq_len - 1, seq_len)[None, :, None] / seq_len
        bands = (emb_dim - 1) // 2
        f = torch.linspace(1e-4, bands - 1, bands)[None, None]
        z = torch.exp(-1j * f * w)
        self.z = nn.Parameter(torch.cat([t, z.real, z.imag], dim=-1))
        self.register_buffer("t", t)


class ExponentialModulation(nn.Module):
    def __init__(self, d_model):
        super().__init__()
        deltas = torch.linspace(math.log(1e-2) / 1.5, math.log(1e-2) / 0.3, d_model)[None, None]
        self.register_buffer("deltas", deltas)

    def forward(self, t, x):
        return x * torch.exp(-t * self.deltas.abs())


class HyenaFilter(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, order, emb = config.hidden_size, config.hyena_filter_order, config.hyena_emb_dim
        self.bias = nn.Parameter(torch.randn(d))
        act = Sin(order, config.hyena_w, config.hyena_w_mod)
        self.pos_emb = PositionalEmbedding(emb, config.long_conv_l_max)

        def mlp():
            return nn.Sequential(
                nn.Linear(emb, order),
                act,
                nn.Linear(order, order),
                act,
                nn.Linear(order, order),
                act,
                nn.Linear(order, d, bias=False),
            )

        self.implicit_filter = mlp()
        self.bidirectional = config.bidirectional
        if config.bidirectional:
            self.implicit_filter_rev = mlp()
        self.modulation = ExponentialModulation(d)

    def kernel(self, L):
        z, t = self.pos_emb.z[:, :L], self.pos_emb.t[:, :L]
        k_fwd = self.modulation(t, self.implicit_filter(z))[0].transpose(0, 1)
        if not self.bidirectional:
            return k_fwd
        k_rev = self.modulation(t, self.implicit_filter_rev(z))[0].transpose(0, 1)
        return F.pad(k_fwd, (0, L)) + F.pad(k_rev.flip(-1), (L, 0))

    def forward(self, u):
        return fftconv(u, self.kernel(u.shape[-1]), self.bias)


class MonarchMixerSequenceMixing(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.d = d
        self.hta = config.hyena_training_additions
        if self.hta:
            self.layernorm = nn.LayerNorm(d)
        self.in_linear = nn.Linear(d, 3 * d)
        self.out_linear = nn.Linear(d, d)
        self.short_filter = nn.Conv1d(3 * d, 3 * d, kernel_size=3, groups=3 * d, padding=2)
        self.filter_fn = HyenaFilter(config)
        self.residual = config.residual_long_conv
        if self.residual:
            self.filter_fn2 = HyenaFilter(config)

    def forward(self, u):
        if self.hta:
            u = self.layernorm(u)
        L = u.shape[1]
        u_orig = u
        uc = self.short_filter(self.in_linear(u).transpose(1, 2))[..., :L]
        x1, x2, v = uc.split(self.d, dim=1)
        y = self.filter_fn(v * x1) * x2
        if self.residual:
            y = y + self.filter_fn2(u_orig.transpose(1, 2))
        return self.out_linear(y.transpose(1, 2))


class BlockdiagLinear(nn.Module):
    def __init__(self, in_features, out_features, nblocks, bias=True):
        super().__init__()
        self.weight = nn.Parameter(
            torch.randn(nblocks, out_features // nblocks, in_features // nblocks) / math.sqrt(in_features // nblocks)
        )
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        nblocks, q, p = self.weight.shape
        lead = x.shape[:-1]
        xb = x.reshape(-1, nblocks, p).transpose(0, 1)
        y = torch.bmm(xb, self.weight.transpose(1, 2))
        y = y.transpose(0, 1).reshape(*lead, nblocks * q)
        return y + self.bias.to(y.dtype) if self.bias is not None else y


class GLUMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, i, nb = config.hidden_size, config.intermediate_size, config.monarch_mlp_nblocks
        self.i = i
        self.gated_layers = BlockdiagLinear(d, 2 * i, nb, bias=False)
        self.wo = BlockdiagLinear(i, d, nb)
        self.layernorm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(self, a):
        h = self.gated_layers(a)
        h = F.gelu(h[..., : self.i]) * h[..., self.i :]
        return self.layernorm(self.wo(h) + a)


class Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = MonarchMixerSequenceMixing(config)
        self.mlp = GLUMLP(config)

    def forward(self, h):
        return self.mlp(self.attention(h))


class Embeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)))

    def forward(self, input_ids, token_type_ids):
        L = input_ids.shape[1]
        e = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(e + self.position_embeddings(self.position_ids[:, :L]))


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))

    def forward(self, h):
        for layer in self.layer:
            h = layer(h)
        return h


class Pooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, h):
        return torch.tanh(self.dense(h[:, 0]))


class BertModel(nn.Module):
    def __init__(self, config, add_pooling_layer=True):
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config) if add_pooling_layer else None

    def forward(self, input_ids, token_type_ids=None):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h = self.encoder(self.embeddings(input_ids, token_type_ids))
        return h, self.pooler(h) if self.pooler is not None else None


class PredictionHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.transform = nn.Sequential()
        self.transform.dense = nn.Linear(d, d)
        self.transform.act = nn.GELU()
        self.transform.LayerNorm = nn.LayerNorm(d, eps=1e-12)
        self.decoder = nn.Linear(d, config.vocab_size)


class MLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = PredictionHead(config)


class BertForMaskedLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = MLMHead(config)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids, token_type_ids=None):
        h, _ = self.bert(input_ids, token_type_ids)
        p = self.cls.predictions
        return p.decoder(p.transform(h))


class BertWithPooler(nn.Module):
    """The retrieval models' layout: `bert.*` keys with the pooler."""

    def __init__(self, config):
        super().__init__()
        self.bert = BertModel(config, add_pooling_layer=True)

    def forward(self, input_ids, token_type_ids=None):
        return self.bert(input_ids, token_type_ids)
