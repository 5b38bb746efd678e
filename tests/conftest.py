import json
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("M2BERT_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"


def load_fixture(name):
    """A golden fixture made by the canonical PyTorch code: (config dict, state dict, npz)."""
    path = FIXTURES / f"m2bert_fixture_tiny_{name}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the canonical fixtures live in ../shared/fixtures beside the repo")
    data = np.load(path)
    params = {k[len("param/") :]: data[k] for k in data.files if k.startswith("param/")}
    return json.loads(str(data["config_json"])), params, data


@pytest.fixture(params=["mlm_hta0", "mlm_hta1", "retrieval"])
def fixture_name(request):
    return request.param
