"""The encoder's compiled inference on an NVIDIA GPU (MLX's CUDA back end, where it is on by default), against
the same layers run one operation at a time.

Skipped where MLX has no CUDA device (CI). On the GPU machine: python -m pytest tests/gpu.
"""

import mlx.core as mx
import numpy as np
import pytest

from m2bert_hf_mlx import M2BertConfig, M2BertModel
from m2bert_hf_mlx.loading import cast_model
from m2bert_hf_mlx.modeling_m2_bert import M2BertEncoder

pytestmark = [
    pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX with its CUDA back end and a GPU"),
    pytest.mark.filterwarnings("error::m2bert_hf_mlx.ops.LongConvFallbackWarning"),
]


# The mixer's single pass, the long convolution's single pass with the mixer as separate operations, and the
# four-step passes. float32 multiplies in TF32 (MLX's CUDA default), whose rounding a different order of the fused
# element-wise work moves; a wrong kernel input would be off by far more.
@pytest.mark.parametrize("length, batch", [(2048, 2), (8192, 1), (16384, 1)])
@pytest.mark.parametrize("dtype, tolerance", [("float32", 2e-3), ("bfloat16", 3e-2)])
def test_compiled_layers_compute_what_the_uncompiled_ones_do(length, batch, dtype, tolerance, monkeypatch):
    runs = []
    original = M2BertEncoder._layers
    monkeypatch.setattr(M2BertEncoder, "_layers", lambda self, h: runs.append(h.shape) or original(self, h))
    config = M2BertConfig.from_preset(
        "m2-bert-80m-8k-retrieval", num_hidden_layers=2, max_position_embeddings=length, long_conv_l_max=length
    )
    model = M2BertModel(config)
    cast_model(model, dtype)
    model.eval()
    ids = mx.array(np.random.default_rng(length).integers(1, 30522, (batch, length)))
    monkeypatch.setenv("M2BERT_COMPILE", "0")
    eager = model(ids).last_hidden_state.astype(mx.float32)
    monkeypatch.setenv("M2BERT_COMPILE", "1")
    model(ids)
    model(ids)
    compiled = model(ids).last_hidden_state.astype(mx.float32)
    assert len(runs) == 3  # uncompiled twice, traced once, then replayed
    error = (mx.linalg.norm(compiled - eager) / mx.linalg.norm(eager)).item()
    assert error < tolerance, f"relative error {error:.2e}"
