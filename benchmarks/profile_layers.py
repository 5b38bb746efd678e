"""Where an M2-BERT-80M MLM forward spends its time, operation by operation, on the current MLX device.

    python benchmarks/profile_layers.py [--batch 32] [--length 128]

Each line is the mean of 3 evaluated calls after one warm-up; the parts of one layer do not add up to the layer
exactly (the layer also runs the residual long convolution and the gating products). "graph construction" is the
Python side of one whole forward alone (building MLX's graph, which runs before any of it is computed), median of 11.
"""

import argparse
import time

# m2bert_hf_mlx before mlx.core: on Linux it gives MLX's CPU back end an optimized BLAS (m2bert_hf_mlx.cpu_blas).
import m2bert_hf_mlx  # noqa: F401  # isort: skip

import mlx.core as mx
import numpy as np

from m2bert_hf_mlx import M2BertConfig, M2BertForMaskedLM, ops
from m2bert_hf_mlx.activations import glu
from m2bert_hf_mlx.blockdiag_linear import to_blocks
from m2bert_hf_mlx.modeling_m2_bert import _glu


def timed(name, fn, repeats=3):
    mx.eval(fn())
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(fn())
    print(f"{name:26s} {(time.perf_counter() - start) / repeats * 1000:9.1f} ms", flush=True)


def graph_construction(fn, repeats=11):
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - start)
        mx.eval(out)
    print(f"{'graph construction':26s} {sorted(seconds)[repeats // 2] * 1000:9.1f} ms", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    B, L = args.batch, args.length
    config = M2BertConfig.from_preset("m2-bert-80m", max_position_embeddings=L, long_conv_l_max=L)
    model = M2BertForMaskedLM(config)
    model.eval()
    mx.eval(model.parameters())
    ids = mx.array(np.random.default_rng(0).integers(1, 30522, (B, L)))
    timed("whole MLM", lambda: model(ids).logits)
    graph_construction(lambda: model(ids).logits)
    h = model.bert(ids).last_hidden_state
    mx.eval(h)
    timed("encoder", lambda: model.bert.encoder(h))
    timed("MLM head", lambda: model.cls.predictions(h, model.bert.embeddings.word_embeddings))
    layer = model.bert.encoder.layer[0]
    mixer, mlp = layer.attention, layer.mlp
    timed("one layer", lambda: layer(h))
    timed("  mixer", lambda: mixer(h))
    timed("    in_linear", lambda: mixer.in_linear(h))
    a = mixer.in_linear(h)
    timed("    short conv + gate", lambda: mixer.short_filter(a))
    gated_v, _ = mixer.short_filter(a)
    k_fwd, k_rev = mixer.filter_fn.filters(L)
    timed("    long conv", lambda: ops.long_conv(gated_v, k_fwd, k_rev, mixer.filter_fn.bias))
    timed("    out_linear", lambda: mixer.out_linear(h))
    timed("  mlp", lambda: mlp(h))
    nblocks = mlp.gated_layers.weight.shape[0]
    timed("    gated_layers", lambda: mlp.gated_layers.block_matmul(to_blocks(h, nblocks)))
    g = mlp.gated_layers.block_matmul(to_blocks(h, nblocks))
    timed("    GLU", lambda: glu(g[: nblocks // 2], g[nblocks // 2 :]))
    activations = to_blocks(_glu(mlp.gated_layers(h)), nblocks)
    mx.eval(activations)
    timed("    wo", lambda: mlp.wo.block_matmul(activations))


if __name__ == "__main__":
    main()
