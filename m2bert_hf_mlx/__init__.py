"""M2-BERT (Monarch Mixer BERT) for MLX, with the habits of Hugging Face."""

__version__ = "0.1.0"

from .configuration_m2_bert import M2BertConfig
from .modeling_m2_bert import M2BertForMaskedLM, M2BertForSequenceClassification, M2BertModel
from .pipelines import pipeline

__all__ = ["M2BertConfig", "M2BertModel", "M2BertForMaskedLM", "M2BertForSequenceClassification", "pipeline", "__version__"]
