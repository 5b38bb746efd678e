"""M2-BERT (Monarch Mixer BERT) for MLX, with the habits of Hugging Face."""

from . import cpu_blas

cpu_blas.preload()  # must run before anything imports mlx.core


def _import_transformers_quietly():
    # Imported without PyTorch, transformers advises installing it; this package never needs PyTorch.
    import os

    previous = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    try:
        import transformers  # noqa: F401
    finally:
        if previous is None:
            del os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"]
        else:
            os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = previous


_import_transformers_quietly()

from ._package import DEMO_MODEL, __version__  # noqa: E402
from .configuration_m2_bert import M2BertConfig  # noqa: E402
from .modeling_m2_bert import M2BertForMaskedLM, M2BertForSequenceClassification, M2BertModel  # noqa: E402
from .pipelines import pipeline  # noqa: E402

__all__ = [
    "M2BertConfig",
    "M2BertModel",
    "M2BertForMaskedLM",
    "M2BertForSequenceClassification",
    "pipeline",
    "DEMO_MODEL",
    "__version__",
]
