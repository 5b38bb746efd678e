import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

# The tests import the installed package: in the source tree m2bert_hf_mlx has no conversion/metal/model_cards
# sub-packages (the install maps them in), and `python -m pytest` puts the source tree first on the path.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
os.environ["PYTHONSAFEPATH"] = "1"  # likewise for the Python processes the tests start from the repository's root

# Imported before anything imports mlx.core, so that MLX's CPU back end gets the optimized BLAS (see cpu_blas).
import m2bert_hf_mlx  # noqa: E402, F401, I001
from m2bert_hf_mlx import emulator, ops  # noqa: E402, I001

# Where each source folder is installed, as pyproject.toml maps them.
_INSTALLED_AS = {"m2bert_hf_mlx": "", "conversion": "conversion", "metal": "metal", "model_cards": "model_cards"}


def _stale_installed_file():
    """The first file of the working tree that the installed package lacks or holds otherwise, if any."""
    installed = Path(m2bert_hf_mlx.__file__).parent
    for folder, target in _INSTALLED_AS.items():
        for source in sorted((ROOT / folder).rglob("*")):
            if source.is_file() and "__pycache__" not in source.parts and source.suffix != ".pyc":
                copy = installed / target / source.relative_to(ROOT / folder)
                if not copy.is_file() or copy.read_bytes() != source.read_bytes():
                    return source.relative_to(ROOT)
    return None


def pytest_configure(config):
    stale = _stale_installed_file()
    if stale is not None:
        raise pytest.UsageError(f"the installed package is older than {stale}: run `make install` (or `make test`)")
    _load_hypothesis_profile(config)


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


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The Hub stand-in of hub_server.py, which huggingface_hub's client reaches through its `url`."""
    from hub_server import HubServer
    from huggingface_hub import constants

    # huggingface_hub 2.x uploads through Xet whenever hf_xet is installed, whatever the server says; the stand-in
    # speaks the LFS protocol, so the client runs as HF_HUB_DISABLE_XET=1 would make it (the variable is read into
    # this constant when huggingface_hub is imported).
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    # No token of the machine's user takes part: each test passes its own.
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    with HubServer() as server:
        yield server


@pytest.fixture(params=["mlm_hta0", "mlm_hta1", "retrieval"])
def fixture_name(request):
    return request.param


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="run the property-based tests with many more examples")


def _load_hypothesis_profile(config):
    from hypothesis import HealthCheck, settings

    # CI: a few seconds per property; --slow: a long fuzzing run. No example database is written into the checkout.
    checks = [HealthCheck.too_slow, HealthCheck.data_too_large]
    common = dict(database=None, deadline=None, suppress_health_check=checks)
    settings.register_profile("ci", max_examples=60, **common)
    settings.register_profile("slow", max_examples=5000, **common)
    settings.load_profile("slow" if config.getoption("--slow") else "ci")


@pytest.fixture
def fresh_checks(monkeypatch):
    """A process whose kernel back ends have checked nothing yet, and no forced back end."""
    monkeypatch.setattr(ops, "_kernel_checks", {})
    monkeypatch.setattr(ops, "_failed_scopes", {})
    monkeypatch.delenv(ops.BACKEND_ENV, raising=False)


@pytest.fixture
def failing_build(monkeypatch, tmp_path):
    """The emulator's C++ build fails, as a compiler that rejects the kernels would: nothing cached, no compiler."""
    monkeypatch.setattr(emulator, "_library", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
