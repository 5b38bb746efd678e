# Imported before anything imports mlx.core, so that MLX's CPU back end gets the optimized BLAS (m2bert_hf_mlx.cpu_blas).
import m2bert_hf_mlx  # noqa: F401, I001

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Golden outputs of the canonical PyTorch code (HazyResearch/m2) on tiny configurations, kept in the repository.
FIXTURES = ROOT / "tests" / "fixtures"


def load_fixture(name):
    """A golden fixture made by the canonical PyTorch code: (config dict, state dict, npz)."""
    path = FIXTURES / f"m2bert_fixture_tiny_{name}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the canonical fixtures live in tests/fixtures")
    data = np.load(path)
    params = {k[len("param/") :]: data[k] for k in data.files if k.startswith("param/")}
    return json.loads(str(data["config_json"])), params, data


@pytest.fixture(params=["mlm_hta0", "mlm_hta1", "retrieval"])
def fixture_name(request):
    return request.param
