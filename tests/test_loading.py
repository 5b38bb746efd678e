import json
import re

import mlx.core as mx
import numpy as np
import pytest
from conftest import load_fixture
from mlx.utils import tree_flatten
from safetensors.numpy import save_file

from m2bert_hf_mlx import M2BertConfig, M2BertForMaskedLM, M2BertForSequenceClassification, M2BertModel
from m2bert_hf_mlx.errors import CheckpointError, ConfigError, HubError, WeightsMismatchError

TOL = 2e-5


def rel_err(got, expected):
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.abs(np.asarray(got, dtype=np.float64) - expected).max() / np.abs(expected).max())


def write_upstream_folder(path, name, *, drop_shared=True, prefix="", extra_config=None):
    """A folder as an upstream safetensors export has it: canonical names and layouts, shared tensors dropped."""
    config, params, data = load_fixture(name)
    params = dict(params)
    if drop_shared:
        params.pop("cls.predictions.decoder.weight", None)
        for k in [k for k in params if k.endswith("freq") and ".implicit_filter.1." not in k]:
            del params[k]
    path.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: np.ascontiguousarray(v) for k, v in params.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({**config, **(extra_config or {})}))
    return data


def mlm_logits(model, data, L="L32"):
    return model(mx.array(data[f"input/{L}/input_ids"]), mx.array(data[f"input/{L}/token_type_ids"])).logits


def test_upstream_safetensors_export_loads_with_parity(tmp_path):
    data = write_upstream_folder(tmp_path, "mlm_hta1")
    model = M2BertForMaskedLM.from_pretrained(tmp_path)
    assert model.config.hyena_training_additions and not model.config.add_pooling_layer
    assert rel_err(mlm_logits(model, data), data["expected/L32/mlm_logits"]) <= TOL
    assert rel_err(mlm_logits(model, data, "L24"), data["expected/L24/mlm_logits"]) <= TOL


def test_retrieval_checkpoint_gets_its_pooler_from_the_weights(tmp_path):
    data = write_upstream_folder(tmp_path, "retrieval")
    model = M2BertModel.from_pretrained(tmp_path)
    assert model.config.add_pooling_layer
    out = model(mx.array(data["input/input_ids"]))
    assert rel_err(out.pooler_output, data["expected/pooled_output"]) <= TOL


def test_classifier_of_a_retrieval_checkpoint_is_reported_not_silently_dropped(tmp_path, caplog):
    write_upstream_folder(tmp_path, "retrieval")
    M2BertModel.from_pretrained(tmp_path)
    assert "classifier.bias, classifier.weight" in caplog.text
    clf = M2BertForSequenceClassification.from_pretrained(tmp_path)
    _, params, _ = load_fixture("retrieval")
    assert np.array_equal(np.array(clf.classifier.weight), params["classifier.weight"])


@pytest.mark.parametrize("prefix", ["model.", "module."])
def test_training_prefixes_are_stripped(tmp_path, prefix):
    data = write_upstream_folder(tmp_path, "mlm_hta0", drop_shared=False, prefix=prefix)
    model = M2BertForMaskedLM.from_pretrained(tmp_path)
    assert rel_err(mlm_logits(model, data), data["expected/L32/mlm_logits"]) <= TOL


def test_save_and_reload_is_bit_identical(tmp_path):
    write_upstream_folder(tmp_path / "src", "mlm_hta0")
    model = M2BertForMaskedLM.from_pretrained(tmp_path / "src")
    model.save_pretrained(tmp_path / "mlx")
    saved = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert saved["model_type"] == "m2_bert" and saved["architectures"] == ["M2BertForMaskedLM"]
    assert saved["dtype"] == "float32" and "auto_map" not in saved
    _, metadata = mx.load(str(tmp_path / "mlx" / "model.safetensors"), return_metadata=True)
    assert metadata == {"format": "mlx"}
    index = json.loads((tmp_path / "mlx" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_parameters"] == model.num_parameters()
    reloaded = M2BertForMaskedLM.from_pretrained(tmp_path / "mlx")
    a, b = dict(tree_flatten(model.parameters())), dict(tree_flatten(reloaded.parameters()))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)
    assert "cls.predictions.decoder.weight" not in mx.load(str(tmp_path / "mlx" / "model.safetensors"))


def test_sanitize_is_idempotent():
    _, params, _ = load_fixture("mlm_hta1")
    model = M2BertForMaskedLM(M2BertConfig.from_upstream_dict(load_fixture("mlm_hta1")[0]))
    once = model.sanitize({k: mx.array(v) for k, v in params.items()})
    twice = model.sanitize(once)
    assert once.keys() == twice.keys() and all(mx.array_equal(once[k], twice[k]) for k in once)
    assert set(once) == set(dict(tree_flatten(model.parameters())))


def test_sharded_save(tmp_path):
    model = M2BertForMaskedLM(M2BertConfig.from_preset("tiny"))
    model.save_pretrained(tmp_path, max_shard_size=2_000_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    reloaded = M2BertForMaskedLM.from_pretrained(tmp_path)
    ids = mx.array([[101, 2023, 102]])
    model.eval()
    assert mx.array_equal(model(ids).logits, reloaded(ids).logits)


@pytest.mark.parametrize("dtype,tol", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_low_precision_loading_stays_close(tmp_path, dtype, tol):
    data = write_upstream_folder(tmp_path, "mlm_hta0")
    model = M2BertForMaskedLM.from_pretrained(tmp_path, dtype=dtype)
    assert model.dtype == getattr(mx, dtype)
    assert model.bert.encoder.layer[0].attention.filter_fn.pos_emb.t.dtype == mx.float32
    assert rel_err(mlm_logits(model, data).astype(mx.float32), data["expected/L32/mlm_logits"]) <= tol
    model.save_pretrained(tmp_path / "low")
    assert json.loads((tmp_path / "low" / "config.json").read_text())["dtype"] == dtype
    assert M2BertForMaskedLM.from_pretrained(tmp_path / "low").dtype == getattr(mx, dtype)


def test_missing_unexpected_and_mismatched_weights_are_named(tmp_path):
    config, params, _ = load_fixture("mlm_hta0")
    params = dict(params)
    del params["bert.encoder.layer.1.mlp.wo.bias"]
    params["bert.encoder.layer.0.attention.extra.weight"] = np.zeros(3, np.float32)
    params["cls.predictions.transform.dense.bias"] = np.zeros(5, np.float32)
    tmp_path.mkdir(exist_ok=True)
    save_file(params, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsMismatchError) as e:
        M2BertForMaskedLM.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "bert.encoder.layer.1.mlp.wo.bias" in msg
    assert "bert.encoder.layer.0.attention.extra.weight" in msg
    assert "cls.predictions.transform.dense.bias: checkpoint (5,) vs model (64,)" in msg


def test_non_strict_loading_reports_and_keeps_initial_values(tmp_path, caplog):
    config, params, _ = load_fixture("mlm_hta0")
    params = {k: v for k, v in params.items() if k != "bert.encoder.layer.1.mlp.wo.bias"}
    save_file(params, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = M2BertForMaskedLM.from_pretrained(tmp_path, strict=False)
    assert "bert.encoder.layer.1.mlp.wo.bias" in caplog.text
    assert model.bert.encoder.layer[1].mlp.wo.bias.shape == (64,)


def test_legacy_checkpoint_with_the_wrong_config_fails_loudly(tmp_path):
    write_upstream_folder(tmp_path, "mlm_hta1", extra_config={"hyena_training_additions": False})
    with pytest.raises(WeightsMismatchError, match="attention.layernorm.weight"):
        M2BertForMaskedLM.from_pretrained(tmp_path)


def test_inconsistent_shared_tensors_are_refused():
    config, params, _ = load_fixture("mlm_hta0")
    model = M2BertForMaskedLM(M2BertConfig.from_upstream_dict(config))
    weights = {k: mx.array(v) for k, v in params.items()}
    bad = dict(weights)
    bad["bert.encoder.layer.0.attention.filter_fn.implicit_filter_rev.3.freq"] = (
        bad["bert.encoder.layer.0.attention.filter_fn.implicit_filter_rev.3.freq"] + 1
    )
    with pytest.raises(WeightsMismatchError, match="shares one Sin.freq"):
        model.sanitize(bad)
    bad = dict(weights)
    bad["cls.predictions.decoder.weight"] = bad["cls.predictions.decoder.weight"] * 2
    with pytest.raises(WeightsMismatchError, match="ties the MLM decoder"):
        model.sanitize(bad)
    bad = dict(weights)
    bad["bert.embeddings.position_ids"] = bad["bert.embeddings.position_ids"][:, ::-1]
    with pytest.raises(WeightsMismatchError, match="not arange"):
        model.sanitize(bad)


def test_a_composer_folder_needs_a_config(tmp_path):
    write_upstream_folder(tmp_path, "mlm_hta0")
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json.*preset"):
        M2BertForMaskedLM.from_pretrained(tmp_path)
    config, _, data = load_fixture("mlm_hta0")
    (tmp_path.parent / "fixture_config.json").write_text(json.dumps(config))
    model = M2BertForMaskedLM.from_pretrained(tmp_path, config=str(tmp_path.parent / "fixture_config.json"))
    assert rel_err(mlm_logits(model, data), data["expected/L32/mlm_logits"]) <= TOL
    model = M2BertForMaskedLM.from_pretrained(
        tmp_path / "model.safetensors", config=M2BertConfig.from_upstream_dict(config)
    )
    assert rel_err(mlm_logits(model, data), data["expected/L32/mlm_logits"]) <= TOL


def test_unsupported_model_type_is_refused_before_reading_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(b"not read")
    with pytest.raises(ValueError, match="Unsupported model type 'llama'"):
        M2BertModel.from_pretrained(tmp_path)


def test_corrupt_and_missing_weights_are_clear_errors(tmp_path):
    M2BertConfig.from_preset("tiny").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="No weights found"):
        M2BertModel.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="cannot be read as a checkpoint.*Download or export it again"):
        M2BertModel.from_pretrained(tmp_path)


def test_bad_config_argument_and_dtype_are_clear_errors(tmp_path):
    write_upstream_folder(tmp_path, "mlm_hta0")
    with pytest.raises(
        ConfigError, match="not an M2BertConfig, a dict, a JSON file or a preset name; give one of those"
    ):
        M2BertForMaskedLM.from_pretrained(tmp_path, config="no-such-preset")
    with pytest.raises(ConfigError, match="preset name; did you mean 'm2-bert-80m'\\? give one of those \\(presets: "):
        M2BertForMaskedLM.from_pretrained(tmp_path, config="m2-bert-80M")
    missing = tmp_path / "missing.json"
    with pytest.raises(ConfigError, match=f"^config={re.escape(repr(str(missing)))} is not an M2BertConfig"):
        M2BertForMaskedLM.from_pretrained(tmp_path, config=missing)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ConfigError, match=f"^config={re.escape(repr(str(broken)))}: .+ is not a readable JSON config"):
        M2BertForMaskedLM.from_pretrained(tmp_path, config=broken)
    with pytest.raises(ValueError, match="dtype='int8' is not supported"):
        M2BertForMaskedLM.from_pretrained(tmp_path, dtype="int8")


def test_a_missing_repo_offline_is_a_clear_error(tmp_path):
    with pytest.raises(HubError, match="not in the Hugging Face cache"):
        M2BertModel.from_pretrained("nobody/no-such-m2-model", cache_dir=tmp_path, local_files_only=True)
