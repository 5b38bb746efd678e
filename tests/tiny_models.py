"""Small random M2-BERT folders with bert-base-uncased's vocabulary size, for the pipeline and CLI tests.

Each folder holds a canonical-format state dict as model.safetensors and its config.json, as a converted checkpoint
would, so the tests load it through `from_pretrained` and hold the outputs to the float64 reference.
"""

import json

import numpy as np
from random_checkpoint import canonical_config, random_state_dict
from safetensors.numpy import save_file

REAL_VOCAB = 30522
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
MAX_LENGTH = 32


def tiny_config():
    return canonical_config(
        vocab_size=30528,
        hidden_size=32,
        intermediate_size=64,
        hyena_filter_order=8,
        max_position_embeddings=MAX_LENGTH,
        long_conv_l_max=MAX_LENGTH,
    )


def save_tiny_model(folder, head, seed=0):
    """Write a random model with `head` ("mlm", "pooler" or "classifier") into `folder`; return (config, state)."""
    config = tiny_config()
    state = random_state_dict(config, head=head, seed=seed, num_labels=len(LABELS))
    if head == "mlm":
        rng = np.random.default_rng(seed)
        # A wide decoder bias makes the predictions peaked, so the top tokens are not decided by rounding; the six
        # padding rows get a bias that would swallow every score if they were part of the softmax.
        bias = rng.normal(0.0, 2.0, size=config["vocab_size"])
        bias[REAL_VOCAB:] = 30.0
        state["cls.predictions.decoder.bias"] = bias.astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    config_json = dict(config, model_type="m2_bert")
    if head == "classifier":
        config_json.update(
            num_labels=len(LABELS),
            id2label={str(i): name for i, name in LABELS.items()},
            label2id={name: i for i, name in LABELS.items()},
        )
    (folder / "config.json").write_text(json.dumps(config_json))
    return config, state


def padded_ids(tokenizer, text, length=MAX_LENGTH, text_pair=None):
    """(input_ids, token_type_ids) of one text, right-padded with 0 to `length`, as the canonical inference pads."""
    encoded = tokenizer(text, text_pair)
    ids, types = encoded["input_ids"], encoded["token_type_ids"]
    pad = [0] * (length - len(ids))
    return np.array([ids + pad]), np.array([types + pad])


def train_argv(data, output, config, max_length, *extra):
    """`m2bert-mlx train` arguments for a small CPU run: a config file, seed 0, batches of 4, a loss line per step."""
    return ["train", "--data", str(data), "--output", str(output), "--config", str(config), "--seed", "0",
            "--batch-size", "4", "--max-length", str(max_length), "--log-every", "1", *extra]  # fmt: skip
