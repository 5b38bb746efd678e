"""M2-BERT (Monarch Mixer BERT) for MLX, with the habits of Hugging Face."""

__version__ = "0.1.0"

from . import cpu_blas

cpu_blas.preload()  # must run before anything imports mlx.core

from pathlib import Path  # noqa: E402

from .configuration_m2_bert import M2BertConfig  # noqa: E402
from .modeling_m2_bert import M2BertForMaskedLM, M2BertForSequenceClassification, M2BertModel  # noqa: E402
from .pipelines import pipeline  # noqa: E402

# A small M2-BERT MLM trained by this package (recipes/demo_model/train_demo_model.py); its README.md says how well it does.
DEMO_MODEL = Path(__file__).parent / "demo_model"

__all__ = ["M2BertConfig", "M2BertModel", "M2BertForMaskedLM", "M2BertForSequenceClassification", "pipeline", "DEMO_MODEL", "__version__"]
