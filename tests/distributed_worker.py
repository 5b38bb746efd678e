"""Run by tests/test_distributed.py, alone or as each rank under `mlx.launch`: the gradients of one training step
and a short training run of a tiny model, written by rank 0 for the test to compare across world sizes."""

import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from m2bert_hf_mlx import M2BertConfig, M2BertForMaskedLM, M2BertModel
from m2bert_hf_mlx.distributed import init_group
from m2bert_hf_mlx.tokenization import load_tokenizer
from m2bert_hf_mlx.training import ContrastiveData, MaskedLMData, Trainer, TrainingArguments

MAX_LENGTH = 24
# Lines of very different lengths, so that the ranks' shares of a batch hold different numbers of masked tokens.
LINES = [
    "the cat sat on the mat and looked at the dog for a long while before it went to sleep",
    "a dog ran",
    "she poured a glass of water for her friend",
    "sun",
    "he read the book in one long afternoon by the window of the old house",
    "birds sing",
    "the children played in the garden after school until the evening came",
    "we walked",
]
PAIRS = [
    ("what do cats eat", "cats eat fish and meat"),
    ("where is paris", "paris is in france"),
    ("how tall is a giraffe", "a giraffe is very tall"),
    ("when does the sun rise", "the sun rises at dawn"),
    ("who wrote hamlet", "shakespeare wrote hamlet"),
    ("what is water", "water is a liquid"),
    ("why is the sky blue", "light scatters in the air"),
    ("how do birds fly", "birds fly with their wings"),
]


def main(task, out):
    group = init_group()
    out = Path(out)
    mx.random.seed(0)
    # No dropout: each rank draws its own dropout masks, so only a run without it can equal one process.
    config = M2BertConfig.from_preset(
        "tiny",
        hidden_size=32,
        intermediate_size=64,
        hyena_filter_order=8,
        hidden_dropout_prob=0.0,
        hyena_filter_dropout=0.0,
        max_position_embeddings=MAX_LENGTH,
        long_conv_l_max=MAX_LENGTH,
    )
    tokenizer = load_tokenizer(None, model_max_length=MAX_LENGTH)
    if task == "mlm":
        model, data = M2BertForMaskedLM(config), MaskedLMData(LINES, tokenizer, MAX_LENGTH)
    else:
        model = M2BertModel(config, add_pooling_layer=True)
        data = ContrastiveData([q for q, _ in PAIRS], [p for _, p in PAIRS], tokenizer, MAX_LENGTH)
    args = TrainingArguments(
        output_dir=str(out / "model"),
        max_steps=3,
        task=task,
        batch_size=8,
        gradient_accumulation_steps=2,
        max_length=MAX_LENGTH,
        learning_rate=3e-3,
        logging_steps=1,
        compile=False,
    )
    trainer = Trainer(model, args, data, group=group)
    loss, grads = trainer.step_gradients()
    history = trainer.train()
    if group.rank() == 0:
        mx.save_safetensors(str(out / "grads.safetensors"), dict(tree_flatten(grads)))
        mx.save_safetensors(str(out / "weights.safetensors"), dict(tree_flatten(model.parameters())))
        (out / "losses.json").write_text(json.dumps({"step_loss": loss.item(), "history": history}))


if __name__ == "__main__":
    main(*sys.argv[1:])
