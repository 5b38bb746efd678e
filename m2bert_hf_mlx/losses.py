"""The losses of the task heads, as transformers computes them."""

import mlx.core as mx
import mlx.nn as nn


def masked_lm_loss(logits, labels):
    """Mean cross-entropy over the positions whose label is not -100 (transformers' ignore index)."""
    mask = labels != -100
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), mx.where(mask, labels, 0), reduction="none")
    return (ce * mask).sum() / mx.maximum(mask.sum(), 1)


def classification_loss(logits, labels, config):
    """Regression (MSE) for one label, else single- or multi-label cross-entropy, as transformers decides it."""
    logits = logits.astype(mx.float32)
    problem = config.problem_type
    if problem is None:
        problem = "regression" if config.num_labels == 1 else "single_label_classification"
        if config.num_labels > 1 and labels.ndim == 2:
            problem = "multi_label_classification"
    if problem == "regression":
        return nn.losses.mse_loss(logits.squeeze(-1) if config.num_labels == 1 else logits, labels.astype(mx.float32))
    if problem == "multi_label_classification":
        return nn.losses.binary_cross_entropy(logits, labels.astype(mx.float32), reduction="mean")
    return nn.losses.cross_entropy(logits, labels, reduction="mean")
