"""Tokenizer files that contradict their vocabulary, as published beside the 2k and 8k retrieval weights."""

import json
import logging
import shutil

import numpy as np
from tiny_models import MAX_LENGTH, save_tiny_model

from m2bert_hf_mlx import M2BertModel
from m2bert_hf_mlx.cli import main
from m2bert_hf_mlx.pipelines.base import default_tokenizer
from m2bert_hf_mlx.tokenization import VOCAB_FILE, load_tokenizer

TEXT = "Paris is the Capital of FRANCE"


def contradicting_folder(path):
    """A retrieval model folder with bert-base-uncased's vocab.txt and a tokenizer_config.json that says
    do_lower_case false and has no model_max_length."""
    save_tiny_model(path, "pooler")
    shutil.copy(VOCAB_FILE, path / "vocab.txt")
    (path / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": False, "tokenizer_class": "BertTokenizer"})
    )
    return path


def test_the_files_as_written_would_give_unk(tmp_path):
    from transformers import BertTokenizerFast

    folder = contradicting_folder(tmp_path / "model")
    as_written = BertTokenizerFast.from_pretrained(folder)
    assert as_written.convert_ids_to_tokens(as_written(TEXT)["input_ids"]).count("[UNK]") == 3


def test_uncased_vocabulary_is_lowercased_with_one_warning(tmp_path, caplog):
    folder = contradicting_folder(tmp_path / "model")
    with caplog.at_level(logging.WARNING, logger="m2bert_hf_mlx.tokenization"):
        model = M2BertModel.from_pretrained(folder)
        tokenizer = default_tokenizer(model)
        mixed = model.encode(TEXT)
        lower = model.encode(TEXT.lower())
        load_tokenizer(folder, model_max_length=MAX_LENGTH)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(TEXT)["input_ids"])
    assert tokens == ["[CLS]", "paris", "is", "the", "capital", "of", "france", "[SEP]"]
    assert tokenizer("Élan")["input_ids"] == tokenizer("elan")["input_ids"]  # accents stripped, as bert-base-uncased
    assert tokenizer.model_max_length == MAX_LENGTH
    np.testing.assert_array_equal(mixed, lower)
    messages = [r.getMessage() for r in caplog.records if r.name == "m2bert_hf_mlx.tokenization"]
    config_file = str(folder / "tokenizer_config.json")
    case = [m for m in messages if "does not lowercase" in m]
    length = [m for m in messages if "sets no model_max_length" in m]
    assert len(case) == 1 and config_file in case[0] and "[UNK]" in case[0] and "Lowercasing" in case[0]
    assert len(length) == 1 and config_file in length[0] and f"{MAX_LENGTH} tokens" in length[0]


def test_a_cased_vocabulary_is_left_as_it_is(tmp_path):
    folder = tmp_path / "cased"
    folder.mkdir()
    (folder / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Paris", "paris"]) + "\n"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False, "model_max_length": 8}))
    tokenizer = load_tokenizer(folder)
    assert tokenizer.convert_ids_to_tokens(tokenizer("Paris paris")["input_ids"]) == [
        "[CLS]",
        "Paris",
        "paris",
        "[SEP]",
    ]


def test_the_converter_writes_corrected_files(tmp_path, capsys, caplog):
    folder = contradicting_folder(tmp_path / "model")
    assert main(["convert", "--hf-path", str(folder), "--mlx-path", str(tmp_path / "out")]) == 0, (
        capsys.readouterr().err
    )
    written = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert written["do_lower_case"] is True and written["model_max_length"] == MAX_LENGTH
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text())["normalizer"]["lowercase"] is True
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="m2bert_hf_mlx.tokenization"):
        tokenizer = load_tokenizer(tmp_path / "out", model_max_length=MAX_LENGTH)
    assert not [r for r in caplog.records if r.name == "m2bert_hf_mlx.tokenization"]
    assert "[UNK]" not in tokenizer.convert_ids_to_tokens(tokenizer(TEXT)["input_ids"])
