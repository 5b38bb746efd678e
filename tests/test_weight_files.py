"""The LoCoV1 encoders' layouts: several weight files in one repository, chosen by name, never guessed."""

import json

import mlx.core as mx
import numpy as np
import pytest
from checkpoint_files import canonical_state_dict, composer_checkpoint
from conftest import load_fixture
from hub_server import USER, WRITE_TOKEN
from huggingface_hub import HfApi, scan_cache_dir
from safetensors.numpy import save_file
from torch_format import save_torch_object, save_torch_state_dict

from m2bert_hf_mlx import M2BertConfig, M2BertModel
from m2bert_hf_mlx.cli import main
from m2bert_hf_mlx.errors import CheckpointError, HubError
from m2bert_hf_mlx.weight_files import format_size

POOLER_BIAS = "bert.pooler.dense.bias"
# The weight files of a LoCoV1 encoder repository, one of each format, each with its own shift of the pooler's bias
# so that the outputs tell which file was read.
LOCOV1_FILES = {
    "pytorch_model.bin": 0.0,
    "pytorch_model_V1.bin": 0.1,
    "checkpoints_bert_LoCoV1_M2-BERT-2k_Retrieval_Encoder_ep1-ba1000_checkpoint.pt": 0.2,
    "M2-BERT-2k-Retrieval-Encoder-V1_LoCoV1_trained_weights.safetensors": 0.3,
}


def write_weights(path, shift):
    _, state_dict = canonical_state_dict("retrieval")
    state_dict = dict(state_dict, **{POOLER_BIAS: state_dict[POOLER_BIAS] + np.float32(shift)})
    if path.suffix == ".safetensors":
        save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path))
    elif path.suffix == ".pt":
        save_torch_object(composer_checkpoint(state_dict), path)
    else:
        save_torch_state_dict(state_dict, path)


def locov1_folder(path, files=LOCOV1_FILES):
    """A folder laid out like hazyresearch/M2-BERT-*-Retrieval-Encoder-V1: a remote-code config.json and several
    weight files side by side."""
    config, _ = canonical_state_dict("retrieval")
    path.mkdir(parents=True, exist_ok=True)
    config = {**config, "model_type": "bert", "auto_map": {"AutoModel": "bert_layers.BertModel"}}
    (path / "config.json").write_text(json.dumps(config))
    # The fixtures' vocabulary has 120 rows, so their tokenizer has 120 tokens too.
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(115)]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    for name, shift in files.items():
        write_weights(path / name, shift)
    return path


def expected_pooled(shift):
    """The canonical pooled output `tanh(dense(h0))` with the dense bias shifted by `shift`."""
    _, _, data = load_fixture("retrieval")
    return np.tanh(np.arctanh(data["expected/pooled_output"].astype(np.float64)) + shift)


def pooled(model):
    _, _, data = load_fixture("retrieval")
    return np.array(model(mx.array(data["input/input_ids"])).pooler_output)


def test_locov1_presets_are_the_80m_retrieval_architecture():
    lengths = {"128": 128, "2k": 2048, "8k": 8192, "32k": 32768}
    for name, length in lengths.items():
        config = M2BertConfig.from_preset(f"m2-bert-{name}-retrieval-encoder-v1")
        same = M2BertConfig.from_preset(
            "m2-bert-80m-2k-retrieval", max_position_embeddings=length, long_conv_l_max=length
        )
        assert config.to_dict() == same.to_dict()
        assert config.max_sequence_length == length and config.add_pooling_layer and not config.hyena_training_additions
    # The canonical counts of the 2k and 8k retrieval models (architecture doc 1.2) change by 888 parameters per
    # position (768 position-embedding values and 5 z features in each of the 24 filters): 128 tokens give 80,235,264.
    counts = {"2k": 81_940_224, "8k": 87_396_096, "32k": 109_219_584, "128": 81_940_224 - (2048 - 128) * 888}
    for name, count in counts.items():
        with_pooler = M2BertModel(M2BertConfig.from_preset(f"m2-bert-{name}-retrieval-encoder-v1"))
        assert with_pooler.num_parameters() == count, name


def test_several_weight_files_need_a_choice_and_the_error_lists_them_with_sizes(tmp_path):
    folder = locov1_folder(tmp_path / "encoder")
    with pytest.raises(CheckpointError) as error:
        M2BertModel.from_pretrained(folder)
    message = str(error.value)
    assert "holds several weight files" in message and "weights='NAME'" in message and "\n" not in message
    for name in LOCOV1_FILES:
        assert f"{name} ({format_size((folder / name).stat().st_size)})" in message
    with pytest.raises(
        CheckpointError,
        match="weights=.model.safetensors. is not a weight file of .*; it holds: .*pytorch_model_V1.bin",
    ):
        M2BertModel.from_pretrained(folder, weights="model.safetensors")


@pytest.mark.parametrize("name", list(LOCOV1_FILES))
def test_each_weight_file_of_a_folder_loads_by_name(tmp_path, name):
    folder = locov1_folder(tmp_path / "encoder")
    model = M2BertModel.from_pretrained(folder, weights=name)
    np.testing.assert_allclose(pooled(model), expected_pooled(LOCOV1_FILES[name]), atol=1e-4)


def test_standard_names_alone_load_without_asking(tmp_path):
    # The same model as safetensors and as a pickle (and training state, which holds no weights): safetensors is read.
    folder = locov1_folder(tmp_path / "standard", {"pytorch_model.bin": 0.5, "model.safetensors": 0.25})
    (folder / "training_args.bin").write_bytes(b"not weights")
    save_file({"step": np.zeros(1, np.float32)}, str(folder / "optimizer.safetensors"))  # this package's trainer
    np.testing.assert_allclose(pooled(M2BertModel.from_pretrained(folder)), expected_pooled(0.25), atol=1e-4)
    np.testing.assert_allclose(
        pooled(M2BertModel.from_pretrained(folder, weights="pytorch_model.bin")), expected_pooled(0.5), atol=1e-4
    )
    # One file of any name is no guess either.
    single = locov1_folder(tmp_path / "single", {"checkpoints_bert_LoCoV1_checkpoint.pt": 0.2})
    np.testing.assert_allclose(pooled(M2BertModel.from_pretrained(single)), expected_pooled(0.2), atol=1e-4)


def test_a_saved_mlx_folder_chosen_by_its_index(tmp_path):
    folder = locov1_folder(tmp_path / "encoder")
    model = M2BertModel.from_pretrained(folder, weights="pytorch_model_V1.bin")
    model.save_pretrained(tmp_path / "mlx")
    # The MLX folder's model.safetensors and its index are one candidate, chosen by either name.
    for weights in (None, "model.safetensors", "model.safetensors.index.json"):
        reloaded = M2BertModel.from_pretrained(tmp_path / "mlx", weights=weights)
        np.testing.assert_array_equal(pooled(reloaded), pooled(model))


def test_hub_repo_config_first_then_only_the_chosen_file(hub, tmp_path):
    repo_id = f"{USER}/M2-BERT-2k-Retrieval-Encoder-V1"
    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=locov1_folder(tmp_path / "upload"))

    with pytest.raises(CheckpointError, match="holds several weight files: .*pytorch_model_V1.bin"):
        M2BertModel.from_pretrained(repo_id, endpoint=hub.url, cache_dir=tmp_path / "cache")
    downloads = [r.path.rsplit("/", 1)[1] for r in hub.requests("GET") if "/resolve/" in r.path]
    assert downloads == ["config.json"]  # the config was fetched and checked, no weight file downloaded

    for name, shift in LOCOV1_FILES.items():
        before = len(hub.requests())
        cache = tmp_path / f"cache-{shift}"
        model = M2BertModel.from_pretrained(repo_id, weights=name, endpoint=hub.url, cache_dir=cache)
        np.testing.assert_allclose(pooled(model), expected_pooled(shift), atol=1e-4)
        downloads = [
            r.path.rsplit("/", 1)[1] for r in hub.requests()[before:] if r.method == "GET" and "/resolve/" in r.path
        ]
        assert downloads[0] == "config.json" and [d for d in downloads if d in LOCOV1_FILES] == [name], downloads


def test_convert_takes_weights(tmp_path, capsys):
    folder = locov1_folder(tmp_path / "encoder")
    code = main(["convert", "--hf-path", str(folder), "--mlx-path", str(tmp_path / "out")])
    assert code == 1 and "holds several weight files" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    name = "M2-BERT-2k-Retrieval-Encoder-V1_LoCoV1_trained_weights.safetensors"
    code = main(["convert", "--hf-path", str(folder), "--mlx-path", str(tmp_path / "out"), "--weights", name])
    assert code == 0, capsys.readouterr().err
    np.testing.assert_allclose(pooled(M2BertModel.from_pretrained(tmp_path / "out")), expected_pooled(0.3), atol=1e-4)


def test_commands_take_weights(tmp_path, capsys):
    folder = locov1_folder(tmp_path / "encoder")
    assert main(["info", "--model", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds several weight files" in err and "--weights NAME" in err
    assert main(["info", "--model", str(folder), "--weights", "pytorch_model_V1.bin"]) == 0
    assert "M2BertModel" in capsys.readouterr().out
    assert main(["embed", "--model", str(folder), "--weights", "pytorch_model_V1.bin", "w1 w2"]) == 0
    printed = np.array(capsys.readouterr().out.split(), dtype=np.float32)
    expected = M2BertModel.from_pretrained(folder, weights="pytorch_model_V1.bin").encode("w1 w2")
    np.testing.assert_allclose(printed, expected, rtol=1e-6)


def test_offline_chooses_among_the_repo_files_not_the_cached_ones(hub, tmp_path):
    repo_id = f"{USER}/M2-BERT-2k-Retrieval-Encoder-V1"
    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=locov1_folder(tmp_path / "upload"))
    cache = tmp_path / "cache"
    M2BertModel.from_pretrained(repo_id, weights="pytorch_model_V1.bin", endpoint=hub.url, cache_dir=cache)
    assert not scan_cache_dir(cache).warnings  # the recorded listing leaves huggingface_hub's cache valid

    offline = dict(endpoint=hub.url, cache_dir=cache, local_files_only=True)
    # The cache holds one weight file, the repo four: offline as online, the load asks which.
    with pytest.raises(CheckpointError, match="holds several weight files: .*_checkpoint.pt .*weights='NAME'"):
        M2BertModel.from_pretrained(repo_id, **offline)
    with pytest.raises(
        CheckpointError, match="weights='model.safetensors' is not a weight file of .*; it holds: .*.pt"
    ):
        M2BertModel.from_pretrained(repo_id, weights="model.safetensors", **offline)
    with pytest.raises(HubError, match="'pytorch_model.bin' are not in the Hugging Face cache"):
        M2BertModel.from_pretrained(repo_id, weights="pytorch_model.bin", **offline)
    model = M2BertModel.from_pretrained(repo_id, weights="pytorch_model_V1.bin", **offline)
    np.testing.assert_allclose(pooled(model), expected_pooled(0.1), atol=1e-4)

    # A cache that records no listing (written before it was recorded) loads offline only a cached file named.
    for listing in cache.rglob("m2bert-hf-mlx-listings/*.json"):
        listing.unlink()
    with pytest.raises(HubError, match="^Offline, which weight files .* is unknown .*pass weights='NAME'"):
        M2BertModel.from_pretrained(repo_id, **offline)
    with pytest.raises(
        CheckpointError, match="is not a weight file of the cached copy of .*; it holds: pytorch_model_V1"
    ):
        M2BertModel.from_pretrained(repo_id, weights="pytorch_model.bin", **offline)
    model = M2BertModel.from_pretrained(repo_id, weights="pytorch_model_V1.bin", **offline)
    np.testing.assert_allclose(pooled(model), expected_pooled(0.1), atol=1e-4)
