import json

import pytest
from transformers import AutoConfig

from m2bert_hf_mlx import M2BertConfig
from m2bert_hf_mlx.configuration_m2_bert import PRESETS
from m2bert_hf_mlx.errors import ConfigError

# The HF retrieval config.json as published (architecture doc §1.2): remote-code auto_map, no
# monarch_mixer_sequence_mixing key, torch_dtype.
UPSTREAM_RETRIEVAL = {
    "_name_or_path": "togethercomputer/m2-bert-80M-8k-retrieval",
    "architectures": ["BertForTextEncoding"],
    "auto_map": {
        "AutoConfig": "configuration_bert.BertConfig",
        "AutoModelForSequenceClassification": "bert_layers.BertForTextEncoding",
    },
    "model_type": "m2_bert",
    "torch_dtype": "float32",
    "vocab_size": 30528,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 8192,
    "long_conv_l_max": 8192,
    "hyena_filter_order": 128,
    "hyena_emb_dim": 5,
    "hyena_w": 10,
    "hyena_w_mod": 1,
    "hyena_training_additions": False,
    "bidirectional": True,
    "residual_long_conv": True,
    "use_glu_mlp": True,
    "use_monarch_mlp": True,
    "monarch_mlp_nblocks": 4,
    "use_positional_encodings": True,
    "pool_all": False,
    "layer_norm_eps": 1e-12,
    "hidden_dropout_prob": 0.1,
    "hyena_filter_dropout": 0.2,
}


def test_defaults_are_the_canonical_ones():
    c = M2BertConfig()
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (30528, 768, 3072, 12)
    assert (c.hyena_filter_order, c.hyena_emb_dim, c.hyena_w, c.hyena_w_mod) == (64, 5, 10, 1)
    assert (c.use_monarch_mlp, c.residual_long_conv, c.use_positional_encodings) == (False, False, False)
    assert (c.use_glu_mlp, c.bidirectional, c.hyena_training_additions, c.pool_all) == (True, True, False, False)
    assert c.monarch_mixer_sequence_mixing and c.long_conv_l_max == c.max_position_embeddings == 512
    assert (c.layer_norm_eps, c.hidden_act, c.pad_token_id, c.type_vocab_size) == (1e-12, "gelu", 0, 2)


def test_upstream_retrieval_config_reads_and_saves_without_auto_map(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(UPSTREAM_RETRIEVAL))
    c = M2BertConfig.from_pretrained(tmp_path)
    assert c.monarch_mixer_sequence_mixing and c.long_conv_l_max == 8192 and c.residual_long_conv
    out = tmp_path / "saved"
    c.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    assert "auto_map" not in saved and saved["model_type"] == "m2_bert"
    assert list(saved) == sorted(saved)
    assert M2BertConfig.from_pretrained(out).to_dict() == c.to_dict()


@pytest.mark.parametrize(
    "variant",
    [
        {**UPSTREAM_RETRIEVAL, "model_type": "bert"},
        {**UPSTREAM_RETRIEVAL, "monarch_mixer_sequence_mixing": True, "dtype": "bfloat16"},
        {"model_type": "m2_bert"},
        {"model_type": "bert"},
    ],
)
def test_upstream_variants(variant):
    c = M2BertConfig.from_upstream_dict(variant)
    assert c.model_type == "m2_bert" and "auto_map" not in c.to_dict()


def test_torch_dtype_is_read_as_dtype():
    assert str(M2BertConfig.from_upstream_dict({"torch_dtype": "bfloat16"}).dtype).endswith("bfloat16")


def test_attention_variant_is_refused():
    with pytest.raises(ValueError, match="only the Monarch Mixer"):
        M2BertConfig.from_upstream_dict({**UPSTREAM_RETRIEVAL, "monarch_mixer_sequence_mixing": False})


def test_plain_bert_and_other_model_types_are_refused():
    with pytest.raises(ValueError, match="plain BERT"):
        M2BertConfig.from_upstream_dict({"model_type": "bert", "hidden_size": 768, "num_attention_heads": 12})
    with pytest.raises(ValueError, match="Unsupported model type 'llama'"):
        M2BertConfig.from_upstream_dict({"model_type": "llama"})


def test_unsupported_features_and_bad_values_are_refused():
    with pytest.raises(ValueError, match="AttentionPooler"):
        M2BertConfig(attention_pooling=True)
    with pytest.raises(ValueError, match="odd and >= 3"):
        M2BertConfig(hyena_emb_dim=4)
    with pytest.raises(
        ConfigError, match="^Unknown preset 'roberta-base'; give one of the known presets: m2-bert-80m, "
    ):
        M2BertConfig.from_preset("roberta-base")


def test_a_misspelt_preset_names_the_closest_one():
    hint = "did you mean 'm2-bert-80m-8k-retrieval'\\? give one of the known presets: m2-bert-80m, "
    with pytest.raises(ConfigError, match=f"^Unknown preset 'm2-bert-80m-8k-retreival'; {hint}"):
        M2BertConfig.from_preset("m2-bert-80m-8k-retreival")
    with pytest.raises(ConfigError, match="^Unknown preset \\[.*give one of the known presets"):
        M2BertConfig.from_preset(["m2-bert-80m", "tiny"])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip(name, tmp_path):
    c = M2BertConfig.from_preset(name)
    assert c.long_conv_l_max == c.max_position_embeddings
    c.save_pretrained(tmp_path)
    assert M2BertConfig.from_pretrained(tmp_path).to_dict() == c.to_dict()


def test_preset_facts():
    assert M2BertConfig.from_preset("m2-bert-80m").hyena_training_additions
    assert not M2BertConfig.from_preset("m2-bert-110m").hyena_training_additions
    assert M2BertConfig.from_preset("m2-bert-80m-32k-retrieval").max_sequence_length == 32768
    assert M2BertConfig.from_preset("m2-bert-80m-8k-retrieval").add_pooling_layer
    assert not M2BertConfig.from_preset("m2-bert-341m-2k").add_pooling_layer


def test_auto_config_knows_m2_bert(tmp_path):
    M2BertConfig.from_preset("tiny").save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), M2BertConfig)


def test_overrides_apply():
    c = M2BertConfig.from_upstream_dict(UPSTREAM_RETRIEVAL, num_hidden_layers=2)
    assert c.num_hidden_layers == 2
