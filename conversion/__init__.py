"""Checkpoint reading and conversion (installed as m2bert_hf_mlx.conversion)."""
