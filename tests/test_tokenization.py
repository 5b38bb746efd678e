import hashlib
import json

import pytest
from transformers import AutoTokenizer

from m2bert_hf_mlx.tokenization import VOCAB_FILE, VOCAB_SHA256, has_tokenizer_files, load_tokenizer, save_tokenizer

SMALL_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s"]


def test_shipped_vocabulary_is_bert_base_uncased():
    assert hashlib.sha256(VOCAB_FILE.read_bytes()).hexdigest() == VOCAB_SHA256
    assert len(VOCAB_FILE.read_text(encoding="utf-8").splitlines()) == 30522


def test_default_tokenizer_gives_bert_base_uncased_ids():
    tokenizer = load_tokenizer(model_max_length=128)
    assert len(tokenizer) == 30522 and tokenizer.model_max_length == 128
    # [CLS] hello world [MASK] ! [SEP], lower-cased as bert-base-uncased does.
    assert tokenizer("Hello World [MASK]!")["input_ids"] == [101, 7592, 2088, 103, 999, 102]
    assert (tokenizer.pad_token_id, tokenizer.mask_token_id) == (0, 103)


def test_padding_to_max_length_uses_the_model_length():
    tokenizer = load_tokenizer(model_max_length=16)
    ids = tokenizer(["hello", "hello world"], padding="max_length", truncation=True)["input_ids"]
    assert [len(row) for row in ids] == [16, 16]
    assert ids[0][3:] == [0] * 13
    assert len(tokenizer("word " * 40, truncation=True)["input_ids"]) == 16


def test_save_writes_the_folder_contract_and_reloads(tmp_path):
    save_tokenizer(load_tokenizer(), tmp_path, model_max_length=2048)
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.txt"} <= {p.name for p in tmp_path.iterdir()}
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "BertTokenizer" and config["model_max_length"] == 2048
    assert hashlib.sha256((tmp_path / "vocab.txt").read_bytes()).hexdigest() == VOCAB_SHA256
    for reloaded in (load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert reloaded.model_max_length == 2048
        assert reloaded("Hello World [MASK]!")["input_ids"] == [101, 7592, 2088, 103, 999, 102]


def test_folder_with_only_a_vocab_file(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(SMALL_VOCAB) + "\n")
    assert has_tokenizer_files(tmp_path)
    tokenizer = load_tokenizer(tmp_path, model_max_length=8)
    assert tokenizer("Hello worlds")["input_ids"] == [2, 5, 6, 7, 3]
    save_tokenizer(tokenizer, tmp_path / "out", model_max_length=8)
    assert (tmp_path / "out" / "vocab.txt").read_text().splitlines() == SMALL_VOCAB


def test_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert not has_tokenizer_files(tmp_path)
    with pytest.raises(ValueError, match="has no tokenizer.json or vocab.txt.*load_tokenizer\\(\\) without a path"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="is a file; give the folder"):
        load_tokenizer(tmp_path / "config.json")


def test_unreadable_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": "not a tokenizer"}')
    with pytest.raises(ValueError, match="cannot be read"):
        load_tokenizer(tmp_path)
