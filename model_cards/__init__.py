"""Model card templates (installed as m2bert_hf_mlx.model_cards)."""
