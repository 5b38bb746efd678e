"""Training M2-BERT in MLX."""
