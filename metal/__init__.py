"""Kernel sources (installed as m2bert_hf_mlx.metal)."""
