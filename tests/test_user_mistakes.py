"""A new user's mistakes, each answered with one line that says what was wrong and what to do."""

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest
from test_retrieval_evaluation import write_beir
from tiny_models import MAX_LENGTH, save_tiny_model, train_argv

from m2bert_hf_mlx import DEMO_MODEL, M2BertConfig, M2BertForMaskedLM, M2BertModel, ops, pipeline, tokenization
from m2bert_hf_mlx.cli import main
from m2bert_hf_mlx.encode import encode
from m2bert_hf_mlx.errors import (
    ArgumentError,
    BackendUnavailableError,
    ConfigError,
    HubError,
    InputError,
    InputTypeError,
    OutputFileError,
    WeightsMismatchError,
)
from m2bert_hf_mlx.retrieval_evaluation import RetrievalData, evaluate_retrieval

TOO_LONG = "x [MASK] y" + " word" * MAX_LENGTH


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mistakes")
    for head in ("mlm", "pooler"):
        save_tiny_model(root / head, head)
    return {head: str(root / head) for head in ("mlm", "pooler")}


def test_a_misspelt_from_pretrained_keyword_is_refused_with_the_right_name():
    with pytest.raises(
        ArgumentError,
        match=r"M2BertForMaskedLM.from_pretrained\(\) got an unknown keyword argument 'dtyp': did you mean 'dtype'\?",
    ):
        M2BertForMaskedLM.from_pretrained(DEMO_MODEL, dtyp="bfloat16")
    with pytest.raises(ArgumentError, match="'hiden_size': did you mean 'hidden_size'"):
        M2BertConfig.from_pretrained(DEMO_MODEL, hiden_size=64)


def test_known_config_fields_still_override_the_config():
    model = M2BertForMaskedLM.from_pretrained(DEMO_MODEL, hidden_dropout_prob=0.25)
    assert model.config.hidden_dropout_prob == 0.25


def test_misspelt_encode_and_pipeline_keywords_are_refused(folders):
    encoder = M2BertModel.from_pretrained(folders["pooler"])
    with pytest.raises(
        ArgumentError, match="encode\\(\\) got an unknown keyword argument 'batchsize': did you mean 'batch_size'"
    ):
        encoder.encode(["a text"], batchsize=2)
    with pytest.raises(
        ArgumentError, match="fill-mask pipeline got an unknown keyword argument 'topk': did you mean 'top_k'"
    ):
        pipeline("fill-mask", model=folders["mlm"], topk=2)
    fill = pipeline("fill-mask", model=folders["mlm"])
    with pytest.raises(ArgumentError, match="'paddding': did you mean 'padding'"):
        fill("a [MASK]", paddding="longest")


OFFLINE = """
import sys
from m2bert_hf_mlx import M2BertModel
M2BertModel.from_pretrained("org/not-cached-anywhere", cache_dir=sys.argv[1])
"""


def test_offline_hub_failure_is_one_message_without_the_library_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1
    # The traceback is the user's own call and the error: no "During handling of the above exception" chain.
    assert "During handling" not in result.stderr and "direct cause" not in result.stderr
    assert result.stderr.count("Traceback") == 1 and len(result.stderr.splitlines()) < 15
    last = result.stderr.splitlines()[-1]
    assert last.startswith("m2bert_hf_mlx.errors.HubError: 'org/not-cached-anywhere' is not a local folder")


def test_from_python_the_hub_error_is_a_hub_error_without_a_cause(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError) as error:
        M2BertModel.from_pretrained("org/not-cached-anywhere", cache_dir=tmp_path, local_files_only=True)
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_fill_mask_on_a_retrieval_folder_names_the_right_pipeline(folders, capsys):
    with pytest.raises(WeightsMismatchError, match="'sentence-embedding' or 'feature-extraction' pipeline") as error:
        pipeline("fill-mask", model=folders["pooler"])
    assert "strict=False" not in str(error.value)
    assert main(["fill-mask", "--model", folders["pooler"], "a [MASK]"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'sentence-embedding'" in err and "strict=False" not in err


def test_a_cli_config_that_is_no_file_or_preset_names_the_flag(folders, tmp_path, capsys):
    beir = str(write_beir(tmp_path / "beir", [("d1", "", "a text")], [("q1", "a query")], {"q1": {"d1": 1}}))
    commands = (["info"], ["fill-mask", "a [MASK]"], ["embed", "a text"], ["evaluate-retrieval", "--data", beir])
    for command in commands:
        assert main([*command, "--model", folders["pooler"], "--config", "m2-bert-80M"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--config 'm2-bert-80M' is not a JSON file or a preset name; did you" in err


def test_a_model_without_config_json_is_told_of_config_as_it_was_called(folders, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(folders["pooler"], "model.safetensors"), bare)
    beir = write_beir(tmp_path / "beir", [("d1", "", "a text")], [("q1", "a query")], {"q1": {"d1": 1}})
    data = tmp_path / "train.txt"
    data.write_text("\n".join(LINES) + "\n")
    train = ["train", "--data", data, "--output", tmp_path / "run", "--init", bare, "--steps", "1", "--seed", "0"]
    commands = {
        "info": ["info", "--model", bare],
        "fill-mask": ["fill-mask", "--model", bare, "a [MASK]"],
        "embed": ["embed", "--model", bare, "a text"],
        "evaluate-retrieval": ["evaluate-retrieval", "--model", bare, "--data", beir, "--no-cache"],
        "train": [*train, "--batch-size", "4"],
        "convert": ["convert", "--hf-path", bare, "--mlx-path", tmp_path / "out"],
    }
    for name, argv in commands.items():
        assert main([str(a) for a in argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"m2bert-mlx {name}: error: {bare} has no config.json (Composer .pt checkpoints ship"), (
            err
        )
        assert err.count("\n") == 1 and "Pass --config with a JSON file or a preset name: m2-bert-80m, " in err
    with pytest.raises(
        ConfigError, match=r"^\S+ has no config.json .+ Pass config= with an M2BertConfig, a JSON file,"
    ):
        M2BertModel.from_pretrained(bare)
    with pytest.raises(
        ConfigError, match=r"has no config.json .+ Build its config with M2BertConfig.from_preset\(name\)"
    ):
        M2BertConfig.from_pretrained(bare)
    # What the message says works, train --init included.
    config = os.path.join(folders["pooler"], "config.json")
    assert main(["info", "--model", str(bare), "--config", config]) == 0
    assert main([str(a) for a in [*train, "--batch-size", "4", "--max-length", "16", "--config", config]]) == 0


def test_the_cli_truncation_warning_names_the_cli_flag_which_exists(folders, capsys, caplog):
    assert main(["fill-mask", "--model", folders["mlm"], "--top-k", "1", TOO_LONG]) == 0
    assert "truncated" in caplog.text and "--no-truncation" in caplog.text
    assert main(["fill-mask", "--model", folders["mlm"], "--no-truncation", TOO_LONG]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "more than the model's maximum" in err and "leave out --no-truncation" in err


def test_embed_takes_no_truncation_too(folders, tmp_path, capsys):
    output = tmp_path / "v.npy"
    assert main(["embed", "--model", folders["pooler"], "--no-truncation", "--output", str(output), TOO_LONG]) == 1
    assert "more than the model's maximum" in capsys.readouterr().err and not output.exists()


LINES = ["the cat sat on the mat", "a dog ran in the park", "birds fly over the sea"] * 4


def train(tmp_path, output, *extra):
    data = tmp_path / "train.txt"
    data.write_text("\n".join(LINES) + "\n")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**M2BertConfig.from_preset("tiny").to_dict(), "max_position_embeddings": 16}))
    return main(train_argv(data, output, config, 16, *extra))


def test_train_refuses_a_used_output_folder_unless_resumed_or_forced(tmp_path, capsys):
    output = tmp_path / "run"
    assert train(tmp_path, output, "--steps", "2", "--save-every", "1") == 0
    assert (output / "checkpoint-2").is_dir()
    capsys.readouterr()
    assert train(tmp_path, output, "--steps", "2") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds files" in err and "--resume" in err and "--force" in err
    # --force starts over: the stale checkpoints a later --resume would pick up are gone.
    (output / ".checkpoint-9.partial-0000").mkdir()
    assert train(tmp_path, output, "--steps", "1", "--force") == 0
    names = sorted(p.name for p in output.iterdir())
    assert [n for n in names if "checkpoint-" in n] == ["checkpoint-1"], names
    assert json.loads((output / "trainer_state.json").read_text())["step"] == 1
    with pytest.raises(SystemExit) as usage:
        train(tmp_path, output, "--steps", "1", "--resume", "--force")
    assert usage.value.code == 2


def test_train_config_mistakes_are_the_other_commands_lines_and_touch_nothing(folders, tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "gpt2.json").write_text(json.dumps({"model_type": "gpt2"}))
    data = tmp_path / "train.txt"
    data.write_text("\n".join(LINES) + "\n")
    output = tmp_path / "run"
    (output / "checkpoint-2").mkdir(parents=True)
    for given in ("missing.json", "m2-bert-80M", "bad.json", "gpt2.json"):
        config = tmp_path / given if given.endswith(".json") else given
        assert main(train_argv(data, output, config, 16, "--steps", "1", "--force")) == 1
        train_err = capsys.readouterr().err
        assert main(["info", "--model", folders["pooler"], "--config", str(config)]) == 1
        info_err = capsys.readouterr().err
        assert train_err.count("\n") == 1 and train_err.startswith("m2bert-mlx train: error: --config "), train_err
        assert train_err.removeprefix("m2bert-mlx train") == info_err.removeprefix("m2bert-mlx info")
        # Read before --force clears the folder.
        assert (output / "checkpoint-2").is_dir()
    # A preset name is a config too, as for the other commands.
    assert main(train_argv(data, output, "tiny", 16, "--steps", "1", "--force")) == 0


def test_an_output_that_is_a_file_is_one_line(tmp_path, capsys):
    output = tmp_path / "file"
    output.write_text("x")
    assert train(tmp_path, output, "--steps", "1") == 1
    assert "is a file, not a folder" in capsys.readouterr().err


def test_pipeline_factory_mistakes_are_typed_errors(folders):
    with pytest.raises(InputError, match="Unknown task 'fill_mask'; did you mean 'fill-mask'\\? available tasks"):
        pipeline("fill_mask", model=folders["mlm"])
    with pytest.raises(InputError, match="^Unknown task 'translation'; available tasks: fill-mask, feature-extraction"):
        pipeline("translation", model=folders["mlm"])
    with pytest.raises(InputError, match="needs model="):
        pipeline("fill-mask")
    fill = pipeline("fill-mask", model=folders["mlm"])
    with pytest.raises(InputError, match="not a model object"):
        pipeline("fill-mask", model=fill.model, token="hf_x")


def test_a_task_that_is_not_a_string_is_a_type_error_naming_the_tasks(folders):
    for task in (["fill-mask"], {"fill-mask": 1}, 3):
        with pytest.raises(
            InputTypeError, match=r"^pipeline\(\) takes the task as a string, not .+; available tasks: fill-mask, "
        ):
            pipeline(task, model=folders["mlm"])
    with pytest.raises(InputTypeError, match=r"not \['fill-mask'\];"):
        pipeline(["fill-mask"], model=folders["mlm"])


def test_pipeline_and_encode_input_mistakes_are_typed_errors(folders):
    fill = pipeline("fill-mask", model=folders["mlm"])
    with pytest.raises(InputError, match="list of inputs is empty"):
        fill([])
    with pytest.raises(InputTypeError, match="not a string"):
        fill(["a [MASK]", 3])
    with pytest.raises(InputTypeError, match="Expected a string or a list of strings"):
        fill(b"a [MASK]")
    with pytest.raises(InputError, match="batch_size=0: give a positive integer"):
        fill("a [MASK]", batch_size=0)
    with pytest.raises(InputTypeError, match="encode takes an M2BertModel"):
        encode(fill.model, ["a text"])
    with pytest.raises(InputTypeError, match="evaluate_retrieval takes an M2BertModel"):
        evaluate_retrieval(fill.model, None)


def test_the_cache_that_cannot_be_written_is_an_output_file_error(folders, tmp_path):
    encoder = M2BertModel.from_pretrained(folders["pooler"])
    data = RetrievalData(["d1"], ["cat milk"], ["q1"], ["cat"], {"q1": {"d1": 1}})
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputFileError, match="cannot write the corpus-embedding cache"):
        evaluate_retrieval(encoder, data, cache=tmp_path / "file" / "x.npz")


def test_a_misspelt_long_conv_backend_is_a_config_error_with_a_suggestion(monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, "emulate")
    with pytest.raises(ConfigError, match="'emulate'.*did you mean 'emulated'\\? choose one of metal, cuda, mlx"):
        ops.resolve_backend()
    unavailable = [name for name, device in (("metal", mx.metal), ("cuda", mx.cuda)) if not device.is_available()]
    for backend in unavailable:
        with pytest.raises(BackendUnavailableError, match=f"long_conv backend '{backend}' needs"):
            ops.resolve_backend(backend)


def test_a_misspelt_factory_keyword_is_refused_before_the_model_loads(monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the keywords were checked")

    monkeypatch.setattr(M2BertForMaskedLM, "from_pretrained", no_loading)
    with pytest.raises(ArgumentError, match="unknown keyword argument 'dtyp': did you mean 'dtype'\\?"):
        pipeline("fill-mask", model=DEMO_MODEL, dtyp="float16")
    with pytest.raises(ArgumentError, match="'model_kwarg': did you mean 'model_kwargs'\\?"):
        pipeline("fill-mask", model=DEMO_MODEL, model_kwarg={})
    with pytest.raises(ArgumentError, match="'topk': did you mean 'top_k'\\?"):
        pipeline("fill-mask", model=DEMO_MODEL, topk=2)


def test_pipeline_loads_a_tokenizer_by_the_one_resolver_with_the_revision(folders, monkeypatch):
    calls = []
    real = tokenization.load_tokenizer

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenization, "load_tokenizer", recording)
    fill = pipeline("fill-mask", model=folders["mlm"], tokenizer=DEMO_MODEL, revision="main")
    assert [call["revision"] for call in calls] == ["main"]
    assert fill.tokenizer.model_max_length == MAX_LENGTH
