"""The trainer: MLM masking and loss, whole-model gradients, the three objectives, exact resume, the CLI."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from tiny_models import train_argv

from m2bert_hf_mlx import DEMO_MODEL, M2BertConfig, M2BertForMaskedLM, M2BertModel
from m2bert_hf_mlx.cli import main as cli_main
from m2bert_hf_mlx.errors import CheckpointError
from m2bert_hf_mlx.modeling_m2_bert import M2BertForSequenceClassification
from m2bert_hf_mlx.tokenization import load_tokenizer
from m2bert_hf_mlx.training import (
    ClassificationData,
    ContrastiveData,
    MaskedLMData,
    Trainer,
    TrainingArguments,
    TrainingError,
    load_task_data,
    masked_lm_loss_sum,
)
from m2bert_hf_mlx.training.checkpoints import claim_output_dir

MAX_LENGTH = 24
LINES = [
    "the cat sat on the mat and looked at the dog",
    "a dog ran across the park to find its ball",
    "she poured a glass of water for her friend",
    "the sun rises in the east and sets in the west",
    "he read the book in one long afternoon",
    "birds sing in the trees early in the morning",
    "the children played in the garden after school",
    "we walked to the station in the rain",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None, model_max_length=MAX_LENGTH)


def tiny_config(**overrides):
    return M2BertConfig.from_preset("tiny", hidden_size=32, intermediate_size=64, hyena_filter_order=8, **overrides)


def new_model(cls=M2BertForMaskedLM, seed=0, **overrides):
    mx.random.seed(seed)
    return cls(tiny_config(**overrides))


def arguments(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        max_steps=6,
        batch_size=4,
        max_length=MAX_LENGTH,
        learning_rate=3e-3,
        logging_steps=1,
        seed=0,
    )
    return TrainingArguments(**{**values, **overrides})


def losses(history):
    return [entry["loss"] for entry in history if "loss" in entry]


def test_masking_follows_the_bert_recipe(tokenizer):
    data = MaskedLMData(LINES * 64, tokenizer, MAX_LENGTH)
    batch = data.batch(np.arange(len(data)), np.random.default_rng(0), 0.15)
    original = data.encoded["input_ids"]
    masked = np.array(batch["input_ids"])
    real = np.array(batch["weights"]) == 1
    assert real.size >= real.sum() == data.count(batch) and real[: real.sum()].all(), "padding comes last"
    positions, targets = np.array(batch["positions"])[real], np.array(batch["targets"])[real]
    maskable = data.maskable.reshape(-1)
    assert maskable[positions].all(), "[CLS], [SEP] or [PAD] was masked"
    np.testing.assert_array_equal(targets, original.reshape(-1)[positions])
    assert 0.13 < positions.size / maskable.sum() < 0.2
    assert len(np.unique(positions // MAX_LENGTH)) == len(data), "a line got no masked token"
    unmasked = np.setdiff1d(np.arange(masked.size), positions)
    np.testing.assert_array_equal(masked.reshape(-1)[unmasked], original.reshape(-1)[unmasked])
    replaced = masked.reshape(-1)[positions]
    as_mask = np.mean(replaced == tokenizer.mask_token_id)
    kept = np.mean(replaced == targets)
    assert 0.75 < as_mask < 0.85 and 0.06 < kept < 0.15 and 0.06 < 1 - as_mask - kept < 0.15


def test_packing_fills_examples_with_consecutive_lines(tokenizer):
    long_line = " ".join(["word"] * 40)
    lines = [LINES[0], LINES[1], "hi there", long_line, LINES[2]]
    data = MaskedLMData(lines, tokenizer, MAX_LENGTH, pack=True)
    pieces = [tokenizer(line, add_special_tokens=False)["input_ids"] for line in lines]
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    # LINES[0] and LINES[1] (11 and 10 tokens) fill 24 exactly; the long line is cut and fills one alone.
    assert [len(piece) for piece in pieces] == [11, 10, 2, 40, 9]
    expected = [
        [cls, *pieces[0], sep, *pieces[1], sep],
        [cls, *pieces[2], sep],
        [cls, *pieces[3][: MAX_LENGTH - 2], sep],
        [cls, *pieces[4], sep],
    ]
    assert data.encoded["input_ids"].shape == (len(expected), MAX_LENGTH)
    for row, ids in zip(data.encoded["input_ids"], expected):
        assert row[: len(ids)].tolist() == ids and (row[len(ids) :] == pad).all()
    np.testing.assert_array_equal(data.encoded["attention_mask"], data.encoded["input_ids"] != pad)
    batch = data.batch(np.arange(len(data)), np.random.default_rng(0), 0.5)
    real = np.array(batch["weights"]) == 1
    assert data.maskable.reshape(-1)[np.array(batch["positions"])[real]].all(), "[CLS], [SEP] or [PAD] was masked"


def test_packing_is_for_masked_language_modelling_only(tmp_path, tokenizer):
    rows = tmp_path / "pairs.tsv"
    rows.write_text("a question\tan answer\n")
    with pytest.raises(TrainingError, match="Packing joins lines of text for masked-language modelling"):
        load_task_data("contrastive", rows, tokenizer, MAX_LENGTH, pack=True)


def test_an_unknown_task_names_the_closest_one(tmp_path):
    with pytest.raises(
        TrainingError, match="^Unknown task 'clasification'; did you mean 'classification'\\? choose one"
    ):
        arguments(tmp_path, task="clasification")
    # In any case, and the hint spells the name as it is accepted.
    with pytest.raises(TrainingError, match="^Unknown task 'MLM'; did you mean 'mlm'\\? choose one"):
        arguments(tmp_path, task="MLM")
    with pytest.raises(TrainingError, match="^Unknown task 'Clasification'; did you mean 'classification'\\? "):
        arguments(tmp_path, task="Clasification")
    with pytest.raises(TrainingError, match="^Unknown task 'ner'; choose one of mlm, classification, contrastive\\.$"):
        arguments(tmp_path, task="ner")


def test_masked_position_loss_equals_the_models_loss(tokenizer):
    model = new_model()
    model.eval()
    data = MaskedLMData(LINES, tokenizer, MAX_LENGTH)
    batch = data.batch(np.arange(len(data)), np.random.default_rng(1), 0.15)
    real = np.array(batch["weights"]) == 1
    labels = np.full(batch["input_ids"].shape, -100, dtype=np.int32)
    labels.reshape(-1)[np.array(batch["positions"])[real]] = np.array(batch["targets"])[real]
    expected = model(batch["input_ids"], labels=mx.array(labels)).loss
    loss, _ = masked_lm_loss_sum(model, batch)
    np.testing.assert_allclose((loss / data.count(batch)).item(), expected.item(), rtol=1e-6)


def test_whole_model_gradients_match_finite_differences(tokenizer):
    """Directional derivatives of the MLM loss, one per parameter family, against central differences in float32."""
    model = new_model(vocab_size=len(tokenizer), num_hidden_layers=2)
    model.eval()  # dropout off: the loss must be a function of the weights alone
    data = MaskedLMData(LINES, tokenizer, MAX_LENGTH)
    batch = data.batch(np.arange(len(data)), np.random.default_rng(2), 0.3)
    params = dict(tree_flatten(model.trainable_parameters()))

    def loss_at(values):
        model.update(tree_unflatten(list(values.items())))
        return masked_lm_loss_sum(model, batch)[0] / batch["targets"].size

    grads = dict(tree_flatten(mx.grad(lambda p: loss_at(dict(tree_flatten(p))))(model.trainable_parameters())))
    assert set(grads) == set(params)
    families = [
        "word_embeddings",
        "token_type_embeddings",
        "position_embeddings",
        "LayerNorm",
        "mlp.layernorm",
        "in_linear",
        "short_filter",
        "implicit_filter.",
        "implicit_filter_rev",
        ".freq",
        "pos_emb.z",
        "filter_fn.bias",
        "filter_fn2",
        "gated_layers",
        "wo.",
        "out_linear",
        "cls.predictions",
    ]
    rng = np.random.default_rng(3)
    for family in families:
        keys = [k for k in params if family in k]
        assert keys, family
        # Along the gradient plus as much noise: a derivative large enough to compare relatively, in no special
        # direction.
        rms = np.sqrt(sum((grads[k] ** 2).sum().item() for k in keys) / sum(params[k].size for k in keys))
        direction = {
            k: grads[k] + rms * mx.array(rng.standard_normal(params[k].shape).astype(np.float32)) for k in keys
        }
        norm = np.sqrt(sum((d * d).sum().item() for d in direction.values()))
        direction = {k: d / norm for k, d in direction.items()}
        analytic = sum((grads[k] * direction[k]).sum().item() for k in keys)
        # The step moves the loss by about 1e-3, far above its float32 rounding (~1e-6), within the range where
        # the central difference's own error stays below a percent.
        eps = min(0.1, max(1e-2, 1e-3 / abs(analytic)))
        plus = loss_at({**params, **{k: params[k] + eps * direction[k] for k in keys}}).item()
        minus = loss_at({**params, **{k: params[k] - eps * direction[k] for k in keys}}).item()
        numeric = (plus - minus) / (2 * eps)
        assert abs(numeric - analytic) <= 2e-2 * abs(analytic), (family, numeric, analytic)
    model.update(tree_unflatten(list(params.items())))


def test_mlm_training_lowers_the_loss(tmp_path, tokenizer):
    data = MaskedLMData(LINES, tokenizer, MAX_LENGTH)
    history = Trainer(new_model(), arguments(tmp_path, max_steps=25, batch_size=8, logging_steps=5), data).train()
    curve = losses(history)
    assert curve[-1] < curve[0] - 1.0, curve


def test_resume_repeats_the_uninterrupted_run(tmp_path, tokenizer):
    """With dropout and gradient accumulation on, the steps after a resume are those of a run that never stopped,
    to the bit."""
    data = MaskedLMData(LINES, tokenizer, MAX_LENGTH)
    straight = tmp_path / "straight"
    args = arguments(straight, gradient_accumulation_steps=2, save_steps=3, warmup_steps=2)
    history = Trainer(new_model(hidden_dropout_prob=0.1), args, data).train()

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed_dir / "checkpoint-3")
    other_init = new_model(seed=1, hidden_dropout_prob=0.1)
    resumed = Trainer(
        other_init, arguments(resumed_dir, gradient_accumulation_steps=2, save_steps=3, warmup_steps=2), data
    )
    resumed_history = resumed.train(resume=True)

    assert losses(resumed_history) == losses(history)
    final = dict(tree_flatten(M2BertForMaskedLM.from_pretrained(straight).parameters()))
    for key, value in tree_flatten(M2BertForMaskedLM.from_pretrained(resumed_dir).parameters()):
        assert mx.array_equal(value, final[key]).item(), key


def test_compiled_training_matches_uncompiled_training(tmp_path, tokenizer):
    """mx.compile changes only rounding: with dropout, gradient accumulation and a resume into a trainer whose
    update was already compiled (loading replaces the optimizer state it read), the compiled run follows the
    uncompiled one."""
    data = MaskedLMData(LINES, tokenizer, MAX_LENGTH)
    settings = dict(gradient_accumulation_steps=2, save_steps=2, warmup_steps=2, max_steps=4)
    reference = Trainer(
        new_model(hidden_dropout_prob=0.1), arguments(tmp_path / "eager", compile=False, **settings), data
    ).train()

    compiled_dir = tmp_path / "compiled"
    Trainer(
        new_model(hidden_dropout_prob=0.1), arguments(compiled_dir, compile=True, **{**settings, "max_steps": 2}), data
    ).train()
    resumed = Trainer(
        new_model(seed=1, hidden_dropout_prob=0.1), arguments(compiled_dir, compile=True, **settings), data
    )
    resumed._train_step()  # compiles against the fresh optimizer state, which the checkpoint then replaces
    history = resumed.train(resume=True)

    np.testing.assert_allclose(losses(history), losses(reference), rtol=1e-5)
    expected = dict(tree_flatten(M2BertForMaskedLM.from_pretrained(tmp_path / "eager").parameters()))
    for key, value in tree_flatten(resumed.model.parameters()):
        np.testing.assert_allclose(np.array(value), np.array(expected[key]), rtol=1e-4, atol=1e-6, err_msg=key)


def test_resume_refuses_other_settings(tmp_path, tokenizer):
    data = MaskedLMData(LINES, tokenizer, MAX_LENGTH)
    Trainer(new_model(), arguments(tmp_path, max_steps=2, save_steps=1), data).train()
    with pytest.raises(TrainingError, match="batch_size: 4 then, 8 now"):
        Trainer(new_model(), arguments(tmp_path, max_steps=4, batch_size=8), data).train(resume=True)


@pytest.mark.parametrize("state", ["{", "[]", '{"args": {}, "step": "2", "runtime_s": 0, "log_history": []}'])
def test_resume_from_a_damaged_trainer_state_is_a_training_error(tmp_path, tokenizer, state):
    data = MaskedLMData(LINES, tokenizer, MAX_LENGTH)
    Trainer(new_model(), arguments(tmp_path, max_steps=1, save_steps=1), data).train()
    for path in tmp_path.glob("checkpoint-*/trainer_state.json"):
        path.write_text(state)
    with pytest.raises(TrainingError, match="Cannot resume: .*trainer_state.json"):
        Trainer(new_model(), arguments(tmp_path, max_steps=2), data).train(resume=True)


def test_resume_checks_the_optimizer_file_before_mlx_reads_it(tmp_path, tokenizer):
    data = MaskedLMData(LINES, tokenizer, MAX_LENGTH)
    Trainer(new_model(), arguments(tmp_path, max_steps=1, save_steps=1), data).train()
    for path in tmp_path.glob("checkpoint-*/optimizer.safetensors"):
        raw = bytearray(path.read_bytes())
        header = raw.index(b'"data_offsets":[') + len(b'"data_offsets":[')
        raw[header : header + 1] = b"9"  # an offset past the data
        path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="optimizer.safetensors cannot be read as a checkpoint"):
        Trainer(new_model(), arguments(tmp_path, max_steps=2), data).train(resume=True)


def test_a_checkpoint_a_killed_run_was_writing_is_removed_by_the_next_run(tmp_path, tokenizer):
    partial = tmp_path / ".checkpoint-3.partial-0badf00d"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(bytes(100))
    theirs = tmp_path / ".checkpoint-notes.partial-0badf00d"  # not a checkpoint's: the trainer names none so
    theirs.mkdir()
    Trainer(new_model(), arguments(tmp_path, max_steps=1), MaskedLMData(LINES, tokenizer, MAX_LENGTH)).train()
    assert not partial.exists() and list(tmp_path.glob(".*partial*")) == [theirs]


def test_force_removes_the_runs_checkpoints_and_nothing_else(tmp_path):
    # The trainer's checkpoint-<step> folders, and the partial and set-aside ones publishing names for them.
    removed = ["checkpoint-2", "checkpoint-10", ".checkpoint-3.partial-0badf00d", ".checkpoint-2.old-0badf00d"]
    # A user's folders whose names only look like those.
    kept = ["checkpoint-notes", ".checkpoint-backup", "checkpoint-2b", ".checkpoint-notes.partial-0badf00d", "notes"]
    for name in removed + kept:
        (tmp_path / name).mkdir()
    claim_output_dir(tmp_path, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_classification_training_lowers_the_loss(tmp_path, tokenizer):
    texts = [
        "what a wonderful happy day",
        "i love this great film",
        "such a lovely kind person",
        "a fine good meal",
        "what a terrible sad day",
        "i hate this awful film",
        "such a rude cruel person",
        "a bad nasty meal",
    ]
    data = ClassificationData(texts, [1, 1, 1, 1, 0, 0, 0, 0], tokenizer, MAX_LENGTH)
    # Mean pooling (pool_all, as the canonical GLUE recipes use for some tasks) learns this from scratch in a few steps.
    model = new_model(M2BertForSequenceClassification, num_labels=2, pool_all=True, hidden_dropout_prob=0.0)
    trainer = Trainer(
        model, arguments(tmp_path, task="classification", max_steps=20, batch_size=8, learning_rate=1e-2), data, data
    )
    curve = losses(trainer.train())
    assert curve[-1] < 0.5 * curve[0], curve
    assert trainer.evaluate()["eval_accuracy"] == 1.0


def test_contrastive_training_lowers_the_loss(tmp_path, tokenizer):
    queries = [line.split()[1] + " " + line.split()[-1] for line in LINES]
    data = ContrastiveData(queries, LINES, tokenizer, MAX_LENGTH)
    model = new_model(M2BertModel, add_pooling_layer=True, pool_all=True, hidden_dropout_prob=0.0)
    trainer = Trainer(
        model, arguments(tmp_path, task="contrastive", max_steps=20, batch_size=8, learning_rate=1e-2), data, data
    )
    curve = losses(trainer.train())
    assert curve[-1] < 0.5 * curve[0], curve
    assert trainer.evaluate()["eval_accuracy"] > 0.5


def test_bf16_training_keeps_the_filters_in_float32(tmp_path, tokenizer):
    data = MaskedLMData(LINES, tokenizer, MAX_LENGTH)
    trainer = Trainer(new_model(), arguments(tmp_path, max_steps=3, bf16=True), data)
    assert all(np.isfinite(losses(trainer.train())))
    dtypes = {k: v.dtype for k, v in tree_flatten(trainer.model.parameters())}
    assert dtypes["bert.embeddings.word_embeddings.weight"] == mx.bfloat16
    assert all(d == mx.float32 for k, d in dtypes.items() if ".filter_fn" in k)


def test_train_command(tmp_path, capsys):
    data = tmp_path / "train.txt"
    data.write_text("\n".join(LINES) + "\n")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config().to_dict()))
    output = tmp_path / "model"
    common = train_argv(data, output, config, MAX_LENGTH, "--eval-data", str(data))
    assert cli_main([*common, "--steps", "2", "--save-every", "2", "--pack"]) == 0
    assert cli_main([*common, "--steps", "4", "--resume", "--pack"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines() if " loss=" in line] == [
        "step=1",
        "step=2",
        "step=3",
        "step=4",
    ]
    assert "eval_accuracy=" in out
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["step"] == 4
    model = M2BertForMaskedLM.from_pretrained(output)
    assert load_tokenizer(output).model_max_length == MAX_LENGTH
    assert model(mx.array([[101, 103, 102]])).logits.shape == (1, 3, model.config.vocab_size)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "missing.txt"], "Data file missing.txt does not exist"),
        (["--batch-size", "3", "--grad-accum", "2"], "not a multiple of gradient_accumulation_steps"),
        (["--max-length", "4096"], "longer than the model's maximum of 128 tokens"),
        (["--task", "classification"], "expected a text (and optionally a second text) and a label"),
    ],
)
def test_train_command_explains_mistakes(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.txt").write_text("\n".join(LINES) + "\n")
    argv = [
        "train",
        "--data",
        "train.txt",
        "--output",
        "out",
        "--preset",
        "tiny",
        "--steps",
        "1",
        "--seed",
        "0",
        *extra,
    ]
    assert cli_main(argv) == 1
    assert message in capsys.readouterr().err


@pytest.mark.skipif(
    not (DEMO_MODEL / "config.json").is_file(),
    reason="the demo model is not trained yet (recipes/demo_model/train_demo_model.py)",
)
def test_demo_model_fills_an_easy_blank():
    model = M2BertForMaskedLM.from_pretrained(DEMO_MODEL)
    tokenizer = load_tokenizer(DEMO_MODEL)
    assert (DEMO_MODEL / "README.md").is_file()
    assert sum(p.stat().st_size for p in DEMO_MODEL.iterdir()) <= 20 * 10**6
    batch = tokenizer(["he was born [MASK] 1990."], padding="max_length", return_tensors="np")
    position = list(batch["input_ids"][0]).index(tokenizer.mask_token_id)
    logits = model(mx.array(batch["input_ids"])).logits[0, position, : len(tokenizer)]
    top3 = tokenizer.convert_ids_to_tokens(np.argsort(np.array(logits))[::-1][:3].tolist())
    assert "in" in top3, top3
