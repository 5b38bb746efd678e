"""What a training run does: `TrainingArguments` and the tasks it can train."""

from dataclasses import dataclass

from ..errors import TrainingError, did_you_mean, quote

TASKS = ("mlm", "classification", "contrastive")


@dataclass
class TrainingArguments:
    """What `Trainer` does. `batch_size` is the number of examples per optimizer step, split into
    `gradient_accumulation_steps` micro-batches. `learning_rate` is the peak learning rate of every weight except
    the long-convolution filters, which follow the config's `long_conv_kernel_learning_rate` and `hyena_wd`, and
    their positional features (`pos_emb.z`), which follow `hyena_lr_pos_emb`, as the canonical recipes do; all of
    them warm up linearly over `warmup_steps` and then decay to zero along a cosine. `eval_steps`, `save_steps`
    and `logging_steps` of 0 mean: only at the end. `compile` compiles the training step with `mx.compile`, which
    fuses its many small operations; None (the default) compiles on a GPU, where compiling takes seconds, but not on
    the CPU back end, which compiles with the system C++ compiler: a minute or more the first time per model shape."""

    output_dir: str
    max_steps: int
    task: str = "mlm"
    seed: int = 0
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_length: int | None = None
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    bf16: bool = False
    eval_steps: int = 0
    save_steps: int = 0
    save_total_limit: int = 2
    logging_steps: int = 10
    mlm_probability: float = 0.15
    temperature: float = 0.05
    compile: bool | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            hint = did_you_mean(self.task, TASKS, end=" ")
            raise TrainingError(f"Unknown task {quote(self.task)}; {hint}choose one of {', '.join(TASKS)}.")
        if self.max_steps < 1:
            raise TrainingError(f"max_steps must be at least 1, got {self.max_steps}.")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise TrainingError("batch_size and gradient_accumulation_steps must be at least 1.")
        if self.batch_size % self.gradient_accumulation_steps:
            raise TrainingError(
                f"batch_size {self.batch_size} is not a multiple of gradient_accumulation_steps "
                f"{self.gradient_accumulation_steps}: each micro-batch must hold the same number of examples."
            )
        if self.task == "contrastive" and self.batch_size // self.gradient_accumulation_steps < 2:
            raise TrainingError("Contrastive training needs at least 2 pairs per micro-batch (the in-batch negatives).")
        if not 0 < self.mlm_probability < 1:
            raise TrainingError(f"mlm_probability must be between 0 and 1, got {self.mlm_probability}.")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise TrainingError(
                f"warmup_steps must be between 0 and max_steps ({self.max_steps}), got {self.warmup_steps}."
            )
        if self.save_total_limit < 1:
            raise TrainingError("save_total_limit must be at least 1 (the checkpoint to resume from).")

    @property
    def micro_batch_size(self):
        return self.batch_size // self.gradient_accumulation_steps
