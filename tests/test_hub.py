"""Push and pull through the real huggingface_hub client, against the Hub stand-in of hub_server.py on 127.0.0.1."""

import hashlib
import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from hub_server import READ_TOKEN, USER, WRITE_TOKEN
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from transformers import BertTokenizer

from m2bert_hf_mlx import M2BertConfig, M2BertForMaskedLM
from m2bert_hf_mlx.cli import main
from m2bert_hf_mlx.errors import HubError
from m2bert_hf_mlx.hub import upload_model_folder

INPUT_IDS = [[101, 2023, 103, 2003, 1037, 3231, 102, 0]]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]

# Loads a repo in a fresh interpreter, where HF_HUB_OFFLINE (read when huggingface_hub is imported) takes effect.
OFFLINE_LOAD = """
import sys, json
from m2bert_hf_mlx import M2BertForMaskedLM  # first, so that MLX gets the same BLAS as the tests
import mlx.core as mx, numpy as np
from m2bert_hf_mlx.errors import HubError
repo_id, endpoint, cache_dir, input_ids, out = sys.argv[1:]
try:
    model = M2BertForMaskedLM.from_pretrained(repo_id, endpoint=endpoint, cache_dir=cache_dir)
except HubError as e:
    print(e)
    sys.exit(3)
np.save(out, np.array(model(mx.array(json.loads(input_ids))).logits))
"""


def tiny_mlm():
    model = M2BertForMaskedLM(M2BertConfig.from_preset("tiny"))
    model.eval()
    mx.eval(model.parameters())
    return model


def logits(model):
    return np.array(model(mx.array(INPUT_IDS)).logits)


def load_offline(repo_id, endpoint, cache_dir, out):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-c", OFFLINE_LOAD, repo_id, endpoint, str(cache_dir), json.dumps(INPUT_IDS), str(out)]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


def tiny_tokenizer(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return BertTokenizer(vocab=str(tmp_path / "vocab.txt"))


def model_folder(path, config):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(path / "model.safetensors"), {"w": mx.arange(64, dtype=mx.float32)})
    return path


def test_push_pull_round_trip_then_offline(hub, tmp_path):
    repo_id = f"{USER}/m2-bert-tiny-mlx"
    model = tiny_mlm()
    expected = logits(model)
    model.save_pretrained(tmp_path / "local")
    local_weights = (tmp_path / "local" / "model.safetensors").read_bytes()
    tokenizer = tiny_tokenizer(tmp_path)

    info = model.push_to_hub(repo_id, tokenizer=tokenizer, token=WRITE_TOKEN, endpoint=hub.url, commit_message="tiny")

    files = hub.files(repo_id)
    assert {
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "README.md",
    } <= set(files)
    card = files["README.md"].content.decode()
    assert "library_name: mlx" in card and "pipeline_tag: fill-mask" in card and repo_id in card
    assert {r.status for r in hub.requests("POST", "/api/validate-yaml")} == {200}
    assert info.oid == hub.state.repos[repo_id].branches["main"]
    # The weights went through LFS: batch API, a signed PUT whose content the server hashed, then verify.
    weights = files["model.safetensors"]
    assert weights.lfs and not files["config.json"].lfs
    assert weights.content == local_weights and weights.sha256 == hashlib.sha256(local_weights).hexdigest()
    assert [r.status for r in hub.requests("POST", "/info/lfs/objects/batch")] == [200]
    assert [r.status for r in hub.requests("PUT", weights.sha256)] == [200]
    assert [r.status for r in hub.requests("POST", "/info/lfs/objects/verify")] == [200]

    cache = tmp_path / "cache"
    loaded = M2BertForMaskedLM.from_pretrained(repo_id, endpoint=hub.url, cache_dir=cache)
    np.testing.assert_array_equal(logits(loaded), expected)
    assert hub.requests("GET", "/resolve/" + info.oid + "/model.safetensors")
    pulled_tokenizer = BertTokenizer.from_pretrained(loaded.source_folder)
    assert pulled_tokenizer("hello world")["input_ids"] == tokenizer("hello world")["input_ids"] == [2, 5, 6, 3]

    hub.stop()
    result = load_offline(repo_id, hub.url, cache, tmp_path / "offline.npy")
    assert result.returncode == 0, result.stdout + result.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "offline.npy"), expected)


def test_offline_without_cache_is_a_clear_error(tmp_path):
    result = load_offline(f"{USER}/never-seen", "http://127.0.0.1:9", tmp_path / "empty-cache", tmp_path / "out.npy")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "is not in the Hugging Face cache" in result.stdout and "HF_HUB_OFFLINE" in result.stdout


def test_push_of_a_loaded_model_takes_the_tokenizer_files_of_its_folder(hub, tmp_path):
    tiny_mlm().save_pretrained(tmp_path / "model")
    tiny_tokenizer(tmp_path / "model")
    model = M2BertForMaskedLM.from_pretrained(tmp_path / "model")

    model.push_to_hub(f"{USER}/with-vocab", token=WRITE_TOKEN, endpoint=hub.url)
    assert hub.files(f"{USER}/with-vocab")["vocab.txt"].content == (tmp_path / "model" / "vocab.txt").read_bytes()


def test_missing_repo_is_a_clear_error(hub, tmp_path):
    with pytest.raises(HubError, match=f"Repository '{USER}/missing' was not found on {hub.url}"):
        M2BertForMaskedLM.from_pretrained(f"{USER}/missing", endpoint=hub.url, cache_dir=tmp_path / "cache")


def test_unsupported_model_type_fails_before_the_weights_are_fetched(hub, tmp_path):
    repo_id = f"{USER}/not-m2"
    folder = model_folder(tmp_path / "llama", {"model_type": "llama", "hidden_size": 64})
    upload_model_folder(folder, repo_id, token=WRITE_TOKEN, endpoint=hub.url)

    with pytest.raises(ValueError, match="Unsupported model type 'llama'"):
        M2BertForMaskedLM.from_pretrained(repo_id, endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert hub.requests("GET", "/config.json")
    assert not hub.requests("GET", "/model.safetensors") and not hub.requests("HEAD", "/model.safetensors")


@pytest.mark.parametrize(
    "token, message",
    [
        ("hf_not_a_real_token", r"rejected the token \(HTTP 401 Unauthorized"),
        (READ_TOKEN, r"may not write .* \(HTTP 403"),
    ],
)
def test_refused_token_is_a_clear_error(hub, tmp_path, token, message):
    folder = model_folder(tmp_path / "m", {"model_type": "m2_bert"})
    with pytest.raises(HubError, match=message) as excinfo:
        upload_model_folder(folder, f"{USER}/refused", token=token, endpoint=hub.url)
    assert token not in str(excinfo.value)
    assert f"{USER}/refused" not in hub.state.repos


def test_missing_token_is_a_clear_error_before_any_request(hub, tmp_path):
    with pytest.raises(HubError, match="No Hugging Face token found"):
        tiny_mlm().push_to_hub(f"{USER}/no-token", endpoint=hub.url)
    assert hub.requests() == []


def test_unreachable_endpoint_is_a_clear_error(hub, tmp_path):
    folder = model_folder(tmp_path / "m", {"model_type": "m2_bert"})
    url = hub.url
    hub.stop()
    with pytest.raises(HubError, match=f"Cannot reach the Hub at {url}"):
        upload_model_folder(folder, f"{USER}/m", token=WRITE_TOKEN, endpoint=url)


@pytest.mark.parametrize("field", ["sha256", "size"])
def test_lfs_storage_rejects_content_that_does_not_match_its_announcement(hub, field):
    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    repo_id = api.create_repo(f"{USER}/lfs-check").repo_id
    operation = CommitOperationAdd("weights.safetensors", b"weights" * 1000)
    if field == "sha256":
        operation.upload_info.sha256 = hashlib.sha256(b"other content").digest()
    else:
        operation.upload_info.size += 1

    with pytest.raises(RuntimeError, match="Error while uploading 'weights.safetensors'") as excinfo:
        api.preupload_lfs_files(repo_id, additions=[operation])
    assert f"{field} mismatch" in str(excinfo.value.__cause__).lower()
    assert [r.status for r in hub.requests("PUT")] == [400]
    assert hub.state.lfs_objects == {}


def test_revisions_resolve_to_their_own_commits(hub, tmp_path):
    repo_id = f"{USER}/versions"
    folder = model_folder(tmp_path / "m", {"model_type": "m2_bert", "version": 1})
    first = upload_model_folder(folder, repo_id, token=WRITE_TOKEN, endpoint=hub.url)
    (folder / "config.json").write_text(json.dumps({"model_type": "m2_bert", "version": 2}))
    second = upload_model_folder(folder, repo_id, token=WRITE_TOKEN, endpoint=hub.url)
    assert first.oid != second.oid

    def version(revision):
        path = hf_hub_download(repo_id, "config.json", revision=revision, endpoint=hub.url, cache_dir=tmp_path / "c")
        return json.loads(open(path).read())["version"]

    assert (version(first.oid), version(second.oid), version("main")) == (1, 2, 2)


def test_upload_command_end_to_end(hub, tmp_path, monkeypatch, capsys):
    repo_id = f"{USER}/from-cli"
    tiny_mlm().save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "README.md").write_text("---\nlibrary_name: mlx\ntags: [mlx, m2-bert]\n---\n# Tiny\n")
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)

    argv = [
        "upload",
        "--path",
        str(tmp_path / "model"),
        "--upload-repo",
        repo_id,
        "--hf-endpoint",
        hub.url,
        "--private",
        "--revision",
        "dev",
        "--commit-message",
        "from the command line",
    ]
    assert main(argv) == 0

    commit = hub.state.repos[repo_id].branches["dev"]
    assert f"{hub.url}/{repo_id}/commit/{commit}" in capsys.readouterr().out
    repo = hub.state.repos[repo_id]
    assert repo.private and repo.commits[commit].summary == "from the command line"
    assert {"config.json", "model.safetensors", "README.md"} <= set(hub.files(repo_id, "dev"))
    assert "config.json" not in hub.files(repo_id, "main")
    assert {r.status for r in hub.requests("POST", "/api/validate-yaml")} == {200}

    # Private: invisible without the owner's token, loadable with it.
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="was not found"):
        M2BertForMaskedLM.from_pretrained(repo_id, revision="dev", endpoint=hub.url, cache_dir=tmp_path / "c1")
    loaded = M2BertForMaskedLM.from_pretrained(
        repo_id, revision="dev", endpoint=hub.url, cache_dir=tmp_path / "c2", token=WRITE_TOKEN
    )
    assert loaded.source_folder.name == commit


def test_upload_command_reports_a_folder_that_is_not_a_model(hub, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["upload", "--path", str(tmp_path / "empty"), "--upload-repo", f"{USER}/x", "--token", WRITE_TOKEN]
    assert main(argv) == 1
    assert "is not a model folder (no config.json)" in capsys.readouterr().err
    assert hub.requests() == []
