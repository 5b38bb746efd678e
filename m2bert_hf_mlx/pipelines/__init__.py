"""Pipelines in the manner of transformers: `pipeline("fill-mask", model=...)`."""

from .base import PADDING_CHOICES, FillMaskPipeline, default_tokenizer, encode, pipeline

__all__ = ["PADDING_CHOICES", "FillMaskPipeline", "default_tokenizer", "encode", "pipeline"]
