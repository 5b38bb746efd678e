"""Training M2-BERT in MLX: masked-language-model pretraining, sequence classification and contrastive embeddings.

`arguments` (what a run does), `data` (files to examples), `losses` (the objectives), `optimizer` (AdamW and its
schedule), `checkpoints` (the folders a run writes), `trainer` (the loop), `cli` (the `train` sub-command and
`build_trainer`).
"""

from ..errors import TrainingError
from .arguments import TASKS, TrainingArguments
from .checkpoints import latest_checkpoint
from .cli import build_trainer
from .data import ClassificationData, ContrastiveData, MaskedLMData, load_task_data
from .losses import classification_loss_sum, contrastive_loss_sum, masked_lm_loss_sum
from .optimizer import build_optimizer
from .trainer import TASK_MODELS, Trainer

__all__ = [
    "TASKS",
    "TASK_MODELS",
    "ClassificationData",
    "ContrastiveData",
    "MaskedLMData",
    "Trainer",
    "TrainingArguments",
    "TrainingError",
    "build_optimizer",
    "build_trainer",
    "classification_loss_sum",
    "contrastive_loss_sum",
    "latest_checkpoint",
    "load_task_data",
    "masked_lm_loss_sum",
]
