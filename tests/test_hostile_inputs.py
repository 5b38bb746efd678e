"""Hostile configs, ids and weight indexes (issue 17): each case is a one-line typed error raised before anything is
allocated or read, and random configs and indexes (property-based) either load or raise this package's error."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from bounds import within
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import save_file

from m2bert_hf_mlx import M2BertConfig, M2BertForMaskedLM, M2BertModel
from m2bert_hf_mlx.configuration_m2_bert import PRESETS, validate_config
from m2bert_hf_mlx.errors import CheckpointError, ConfigError, InputError, TokenizerError, WeightsMismatchError
from m2bert_hf_mlx.tokenization import check_tokenizer_fits, load_tokenizer
from m2bert_hf_mlx.weight_files import local_weight_files

TINY = dict(M2BertConfig.from_preset("tiny").to_dict(), vocab_size=120)


def config_error(fields):
    with within(seconds=5, megabytes=256), pytest.raises(ConfigError) as e:
        M2BertConfig.from_upstream_dict({**TINY, **fields})
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"pad_token_id": 1_000_000_000}, "pad_token_id must be null or a token id from 0 to vocab_size - 1 = 119"),
        ({"pad_token_id": 5000}, "got 5000"),
        ({"pad_token_id": -1}, "got -1"),
        ({"pad_token_id": True}, "got True"),
        ({"bos_token_id": 120}, "bos_token_id must be"),
        ({"num_hidden_layers": 1_000_000}, "num_hidden_layers must be an integer from 1 to 1024, got 1000000"),
        ({"long_conv_l_max": 10**9}, "long_conv_l_max must be an integer"),
        ({"hidden_size": 0}, "hidden_size must be an integer from 1"),
        ({"hidden_size": -64}, "got -64"),
        ({"hidden_size": "64"}, "got '64'"),
        ({"hidden_size": 64.0}, "got 64.0"),
        ({"hidden_size": None}, "got None"),
        ({"hidden_size": [64]}, r"got \[64\]"),
        ({"hidden_size": 2**80}, "got an integer of 81 bits"),
        ({"vocab_size": 2**22, "hidden_size": 2**16, "intermediate_size": 2**16}, "more than this machine's"),
        ({"layer_norm_eps": float("nan")}, "layer_norm_eps must be a finite number"),
        ({"layer_norm_eps": 0}, "layer_norm_eps must be positive"),
        ({"hidden_dropout_prob": 2.0}, "hidden_dropout_prob must be a finite number from 0.0 to 1.0"),
        ({"hyena_w": float("inf")}, "hyena_w must be a finite number"),
        ({"bidirectional": "yes"}, "bidirectional must be true or false, got 'yes'"),
        ({"use_monarch_mlp": 1}, "use_monarch_mlp must be true or false"),
        ({"hyena_emb_dim": 4}, "hyena_emb_dim must be odd"),
        ({"hidden_act": "gelu\n\x1b[31m"}, r"Unsupported hidden_act 'gelu\\n\\x1b\[31m'"),
        ({"hidden_size": 66}, r"hidden_size \(66\) must be a multiple of monarch_mlp_nblocks \(4\)"),
        ({"classifier_dropout": "0.1"}, "classifier_dropout must be null"),
        ({"architectures": 5}, "architectures must be a list of class names, not 5"),
        ({"model_type": ["m2_bert"]}, "Unsupported model type"),
        ({"to_dict": 1}, "'to_dict' names a method or property of the config"),
        ({"max_sequence_length": 1}, "'max_sequence_length' names a method or property"),
        ({"quantization": {"bits": "4", "group_size": 64}}, "needs integer group_size and bits"),
    ],
)
def test_invalid_config_fields_are_one_line_config_errors(fields, message):
    import re

    assert re.search(message, config_error(fields))


def test_a_config_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"must hold a JSON object of config fields, not \[1, 2\]"):
        M2BertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match=r"not a readable JSON config \(RecursionError\)"):
        M2BertModel.from_pretrained(tmp_path)


def test_fields_changed_after_the_config_are_checked_before_the_model_is_built():
    config = M2BertConfig(**TINY)
    config.num_hidden_layers = 10**6
    with within(seconds=5, megabytes=256), pytest.raises(ConfigError, match="num_hidden_layers"):
        M2BertModel(config)
    config.num_hidden_layers, config.pad_token_id = 2, 5000
    with pytest.raises(ConfigError, match="pad_token_id"):
        M2BertForMaskedLM(config)


def test_every_published_preset_is_valid():
    for name in PRESETS:
        validate_config(M2BertConfig.from_preset(name))


# ---------------------------------------------------------------------------------------------------------------
# Ids before MLX's unchecked gather


@pytest.fixture(scope="module")
def tiny_model():
    return M2BertModel(M2BertConfig(**TINY))


@pytest.mark.parametrize("ids", [[[1, 5000]], [[1, -1]], [[1, 10**12]], [[2**31 - 1]]])
@pytest.mark.parametrize("kind", ["mlx", "list", "numpy"])
def test_input_ids_outside_the_table_are_refused(tiny_model, ids, kind):
    given = {"mlx": mx.array, "list": list, "numpy": np.array}[kind](ids)
    with pytest.raises(InputError, match=r"input_ids holds the id -?\d+, outside this model's table of 120"):
        tiny_model(given)
    with pytest.raises(InputError, match="holds the id 9223372036854775808"):
        tiny_model(np.array([[2**63]]))  # uint64, which MLX cannot take from a list


def test_ids_that_are_not_integers_are_refused(tiny_model):
    for ids in ([[10**20]], [[1.0, 2.0]], [["a"]], [[1, 2], [3]]):
        with pytest.raises(InputError, match="integer token ids"):
            tiny_model(ids)


def test_token_type_ids_outside_their_table_are_refused(tiny_model):
    with pytest.raises(InputError, match="token_type_ids holds the id 2, outside this model's table of 2"):
        tiny_model(mx.array([[1, 2]]), mx.array([[0, 2]]))
    with pytest.raises(InputError, match="token_type_ids has shape"):
        tiny_model(mx.array([[1, 2]]), mx.array([[0]]))
    with pytest.raises(InputError, match="integer token ids"):
        tiny_model(mx.array([[1.0, 2.0]]))


def test_ids_inside_the_table_still_run(tiny_model):
    out = tiny_model(mx.array([[0, 119]]), mx.array([[0, 1]]))
    assert out.last_hidden_state.shape == (1, 2, 64)


def test_a_tokenizer_with_a_huge_id_does_not_fit(tmp_path):
    tokenizer = load_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["model"]["vocab"]["hello"] = 10**9
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "vocab.txt").unlink(missing_ok=True)
    crafted = load_tokenizer(tmp_path)
    config = M2BertConfig.from_preset("tiny")  # 30528 rows, as the published models
    with pytest.raises(TokenizerError, match="ids up to 1000000000"):
        check_tokenizer_fits(crafted, config)
    check_tokenizer_fits(tokenizer, config)


# ---------------------------------------------------------------------------------------------------------------
# Weight indexes and weights


def write_index(folder, weight_map):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    save_file({"w": np.zeros(2, np.float32)}, str(folder / "model-00001-of-00001.safetensors"))


@pytest.mark.parametrize(
    "shard",
    ["../../x.safetensors", "/etc/x.safetensors", "sub/../../x.safetensors", "..", "a\\..\\x.safetensors", "a\0b"],
)
def test_shard_names_that_leave_the_folder_are_refused(tmp_path, shard):
    outside = tmp_path / "x.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, str(outside))
    write_index(tmp_path / "a" / "model", {"w": shard})
    with pytest.raises(CheckpointError, match="names shards outside its folder"):
        local_weight_files(tmp_path / "a" / "model")


@pytest.mark.parametrize("weight_map", [{"w": 5}, ["model-00001-of-00001.safetensors"], {"w": None}])
def test_weight_maps_of_the_wrong_type(tmp_path, weight_map):
    write_index(tmp_path, weight_map)
    with pytest.raises(CheckpointError, match="weight_map must map tensor names to shard file names"):
        local_weight_files(tmp_path)


def test_integer_weights_do_not_load_into_float_parameters(tmp_path):
    model = M2BertModel(M2BertConfig(**TINY))
    model.save_pretrained(tmp_path)
    weights = mx.load(str(tmp_path / "model.safetensors"))
    weights["embeddings.word_embeddings.weight"] = weights["embeddings.word_embeddings.weight"].astype(mx.int32)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    with pytest.raises(
        WeightsMismatchError, match=r"embeddings.word_embeddings.weight: .*int32 where the model has .*float32"
    ):
        M2BertModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Property-based


_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
_FIELDS = st.sampled_from(sorted(TINY) + ["architectures", "model_type", "auto_map", "quantization", "id2label"])


@given(fields=st.dictionaries(_FIELDS, _VALUE, max_size=4))
def test_random_configs_build_or_raise_a_config_error(fields):
    with within(seconds=5, megabytes=256):
        try:
            config = M2BertConfig.from_upstream_dict({**TINY, **fields})
        except ConfigError as e:
            assert "\n" not in str(e)
            return
    assert config.hidden_size >= 1 and math.isfinite(config.layer_norm_eps)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=10,
)


@given(
    index=st.dictionaries(
        st.sampled_from(["weight_map", "metadata", "x"]),
        _JSON | st.dictionaries(st.text(max_size=4), st.text(max_size=30)),
        max_size=2,
    )
)
def test_random_indexes_give_files_of_the_folder_or_raise_a_checkpoint_error(tmp_path_factory, index):
    folder = tmp_path_factory.mktemp("index")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"w": np.zeros(2, np.float32)}, str(folder / "model-00001-of-00001.safetensors"))
    with within(seconds=5, megabytes=256):
        try:
            files = local_weight_files(folder)
        except CheckpointError as e:
            assert "\n" not in str(e)
            return
    assert all(f.parent == folder and f.is_file() for f in files)


def test_weight_names_from_the_file_are_quoted_in_mismatch_errors(tmp_path):
    model = M2BertModel(M2BertConfig(**TINY))
    model.save_pretrained(tmp_path)
    weights = mx.load(str(tmp_path / "model.safetensors"))
    weights["x\nLoaded OK\x1b[2K"] = mx.zeros((1,))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    with pytest.raises(WeightsMismatchError) as e:
        M2BertModel.from_pretrained(tmp_path)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value) and "'x\\nLoaded OK\\x1b[2K'" in str(e.value)


def test_the_validator_accepts_exactly_the_activations_the_model_has():
    from m2bert_hf_mlx.activations import ACT2FN
    from m2bert_hf_mlx.configuration_m2_bert import ACTIVATIONS

    assert set(ACTIVATIONS) == set(ACT2FN)
