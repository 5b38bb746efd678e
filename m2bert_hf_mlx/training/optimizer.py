"""AdamW with linear warm-up and cosine decay, with the filter MLPs' own learning rate."""

import math

import mlx.core as mx
import mlx.optimizers as optim


def _is_filter_mlp(path, _):
    return ".implicit_filter" in path or path.endswith(".freq")


def _is_filter_positions(path, _):
    return path.endswith("pos_emb.z")


def _schedule(peak, args):
    """Linear warm-up to `peak` over `warmup_steps` (starting at peak / warmup_steps, not at zero), then a cosine
    decay to zero at `max_steps`. `step` counts the updates made before the current one."""
    warmup, decay_steps = args.warmup_steps, max(args.max_steps - args.warmup_steps, 1)

    def learning_rate(step):
        step = step.astype(mx.float32)
        progress = mx.clip((step - warmup) / decay_steps, 0.0, 1.0)
        return mx.where(
            step < warmup, peak * (step + 1) / max(warmup, 1), 0.5 * peak * (1 + mx.cos(math.pi * progress))
        )

    return learning_rate


def build_optimizer(config, args):
    """AdamW (with bias correction) in three groups: the long-conv filter MLPs and their sine frequencies
    (`long_conv_kernel_learning_rate`, `hyena_wd`), the filters' positional features (`hyena_lr_pos_emb`, no
    weight decay), and every other weight (`args.learning_rate`, `args.weight_decay`)."""

    def adamw(peak, weight_decay):
        return optim.AdamW(
            _schedule(peak, args), betas=[0.9, 0.98], eps=1e-6, weight_decay=weight_decay, bias_correction=True
        )

    return optim.MultiOptimizer(
        [
            adamw(config.long_conv_kernel_learning_rate, config.hyena_wd),
            adamw(config.hyena_lr_pos_emb, 0.0),
            adamw(args.learning_rate, args.weight_decay),
        ],
        [_is_filter_mlp, _is_filter_positions],
    )
