"""The torch-free checkpoint reader and writer: every published format, the unsafe and the damaged files."""

import collections
import json
import pickle
import zipfile

import mlx.core as mx
import numpy as np
import pytest
from checkpoint_files import canonical_state_dict, composer_checkpoint
from conftest import load_fixture
from torch_format import BFloat16, Build, Call, Global, NewObject, save_torch_object, save_torch_state_dict

from m2bert_hf_mlx import M2BertConfig, M2BertForMaskedLM, M2BertModel
from m2bert_hf_mlx.checkpoint_reader import checkpoint_keys, load_state_dict
from m2bert_hf_mlx.errors import CheckpointError, WeightsMismatchError


def assert_same_arrays(got, expected):
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        assert np.array_equal(got[key], value), key


def mixed_state_dict():
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    return {
        "dense": base,
        "transposed": base.T,  # non-contiguous view of the same storage
        "strided": base[1:, ::2],  # offset and steps into it
        "tied": base,  # the same tensor twice, as the tied MLM decoder
        "half": np.linspace(-2, 2, 7, dtype=np.float16),
        "bf16": BFloat16(np.array([[1.0, 3.14159], [-2.5e-3, 65504.0]], np.float32)),
        "position_ids": np.arange(8, dtype=np.int64)[None],
        "int32": np.array([-3, 7], np.int32),
        "flags": np.array([True, False]),
        "empty": np.zeros((0, 5), np.float32),
        "scalar": np.array(2.5, np.float64),
    }


def expected_arrays(state_dict):
    return {k: v.values if isinstance(v, BFloat16) else np.array(v) for k, v in state_dict.items()}


def test_zip_round_trip_keeps_dtypes_views_and_shared_storages(tmp_path):
    state_dict = mixed_state_dict()
    save_torch_state_dict(state_dict, tmp_path / "pytorch_model.bin")
    got = load_state_dict(tmp_path / "pytorch_model.bin")
    assert_same_arrays(got, expected_arrays(state_dict))
    assert got["bf16"].dtype == np.float32  # widened: numpy has no bfloat16
    assert got["bf16"][0, 1] == np.float32(3.140625)  # the bfloat16 value nearest to pi
    assert checkpoint_keys(tmp_path / "pytorch_model.bin") == sorted(state_dict)


def test_torch_reads_the_writers_files(tmp_path):
    torch = pytest.importorskip("torch")
    state_dict = mixed_state_dict()
    save_torch_state_dict(state_dict, tmp_path / "model.bin")
    loaded = torch.load(tmp_path / "model.bin", weights_only=True)
    assert isinstance(loaded, collections.OrderedDict)
    assert loaded["bf16"].dtype == torch.bfloat16 and loaded["half"].dtype == torch.float16
    assert_same_arrays(
        {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in loaded.items()},
        expected_arrays(state_dict),
    )
    # Views keep sharing one storage, with torch's strides.
    assert loaded["transposed"].stride() == (1, 6)
    assert loaded["strided"].storage_offset() == 6 and loaded["strided"].stride() == (6, 2)
    assert loaded["tied"].untyped_storage().data_ptr() == loaded["dense"].untyped_storage().data_ptr()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reader_matches_torch_load_on_files_torch_wrote(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(0)
    words = torch.randn(16, 8, generator=generator)
    state_dict = collections.OrderedDict(
        [
            ("bert.embeddings.word_embeddings.weight", words),
            ("cls.predictions.decoder.weight", words),  # tied: one storage
            ("bert.embeddings.position_ids", torch.arange(12).expand(1, -1)),
            ("gated", torch.randn(4, 6, 3, generator=generator).transpose(1, 2)),  # non-contiguous
            ("bf16", torch.randn(5, 3, generator=generator).to(torch.bfloat16)),
            ("half", torch.randn(7, generator=generator).half()),
            ("slice", words[3:9, 2:]),
            ("param", torch.nn.Parameter(torch.randn(3, generator=generator))),
        ]
    )
    path = tmp_path / ("model.pt" if zip_format else "legacy.pt")
    torch.save(state_dict, path, _use_new_zipfile_serialization=zip_format)
    reference = torch.load(path, weights_only=True)
    got = load_state_dict(path)
    assert_same_arrays(
        got, {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().numpy() for k, v in reference.items()}
    )


def test_safetensors_with_bfloat16(tmp_path):
    arrays = {
        "a": mx.random.normal((3, 4)).astype(mx.bfloat16),
        "b": mx.arange(6, dtype=mx.int64).reshape(2, 3),
        "c": mx.random.normal((5,)).astype(mx.float16),
    }
    mx.save_safetensors(str(tmp_path / "model.safetensors"), arrays, metadata={"format": "mlx"})
    got = load_state_dict(tmp_path / "model.safetensors")
    assert_same_arrays(
        got, {"a": np.array(arrays["a"].astype(mx.float32)), "b": np.array(arrays["b"]), "c": np.array(arrays["c"])}
    )


def test_composer_checkpoint_yields_the_model_weights(tmp_path):
    _, state_dict = canonical_state_dict("mlm_hta1")
    save_torch_object(composer_checkpoint(state_dict), tmp_path / "model.pt")
    assert_same_arrays(load_state_dict(tmp_path / "model.pt"), {f"model.{k}": v for k, v in state_dict.items()})


def test_torch_weights_only_refuses_composer_checkpoints(tmp_path):
    """Why this reader exists: torch's safe mode cannot open the published Composer files."""
    torch = pytest.importorskip("torch")
    _, state_dict = canonical_state_dict("mlm_hta0")
    save_torch_object(composer_checkpoint(state_dict), tmp_path / "model.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "model.pt", weights_only=True)


def test_ddp_module_prefix_is_removed_by_sanitize(tmp_path):
    config, state_dict = canonical_state_dict("retrieval")
    save_torch_state_dict({f"module.{k}": v for k, v in state_dict.items()}, tmp_path / "ddp.pt")
    assert_same_arrays(load_state_dict(tmp_path / "ddp.pt"), {f"module.{k}": v for k, v in state_dict.items()})
    model = M2BertModel(M2BertConfig.from_upstream_dict(config, add_pooling_layer=True))
    weights = model.sanitize({k: mx.array(v) for k, v in load_state_dict(tmp_path / "ddp.pt").items()})
    assert "embeddings.word_embeddings.weight" in weights and not any(k.startswith("module.") for k in weights)


def test_prefix_collisions_are_reported(tmp_path):
    model = M2BertModel(M2BertConfig.from_preset("tiny"))
    with pytest.raises(WeightsMismatchError, match="both name the weight 'pooler.dense.bias'"):
        model.sanitize({"module.pooler.dense.bias": mx.zeros(64), "pooler.dense.bias": mx.ones(64)})


# ---------------------------------------------------------------------------------------------------------------
# Files that ask to run code


class _OsSystem:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


@pytest.mark.parametrize(
    "kind", ["zip-os.system", "plain-pickle", "eval", "nested-in-composer", "nested-torch-load", "getattr"]
)
def test_pickles_that_ask_to_run_code_are_refused_and_nothing_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    path = tmp_path / "evil.bin"
    if kind == "plain-pickle":
        path.write_bytes(pickle.dumps({"w": _OsSystem(command)}, protocol=2))
        name = "posix.system"
    else:
        payload, name = {
            "zip-os.system": (Call(Global("os", "system"), (command,)), "os.system"),
            "eval": (Call(Global("builtins", "eval"), (f"__import__('os').system('{command}')",)), "builtins.eval"),
            "nested-in-composer": (None, "subprocess.check_call"),
            "nested-torch-load": (
                Call(Global("torch.storage", "_load_from_bytes"), (b"\x80\x02N.",)),
                "torch.storage._load_from_bytes",
            ),
            "getattr": (
                Call(Call(Global("builtins", "getattr"), (Global("os", "path"), "exists")), ("/",)),
                "builtins.getattr",
            ),
        }[kind]
        if kind == "nested-in-composer":
            _, state_dict = canonical_state_dict("retrieval")
            evil = Call(Global("subprocess", "check_call"), (["touch", str(marker)],))
            save_torch_object(composer_checkpoint(state_dict, extra_state={"callbacks": {"Evil": evil}}), path)
        else:
            save_torch_object({"weight": np.zeros(2, np.float32), "extra": payload}, path)
    with pytest.raises(CheckpointError, match=f"asks to call {name}.*nothing from the file was run"):
        load_state_dict(path)
    with pytest.raises(CheckpointError, match="Refused"):
        checkpoint_keys(path)
    assert not marker.exists()


def test_pickles_cannot_modify_the_readers_functions_or_classes(tmp_path, valid_bin):
    for target in (
        Global("torch._utils", "_rebuild_tensor_v2"),
        Global("collections", "OrderedDict"),
        Global("x", "Y"),
    ):
        save_torch_object(
            {"w": np.zeros(2, np.float32), "x": Build(target, {"__call__": None, "qualname": "os.system"})},
            tmp_path / "p.bin",
        )
        with pytest.raises(CheckpointError, match="cannot be read as a checkpoint"):
            load_state_dict(tmp_path / "p.bin")
    assert sorted(load_state_dict(valid_bin)) == ["b", "w"]


def test_objects_of_unknown_classes_are_inert_and_not_a_state_dict(tmp_path):
    whole_model = Build(NewObject(Global("src.bert_layers", "BertForMaskedLM")), {"training": False, "_modules": {}})
    save_torch_object(whole_model, tmp_path / "model.pt")
    with pytest.raises(
        CheckpointError, match=r"src\.bert_layers\.BertForMaskedLM instead of a state dict.*model\.state_dict\(\)"
    ):
        load_state_dict(tmp_path / "model.pt")


def test_dict_without_tensors_is_not_a_state_dict(tmp_path):
    save_torch_object({"epoch": 3, "state_dict": {"w": np.zeros(2, np.float32)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="entries 'epoch', 'state_dict' are not named tensors"):
        load_state_dict(tmp_path / "other.pt")


# ---------------------------------------------------------------------------------------------------------------
# Damaged files


def rewrite_zip(source, target, edit):
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            data = edit(info.filename, src.read(info.filename))
            if data is not None:
                dst.writestr(info.filename, data)


@pytest.fixture
def valid_bin(tmp_path):
    path = tmp_path / "valid.bin"
    save_torch_state_dict({"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float32)}, path)
    return path


def test_truncated_zip(tmp_path, valid_bin):
    data = valid_bin.read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.bin is truncated or corrupt.*Download it again"):
        load_state_dict(tmp_path / "cut.bin")


def test_flipped_bytes_fail_the_zip_checksum(tmp_path, valid_bin):
    data = bytearray(valid_bin.read_bytes())
    start = data.index(bytes(np.arange(12, dtype=np.float32)[1:3].tobytes()))
    data[start] ^= 0xFF
    (tmp_path / "flipped.bin").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="flipped.bin is truncated or corrupt"):
        load_state_dict(tmp_path / "flipped.bin")


def test_missing_and_short_storage_records(tmp_path, valid_bin):
    rewrite_zip(valid_bin, tmp_path / "missing.bin", lambda name, data: None if name.endswith("data/0") else data)
    # Listing names reads no tensor data, so it still works; loading says what is missing.
    assert checkpoint_keys(tmp_path / "missing.bin") == ["b", "w"]
    with pytest.raises(CheckpointError, match="storage record 'archive/data/0' is missing"):
        load_state_dict(tmp_path / "missing.bin")
    rewrite_zip(valid_bin, tmp_path / "short.bin", lambda name, data: data[:20] if name.endswith("data/0") else data)
    with pytest.raises(CheckpointError, match="storage 0 holds 5 elements but its tensors need 12"):
        load_state_dict(tmp_path / "short.bin")


def test_tensor_reaching_outside_its_storage_is_rejected(tmp_path, valid_bin):
    shape_3_4 = b"(J\x03\x00\x00\x00J\x04\x00\x00\x00t"
    shape_3_40 = b"(J\x03\x00\x00\x00J\x28\x00\x00\x00t"
    rewrite_zip(
        valid_bin,
        tmp_path / "big.bin",
        lambda name, data: data.replace(shape_3_4, shape_3_40) if name.endswith("data.pkl") else data,
    )
    with pytest.raises(CheckpointError, match=r"tensor of shape \(3, 40\) has more elements than its storage of 12"):
        load_state_dict(tmp_path / "big.bin")


def test_truncated_legacy_file(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.ones(100)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    data = (tmp_path / "legacy.pt").read_bytes()
    (tmp_path / "legacy.pt").write_bytes(data[:-50])
    with pytest.raises(CheckpointError, match="legacy.pt"):
        load_state_dict(tmp_path / "legacy.pt")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "the file is empty"),
        (b"this is not a checkpoint at all", "not a checkpoint this package reads"),
        (b"\x1f\x8b\x08\x00" + bytes(20), "gzip-compressed"),
        (b"\x80\x02}q\x00(X\x01\x00", "pickle is damaged"),
    ],
)
def test_unreadable_files(tmp_path, content, message):
    (tmp_path / "bad.bin").write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_state_dict(tmp_path / "bad.bin")


def test_truncated_safetensors(tmp_path):
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {"a": mx.ones((64, 64))})
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="tensor 'a' does not fit the file"):
        load_state_dict(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match="unreadable header"):
        load_state_dict(tmp_path / "model.safetensors")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict(tmp_path / "nope.bin")


# ---------------------------------------------------------------------------------------------------------------
# from_pretrained reads every format through load_state_dict


def fixture_outputs(model, data):
    prefix = "input/L32/" if "input/L32/input_ids" in data.files else "input/"
    inputs = {
        name: mx.array(data[prefix + name])
        for name in ("input_ids", "token_type_ids", "attention_mask")
        if prefix + name in data.files
    }
    return model(**inputs)


def test_from_pretrained_reads_an_hf_style_bin_folder(tmp_path):
    config, state_dict = canonical_state_dict("retrieval")
    folder = tmp_path / "m2-bert-retrieval"
    folder.mkdir()
    config_json = {
        **config,
        "model_type": "bert",
        "auto_map": {"AutoModel": "bert_layers.BertModel"},
        "architectures": ["BertForTextEncoding"],
    }
    (folder / "config.json").write_text(json.dumps(config_json))
    save_torch_state_dict(
        {k: BFloat16(v) if k.endswith("pooler.dense.bias") else v for k, v in state_dict.items()},
        folder / "pytorch_model.bin",
    )
    model = M2BertModel.from_pretrained(folder)
    _, _, data = load_fixture("retrieval")
    out = fixture_outputs(model, data)
    np.testing.assert_allclose(np.array(out.last_hidden_state), data["expected/sequence_output"], atol=1e-4)
    # The pooler bias went through bfloat16, so the pooled output matches to bfloat16 precision.
    np.testing.assert_allclose(np.array(out.pooler_output), data["expected/pooled_output"], atol=1e-2)


def test_from_pretrained_reads_a_composer_file_given_a_config(tmp_path):
    config, state_dict = canonical_state_dict("mlm_hta1")
    save_torch_object(composer_checkpoint(state_dict), tmp_path / "model.pt")
    with pytest.raises(ValueError, match="has no config.json"):
        M2BertForMaskedLM.from_pretrained(tmp_path / "model.pt")
    model = M2BertForMaskedLM.from_pretrained(tmp_path / "model.pt", config=M2BertConfig.from_upstream_dict(config))
    _, _, data = load_fixture("mlm_hta1")
    np.testing.assert_allclose(
        np.array(fixture_outputs(model, data).logits), data["expected/L32/mlm_logits"], atol=1e-4
    )
