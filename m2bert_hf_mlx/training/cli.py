"""The `train` sub-command of `m2bert-mlx`."""

import argparse

import mlx.core as mx

from ..configuration_m2_bert import PRESETS, M2BertConfig
from ..distributed import DEFAULT_TIMEOUT, add_distributed_arguments, init_group
from ..errors import TrainingError
from ..loading import config_from_argument, model_config_dict
from ..tokenization import check_tokenizer_fits, resolve_tokenizer
from .arguments import TASKS, TrainingArguments
from .checkpoints import claim_output_dir
from .data import load_task_data
from .trainer import TASK_MODELS, Trainer


def register(subparsers):
    parser = subparsers.add_parser(
        "train",
        help="pretrain or fine-tune an M2-BERT model (MLM, classification, contrastive)",
        description="Train an M2-BERT model with MLX on the CPU or GPU: masked-language modelling on a text file "
        "(one example per line), sequence classification on TSV rows (text[<TAB>text pair]<TAB>label) or "
        "contrastive embeddings on TSV pairs (query<TAB>positive passage). Writes the model folder to --output, "
        "and checkpoints that --resume continues.",
    )
    parser.add_argument("--data", required=True, metavar="FILE", help="training data (see above)")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the model and its checkpoints")
    # A new model of --preset or --config, or the weights of --init (fine-tuning) with the config of its config.json,
    # or of --preset or --config for a checkpoint that has none.
    config = parser.add_mutually_exclusive_group()
    config.add_argument(
        "--preset",
        choices=list(PRESETS),
        metavar="NAME",
        help=f"a new model of a preset configuration: {', '.join(PRESETS)}",
    )
    config.add_argument(
        "--config",
        metavar="CONFIG",
        help="a new model of a JSON config file or a preset name; with --init, the config of a checkpoint without "
        "config.json (Composer .pt files)",
    )
    parser.add_argument("--init", metavar="MODEL", help="start from a model folder or Hub repo (fine-tuning)")
    parser.add_argument("--task", choices=TASKS, default="mlm", help="training objective (default: mlm)")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps")
    parser.add_argument(
        "--seed", type=int, required=True, help="seed of the initialisation, data order, masks and dropout"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step (default: 32)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: 1)")
    parser.add_argument(
        "--max-length", type=int, help="tokens per example, padding included (default: the model's maximum)"
    )
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default: 5e-4)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: 0.01)")
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default: 0)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clipping (default: 1.0)")
    parser.add_argument(
        "--bf16", action="store_true", help="train with bfloat16 weights (the long-conv filters stay float32)"
    )
    parser.add_argument("--eval-data", metavar="FILE", help="evaluation data, in the format of --data")
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: at the end)")
    parser.add_argument(
        "--save-every", type=int, default=0, help="write a checkpoint every N steps (default: at the end)"
    )
    parser.add_argument("--log-every", type=int, default=10, help="print the mean loss every N steps (default: 10)")
    parser.add_argument(
        "--pack", action="store_true", help="mlm: fill each example with as many consecutive lines as fit"
    )
    parser.add_argument("--mlm-probability", type=float, default=0.15, help="fraction of tokens masked (default: 0.15)")
    parser.add_argument(
        "--temperature", type=float, default=0.05, help="contrastive softmax temperature (default: 0.05)"
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="compile the training step (default: on a GPU only; the CPU back end compiles slowly)",
    )
    restart = parser.add_mutually_exclusive_group()
    restart.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    restart.add_argument("--force", action="store_true", help="start over in a used --output, removing its checkpoints")
    add_distributed_arguments(parser)
    parser.set_defaults(func=run_train, parser=parser)


def run_train(args):
    if args.preset is None and args.config is None and args.init is None:
        args.parser.error("one of the arguments --preset --config --init is required")
    training_args = TrainingArguments(
        output_dir=args.output,
        max_steps=args.steps,
        task=args.task,
        seed=args.seed,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_length=args.max_length,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        bf16=args.bf16,
        eval_steps=args.eval_every,
        save_steps=args.save_every,
        logging_steps=args.log_every,
        mlm_probability=args.mlm_probability,
        temperature=args.temperature,
        compile=args.compile,
    )
    # Read here, so that the errors name --config, and before --force clears anything.
    config = None if args.preset is not None else model_config_dict(args.init, args.config, flag="--config")
    group = init_group(args.backend)
    # Under mlx.launch, rank 0 alone checks (and with --force clears) the folder it alone writes.
    if group.rank() == 0:
        claim_output_dir(training_args.output_dir, resume=args.resume, force=args.force)
    trainer = build_trainer(
        training_args,
        preset=args.preset,
        config=config,
        init=args.init,
        data=args.data,
        eval_data=args.eval_data,
        pack=args.pack,
        group=group,
        timeout=args.timeout,
    )
    trainer.train(resume=args.resume)
    if trainer.is_main:
        print(f"Saved the model to {training_args.output_dir}")
    return 0


def build_trainer(
    args, *, preset=None, config=None, init=None, data, eval_data=None, pack=False, group=None, timeout=DEFAULT_TIMEOUT
):
    """A `Trainer` for `args.task` on the data files (MLM lines packed with `pack`), over the processes of `group`
    (see `Trainer`). The model is a new one of a `preset` or a `config` (what `from_pretrained`'s `config=` takes:
    an M2BertConfig, a dict, a JSON file or a preset name), or one loaded from `init` (a folder or Hub repo; task
    heads it lacks are initialised) with the config of its config.json, or of `preset` or `config` when given."""
    if preset is not None and config is not None:
        raise TrainingError("Give preset or config, not both: each is the whole config of the model.")
    if preset is None and config is None and init is None:
        raise TrainingError("Give preset or config (a new model), or init (a model to start from).")
    mx.random.seed(args.seed)
    tokenizer = resolve_tokenizer(source=init)[0]
    config = M2BertConfig.from_preset(preset) if preset is not None else config
    model_config = (
        M2BertConfig.from_pretrained(init)
        if config is None
        else M2BertConfig.from_upstream_dict(config_from_argument(config))
    )
    max_length = args.max_length or model_config.max_sequence_length
    if max_length > model_config.max_sequence_length:
        raise TrainingError(
            f"max_length {max_length} is longer than the model's maximum of {model_config.max_sequence_length} tokens."
        )
    check_tokenizer_fits(tokenizer, model_config)
    train_data, label2id = load_task_data(args.task, data, tokenizer, max_length, pack=pack)
    eval_set = (
        None if eval_data is None else load_task_data(args.task, eval_data, tokenizer, max_length, label2id, pack)[0]
    )

    cls = TASK_MODELS[args.task]
    overrides = {}
    if label2id is not None:
        overrides = {"num_labels": len(label2id), "label2id": label2id, "id2label": {i: n for n, i in label2id.items()}}
    if args.task == "contrastive":
        overrides["add_pooling_layer"] = True
    if init is not None:
        # A head the checkpoint lacks (a new classifier, a pooler) starts from the canonical initialisation.
        model = cls.from_pretrained(init, config=config, strict=False, dtype="float32", **overrides)
    else:
        for key, value in overrides.items():
            setattr(model_config, key, value)
        model = cls(model_config)
    return Trainer(model, args, train_data, eval_set, tokenizer=tokenizer, group=group, timeout=timeout)
