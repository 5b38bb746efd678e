"""`m2bert-mlx convert` end to end, on synthetic checkpoints of the published layouts built from the golden fixtures."""

import hashlib
import json
import re

import mlx.core as mx
import numpy as np
import pytest
import yaml
from checkpoint_files import canonical_state_dict, composer_checkpoint
from conftest import load_fixture
from hub_server import USER, WRITE_TOKEN, HubServer
from huggingface_hub import HfApi, constants
from torch_format import BFloat16, save_torch_object, save_torch_state_dict

from m2bert_hf_mlx import M2BertForMaskedLM, M2BertModel
from m2bert_hf_mlx.cli import main
from m2bert_hf_mlx.conversion.convert import convert
from m2bert_hf_mlx.tokenization import VOCAB_SHA256, load_tokenizer

# The fixtures' vocabulary has 120 entries, so the tokenizer that goes with them has 120 tokens too.
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "paris", "is", "the", "capital", "of", "france", "."]
VOCAB += [f"w{i}" for i in range(120 - len(VOCAB))]


def write_vocab(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return folder


def hf_retrieval_folder(path, *, bf16_keys=()):
    """A folder laid out like togethercomputer/m2-bert-80M-*-retrieval: remote-code config.json, pytorch_model.bin."""
    config, state_dict = canonical_state_dict("retrieval")
    write_vocab(path)
    config = {
        **config,
        "model_type": "bert",
        "auto_map": {"AutoModel": "bert_layers.BertModel"},
        "architectures": ["BertForTextEncoding"],
    }
    (path / "config.json").write_text(json.dumps(config))
    save_torch_state_dict(
        {k: BFloat16(v) if k in bf16_keys else v for k, v in state_dict.items()}, path / "pytorch_model.bin"
    )
    return path


def fixture_inputs(data):
    prefix = "input/L32/" if "input/L32/input_ids" in data.files else "input/"
    return {
        name: mx.array(data[prefix + name])
        for name in ("input_ids", "token_type_ids", "attention_mask")
        if prefix + name in data.files
    }


def card_metadata(folder):
    text = (folder / "README.md").read_text()
    front = re.match(r"---\n(.*?)\n---\n", text, re.S)
    return yaml.safe_load(front.group(1)), text


def run(argv, capsys):
    code = main(["convert", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_hf_folder_becomes_the_mlx_folder_contract(tmp_path, capsys):
    source = hf_retrieval_folder(tmp_path / "m2-bert-retrieval")
    out = tmp_path / "mlx"
    code, output = run(["--hf-path", source, "--mlx-path", out], capsys)
    assert code == 0, output

    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "README.md",
    }
    config_text = (out / "config.json").read_text()
    config = json.loads(config_text)
    assert config["model_type"] == "m2_bert" and config["architectures"] == ["M2BertModel"] and "auto_map" not in config
    assert list(config) == sorted(config)
    assert (
        mx.load(str(out / "model.safetensors"))
        and json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    )
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "BertTokenizer" and tokenizer_config["model_max_length"] == 32
    assert (out / "vocab.txt").read_text().splitlines() == VOCAB

    meta, text = card_metadata(out)
    assert meta["library_name"] == "mlx" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "sentence-similarity" and {"mlx", "m2-bert", "monarch-mixer"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local source has no Hub id
    assert "pad to 32 tokens" in text and "| quantization | none |" in text and "| weights | float32 |" in text

    model = M2BertModel.from_pretrained(out)
    _, _, data = load_fixture("retrieval")
    got = model(**fixture_inputs(data))
    np.testing.assert_allclose(np.array(got.last_hidden_state), data["expected/sequence_output"], atol=1e-4)
    np.testing.assert_allclose(np.array(got.pooler_output), data["expected/pooled_output"], atol=1e-4)


def test_composer_file_needs_a_config_and_converts_with_one(tmp_path, capsys):
    config, state_dict = canonical_state_dict("mlm_hta1")
    save_torch_object(composer_checkpoint(state_dict), tmp_path / "model.pt")
    code, output = run(["--hf-path", tmp_path / "model.pt", "--mlx-path", tmp_path / "out"], capsys)
    assert code == 1 and "has no config.json" in output and "Pass --config with a JSON file or a preset name" in output
    assert not (tmp_path / "out").exists()

    (tmp_path / "config.json").write_text(json.dumps(config))
    argv = ["--hf-path", tmp_path / "model.pt", "--mlx-path", tmp_path / "out", "--config", tmp_path / "config.json"]
    code, output = run(argv, capsys)
    assert code == 1 and "ids up to 30521 (30522 tokens) but the model only 120 embedding rows" in output

    code, output = run([*argv, "--tokenizer", write_vocab(tmp_path / "tokenizer")], capsys)
    assert code == 0, output
    assert card_metadata(tmp_path / "out")[0]["pipeline_tag"] == "fill-mask"
    model = M2BertForMaskedLM.from_pretrained(tmp_path / "out")
    _, _, data = load_fixture("mlm_hta1")
    np.testing.assert_allclose(
        np.array(model(**fixture_inputs(data)).logits), data["expected/L32/mlm_logits"], atol=1e-4
    )


def test_composer_retrieval_file_keeps_its_pooler(tmp_path, capsys):
    config, state_dict = canonical_state_dict("retrieval")
    save_torch_object(composer_checkpoint(state_dict), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps(config))
    argv = [
        "--hf-path",
        tmp_path / "model.pt",
        "--mlx-path",
        tmp_path / "out",
        "--config",
        tmp_path / "config.json",
        "--tokenizer",
        write_vocab(tmp_path / "tokenizer"),
    ]
    code, output = run(argv, capsys)
    assert code == 0, output
    model = M2BertModel.from_pretrained(tmp_path / "out")
    _, _, data = load_fixture("retrieval")
    np.testing.assert_allclose(
        np.array(model(**fixture_inputs(data)).pooler_output), data["expected/pooled_output"], atol=1e-4
    )


def test_without_tokenizer_files_the_shipped_bert_base_uncased_goes_along(tmp_path, capsys):
    config, state_dict = canonical_state_dict("retrieval")
    words = state_dict["bert.embeddings.word_embeddings.weight"]
    # The published vocabulary size, so that bert-base-uncased's 30522 tokens fit.
    state_dict["bert.embeddings.word_embeddings.weight"] = np.concatenate(
        [words, np.zeros((30528 - 120, 64), np.float32)]
    )
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({**config, "vocab_size": 30528}))
    save_torch_state_dict(state_dict, source / "pytorch_model.bin")
    code, output = run(["--hf-path", source, "--mlx-path", tmp_path / "out"], capsys)
    assert code == 0, output
    assert hashlib.sha256((tmp_path / "out" / "vocab.txt").read_bytes()).hexdigest() == VOCAB_SHA256
    assert (
        "| tokenizer | bert-base-uncased (the vocab.txt shipped with m2bert-hf-mlx) |"
        in card_metadata(tmp_path / "out")[1]
    )
    assert load_tokenizer(tmp_path / "out")("Hello world")["input_ids"] == [101, 7592, 2088, 102]

    code, output = run(["--hf-path", source, "--mlx-path", tmp_path / "other", "--preset", "m2-bert-80m"], capsys)
    assert code == 1 and "does not fit M2BertModel (12 layers, hidden size 768)" in output


def test_safetensors_export_without_the_shared_tensors(tmp_path, capsys):
    """Like hazyresearch/M2-BERT-*-Retrieval-Encoder-V1: safetensors drops the tied decoder and the freq copies."""
    config, state_dict = canonical_state_dict("mlm_hta0")
    kept = {
        k: mx.array(v)
        for k, v in state_dict.items()
        if k != "cls.predictions.decoder.weight" and not re.search(r"implicit_filter(\.[35]|_rev\.[135])\.freq$", k)
    }
    source = write_vocab(tmp_path / "src")
    (source / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    mx.save_safetensors(
        str(source / "model.safetensors"),
        {k: v.astype(mx.bfloat16) if v.dtype == mx.float32 else v for k, v in kept.items()},
    )
    code, output = run(["--hf-path", source, "--mlx-path", tmp_path / "out", "--dtype", "float32"], capsys)
    assert code == 0, output
    model = M2BertForMaskedLM.from_pretrained(tmp_path / "out")
    _, _, data = load_fixture("mlm_hta0")
    logits, expected = np.array(model(**fixture_inputs(data)).logits), data["expected/L32/mlm_logits"]
    assert np.abs(logits - expected).max() / np.abs(expected).max() < 0.05  # the weights went through bfloat16


def test_output_folder_is_replaced_only_with_force_and_failures_leave_nothing(tmp_path, capsys, caplog):
    source = hf_retrieval_folder(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, output = run(["--hf-path", source, "--mlx-path", out], capsys)
    assert code == 1 and "already exists and is not empty; pass --force" in output
    assert (out / "keep.txt").read_text() == "mine"

    code, output = run(["--hf-path", source, "--mlx-path", out, "--force"], capsys)
    assert code == 1 and "holds what this package does not write ('keep.txt')" in output
    assert "--force-any-folder" in output
    assert (out / "keep.txt").read_text() == "mine"

    (source / "pytorch_model.bin").write_bytes((source / "pytorch_model.bin").read_bytes()[:5000])
    code, output = run(["--hf-path", source, "--mlx-path", out, "--force", "--force-any-folder"], capsys)
    assert code == 1 and "pytorch_model.bin is truncated or corrupt" in output
    assert (out / "keep.txt").read_text() == "mine"  # untouched by the failed conversion
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no half-written sibling left behind

    hf_retrieval_folder(source)
    code, output = run(["--hf-path", source, "--mlx-path", out, "--force", "--force-any-folder"], capsys)
    assert code == 0, output
    assert "--force: replacing" in caplog.text and "what it holds (1): 'keep.txt'" in caplog.text
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]

    code, output = run(["--hf-path", source, "--mlx-path", source, "--force"], capsys)
    assert code == 1 and "would replace the source" in output


@pytest.mark.parametrize("force", [False, True], ids=["new-folder", "force"])
def test_a_destination_swapped_during_the_conversion_is_left_alone(tmp_path, capsys, monkeypatch, force):
    # Another tool puts its own folder at --mlx-path while the weights are written: the conversion must not replace
    # it (nor, with --force, what it set aside), and says so.
    from m2bert_hf_mlx.conversion import convert as convert_module

    source = hf_retrieval_folder(tmp_path / "src")
    out = tmp_path / "out"
    if force:
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"old")
    real = convert_module.write_model_folder

    def write_then_swap(folder, *args, **kwargs):
        real(folder, *args, **kwargs)
        if out.exists():
            out.rename(tmp_path / "moved")
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")

    monkeypatch.setattr(convert_module, "write_model_folder", write_then_swap)
    code, output = run(["--hf-path", source, "--mlx-path", out, *(["--force"] if force else [])], capsys)
    assert code == 1 and "was replaced by something else during the conversion; nothing was changed" in output
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


def test_quantized_conversion_loads_quantized(tmp_path, capsys):
    source = hf_retrieval_folder(tmp_path / "src")
    code, output = run(
        [
            "--hf-path",
            source,
            "--mlx-path",
            tmp_path / "out",
            "-q",
            "--q-bits",
            "8",
            "--q-group-size",
            "32",
            "--q-skip",
            "heads",
        ],
        capsys,
    )
    assert code == 0, output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    weights = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert weights["encoder.layer.0.attention.in_linear.weight"].dtype == mx.uint32
    assert weights["encoder.layer.0.mlp.wo.weight"].dtype == mx.uint32  # 64 inputs per block: quantized
    assert weights["encoder.layer.0.mlp.gated_layers.weight"].dtype == mx.float32  # 16 per block: too narrow
    assert weights["pooler.dense.weight"].dtype == mx.float32  # skipped head
    _, text = card_metadata(tmp_path / "out")
    assert "8-bit affine, group size 32" in text and "task heads" in text

    model = M2BertModel.from_pretrained(tmp_path / "out")
    _, _, data = load_fixture("retrieval")
    pooled = np.array(model(**fixture_inputs(data)).pooler_output)
    expected = data["expected/pooled_output"]
    assert 0 < np.abs(pooled - expected).max() / np.abs(expected).max() < 0.05

    with pytest.raises(ValueError, match="bits=7 is not supported"):
        convert(source, tmp_path / "q7", quantize=True, q_bits=7)
    assert not (tmp_path / "q7").exists()
    code, output = run(["--hf-path", tmp_path / "out", "--mlx-path", tmp_path / "again", "-q"], capsys)
    assert code == 1 and "is already quantized" in output
    code, output = run(["--hf-path", source, "--mlx-path", tmp_path / "x", "--q-bits", "4"], capsys)
    assert code == 1 and "only apply with -q/--quantize" in output


def test_bfloat16_output_keeps_the_filters_in_float32(tmp_path, capsys):
    source = hf_retrieval_folder(tmp_path / "src", bf16_keys=("bert.pooler.dense.weight",))
    code, output = run(["--hf-path", source, "--mlx-path", tmp_path / "out", "--dtype", "bfloat16"], capsys)
    assert code == 0, output
    weights = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert weights["encoder.layer.0.attention.in_linear.weight"].dtype == mx.bfloat16
    assert weights["encoder.layer.0.attention.filter_fn.implicit_filter.0.weight"].dtype == mx.float32
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert "| weights | bfloat16 |" in card_metadata(tmp_path / "out")[1]


@pytest.mark.parametrize("fixture", ["mlm_hta0", "retrieval"])
def test_the_cards_usage_snippet_runs(tmp_path, capsys, fixture):
    config, state_dict = canonical_state_dict(fixture)
    source = write_vocab(tmp_path / "src")
    (source / "config.json").write_text(json.dumps(config))
    save_torch_state_dict(state_dict, source / "model.bin")
    code, output = run(["--hf-path", source, "--mlx-path", tmp_path / "out"], capsys)
    assert code == 0, output
    snippet = re.search(r"```python\n(.*?)```", (tmp_path / "out" / "README.md").read_text(), re.S).group(1)
    assert f'from_pretrained("{tmp_path / "out"}")' in snippet
    exec(compile(snippet, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    assert printed in VOCAB if fixture == "mlm_hta0" else -1 <= float(printed) <= 1


# ---------------------------------------------------------------------------------------------------------------
# Hub source and upload


@pytest.fixture
def hub(monkeypatch, tmp_path):
    # As in test_hub.py: the stand-in speaks LFS, and no token or cache of the machine's user takes part.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    with HubServer() as server:
        yield server


def test_hub_repo_to_uploaded_mlx_repo(hub, tmp_path, capsys):
    source_repo, target_repo = f"{USER}/m2-bert-retrieval", f"{USER}/m2-bert-retrieval-mlx"
    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    api.create_repo(source_repo)
    commit = api.upload_folder(repo_id=source_repo, folder_path=hf_retrieval_folder(tmp_path / "src")).oid

    argv = [
        "--hf-path",
        source_repo,
        "--mlx-path",
        tmp_path / "out",
        "--hf-endpoint",
        hub.url,
        "--upload-repo",
        target_repo,
        "--token",
        WRITE_TOKEN,
    ]
    code, output = run(argv, capsys)
    assert code == 0, output
    assert WRITE_TOKEN not in output
    assert f"uploaded it to {target_repo}" in output

    files = hub.files(target_repo)
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "README.md"} <= set(files)
    meta, text = card_metadata(tmp_path / "out")
    assert meta["base_model"] == source_repo and commit in text
    assert f'from_pretrained("{target_repo}")' in text
    assert files["README.md"].content.decode() == (tmp_path / "out" / "README.md").read_text()

    model = M2BertModel.from_pretrained(target_repo, endpoint=hub.url, cache_dir=tmp_path / "pull")
    _, _, data = load_fixture("retrieval")
    np.testing.assert_allclose(
        np.array(model(**fixture_inputs(data)).pooler_output), data["expected/pooled_output"], atol=1e-4
    )
    assert (
        load_tokenizer(target_repo, endpoint=hub.url, cache_dir=tmp_path / "pull").convert_ids_to_tokens(5) == "paris"
    )


def test_composer_repo_without_config(hub, tmp_path, capsys):
    """Like danfu09/m2-bert-80M: a repo holding only the Composer model.pt."""
    repo_id = f"{USER}/m2-bert-composer"
    config, state_dict = canonical_state_dict("mlm_hta1")
    (tmp_path / "src").mkdir()
    save_torch_object(composer_checkpoint(state_dict), tmp_path / "src" / "model.pt")
    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "src")

    argv = ["--hf-path", repo_id, "--mlx-path", tmp_path / "out", "--hf-endpoint", hub.url]
    code, output = run(argv, capsys)
    assert code == 1 and "has no config.json" in output
    assert not hub.requests("GET", "/model.pt")

    (tmp_path / "config.json").write_text(json.dumps(config))
    tokenizer = write_vocab(tmp_path / "tokenizer")
    code, output = run([*argv, "--config", tmp_path / "config.json", "--tokenizer", tokenizer], capsys)
    assert code == 0, output
    assert hub.requests("GET", "/model.pt")
    meta, _ = card_metadata(tmp_path / "out")
    assert meta["base_model"] == repo_id and meta["pipeline_tag"] == "fill-mask"
    model = M2BertForMaskedLM.from_pretrained(tmp_path / "out")
    _, _, data = load_fixture("mlm_hta1")
    np.testing.assert_allclose(
        np.array(model(**fixture_inputs(data)).logits), data["expected/L32/mlm_logits"], atol=1e-4
    )


def test_unsupported_repo_fails_before_the_weights_are_fetched(hub, tmp_path, capsys):
    repo_id = f"{USER}/not-m2"
    folder = hf_retrieval_folder(tmp_path / "llama")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=folder)

    code, output = run(["--hf-path", repo_id, "--mlx-path", tmp_path / "out", "--hf-endpoint", hub.url], capsys)
    assert code == 1 and "Unsupported model type 'llama'" in output
    assert hub.requests("GET", "/config.json")
    assert not hub.requests("GET", "/pytorch_model.bin") and not hub.requests("HEAD", "/pytorch_model.bin")


def test_failed_upload_keeps_the_folder_and_says_how_to_retry(hub, tmp_path, capsys):
    argv = [
        "--hf-path",
        hf_retrieval_folder(tmp_path / "src"),
        "--mlx-path",
        tmp_path / "out",
        "--hf-endpoint",
        hub.url,
        "--upload-repo",
        f"{USER}/x",
    ]
    code, output = run(argv, capsys)
    assert code == 1 and "was written, but the upload failed: No Hugging Face token found" in output
    assert f"m2bert-mlx upload --path {tmp_path / 'out'} --upload-repo {USER}/x" in output
    assert (tmp_path / "out" / "model.safetensors").is_file()
