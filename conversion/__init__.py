"""Conversion of published M2-BERT checkpoints into MLX model folders (`m2bert-mlx convert`).

Installed as the sub-package `m2bert_hf_mlx.conversion` (pyproject.toml maps this folder there).
"""
