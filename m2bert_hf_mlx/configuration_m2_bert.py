"""M2-BERT configuration: the fields of the canonical `BertConfig` (HazyResearch/m2, bert/src/configuration_bert.py)."""

import json
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from .errors import ConfigError

# The published models (architecture doc §1.2). Every M2 yaml sets these on top of the canonical defaults.
_M2_YAML = dict(
    vocab_size=30528,
    num_hidden_layers=12,
    num_attention_heads=12,
    attention_probs_dropout_prob=0.0,
    long_conv_kernel_learning_rate=1e-3,
    hyena_lr_pos_emb=1e-5,
    hyena_w=10,
    hyena_wd=0.1,
    hyena_emb_dim=5,
    hyena_filter_order=128,
    bidirectional=True,
    residual_long_conv=True,
    use_glu_mlp=True,
    use_monarch_mlp=True,
    monarch_mlp_nblocks=4,
    use_positional_encodings=True,
)


def _preset(hidden_size, max_len, *, retrieval=False, **extra):
    return dict(
        _M2_YAML,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_len,
        long_conv_l_max=max_len,
        add_pooling_layer=retrieval,
        **extra,
    )


PRESETS = {
    # danfu09/m2-bert-80M was trained with the legacy hyena_training_additions (bert/README.md).
    "m2-bert-80m": _preset(768, 128, hyena_training_additions=True),
    "m2-bert-110m": _preset(960, 128),
    "m2-bert-260m": _preset(1536, 128),
    "m2-bert-341m": _preset(1792, 128),
    "m2-bert-341m-2k": _preset(1792, 2048),
    "m2-bert-80m-2k-retrieval": _preset(768, 2048, retrieval=True),
    "m2-bert-80m-8k-retrieval": _preset(768, 8192, retrieval=True),
    "m2-bert-80m-32k-retrieval": _preset(768, 32768, retrieval=True),
    # hazyresearch/M2-BERT-{128,2k,8k,32k}-Retrieval-Encoder-V1, the LoCoV1 encoders of the M2-BERT retrieval paper:
    # the 80M retrieval architecture of bert/yamls/embeddings/*.yaml at each length (no yaml exists for 128).
    "m2-bert-128-retrieval-encoder-v1": _preset(768, 128, retrieval=True),
    "m2-bert-2k-retrieval-encoder-v1": _preset(768, 2048, retrieval=True),
    "m2-bert-8k-retrieval-encoder-v1": _preset(768, 8192, retrieval=True),
    "m2-bert-32k-retrieval-encoder-v1": _preset(768, 32768, retrieval=True),
    "tiny": dict(
        _M2_YAML,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        long_conv_l_max=128,
        hyena_filter_order=16,
        add_pooling_layer=True,
    ),
}

# Keys that only the Monarch Mixer variant of the canonical BertConfig carries: a "bert" config without any of
# them is a plain BERT.
_M2_ONLY_KEYS = (
    "monarch_mixer_sequence_mixing",
    "long_conv_l_max",
    "hyena_filter_order",
    "hyena_emb_dim",
    "hyena_w",
    "residual_long_conv",
    "use_monarch_mlp",
)

# Features of the canonical code that no published M2 model uses and that this package does not implement.
_UNSUPPORTED_FLAGS = {
    "attention_pooling": "the AttentionPooler",
    "sequence_token_planting": "sequence-token planting in the pooler",
}


class M2BertConfig(PretrainedConfig):
    """Configuration of an M2-BERT model.

    The defaults are those of the canonical `BertConfig`, with the Monarch Mixer sequence mixer on (the only path
    this package implements). Use `M2BertConfig.from_preset(name)` for the published models.
    """

    model_type = "m2_bert"

    def __init__(
        self,
        vocab_size=30528,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=512,
        type_vocab_size=2,
        initializer_range=0.02,
        layer_norm_eps=1e-12,
        pad_token_id=0,
        monarch_mixer_sequence_mixing=True,
        use_positional_encodings=False,
        long_conv_l_max=None,
        long_conv_kernel_learning_rate=1e-3,
        hyena_filter_order=64,
        hyena_emb_dim=5,
        hyena_w=10,
        hyena_w_mod=1,
        hyena_wd=0.1,
        hyena_lr_pos_emb=1e-5,
        hyena_filter_dropout=0.2,
        hyena_training_additions=False,
        bidirectional=True,
        residual_long_conv=False,
        use_glu_mlp=True,
        use_monarch_mlp=False,
        monarch_mlp_nblocks=4,
        pool_all=False,
        add_pooling_layer=True,
        classifier_dropout=None,
        use_flash_fft=False,
        use_flash_mm=False,
        prompts=None,
        default_prompt_name=None,
        similarity_fn_name=None,
        **kwargs,
    ):
        if not monarch_mixer_sequence_mixing:
            raise ConfigError(
                "This config asks for the attention variant of the canonical BertConfig "
                "(monarch_mixer_sequence_mixing=False). m2bert_hf_mlx implements only the Monarch Mixer sequence "
                "mixer that every published M2-BERT uses; use transformers' BertModel for attention BERTs."
            )
        for flag, what in _UNSUPPORTED_FLAGS.items():
            if kwargs.get(flag):
                raise ConfigError(f"{flag}=True asks for {what}, which no published M2-BERT uses and m2bert_hf_mlx does not implement.")
        if hyena_emb_dim < 3 or hyena_emb_dim % 2 == 0:
            raise ConfigError(f"hyena_emb_dim must be odd and >= 3 (time, cosine and sine features), got {hyena_emb_dim}.")
        kwargs.pop("auto_map", None)  # points at remote code this package replaces
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.monarch_mixer_sequence_mixing = True
        self.use_positional_encodings = use_positional_encodings
        self.long_conv_l_max = max_position_embeddings if long_conv_l_max is None else long_conv_l_max
        self.long_conv_kernel_learning_rate = long_conv_kernel_learning_rate
        self.hyena_filter_order = hyena_filter_order
        self.hyena_emb_dim = hyena_emb_dim
        self.hyena_w = hyena_w
        self.hyena_w_mod = hyena_w_mod
        self.hyena_wd = hyena_wd
        self.hyena_lr_pos_emb = hyena_lr_pos_emb
        self.hyena_filter_dropout = hyena_filter_dropout
        self.hyena_training_additions = hyena_training_additions
        self.bidirectional = bidirectional
        self.residual_long_conv = residual_long_conv
        self.use_glu_mlp = use_glu_mlp
        self.use_monarch_mlp = use_monarch_mlp
        self.monarch_mlp_nblocks = monarch_mlp_nblocks
        self.pool_all = pool_all
        self.add_pooling_layer = add_pooling_layer
        self.classifier_dropout = classifier_dropout
        self.use_flash_fft = use_flash_fft
        self.use_flash_mm = use_flash_mm
        # sentence-transformers' settings: named prompts for encode(prompt_name=...), and the similarity function.
        self.prompts = dict(prompts or {})
        self.default_prompt_name = default_prompt_name
        self.similarity_fn_name = similarity_fn_name
        super().__init__(pad_token_id=pad_token_id, **kwargs)

    @property
    def max_sequence_length(self):
        """The longest input the model takes: the position table and the filters' positional tables."""
        if self.use_positional_encodings:
            return min(self.max_position_embeddings, self.long_conv_l_max)
        return self.long_conv_l_max

    @classmethod
    def from_preset(cls, name, **overrides):
        """The configuration of a published M2-BERT model (`M2BertConfig.PRESETS` lists them)."""
        if name not in PRESETS:
            raise ConfigError(f"Unknown preset {name!r}. Known presets: {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_upstream_dict(cls, config_dict, **overrides):
        """Build a config from any config.json an M2-BERT checkpoint ships (this package's or the canonical code's)."""
        d = dict(config_dict)
        model_type = d.get("model_type", "m2_bert")
        if model_type not in ("m2_bert", "bert"):
            raise ConfigError(
                f"Unsupported model type {model_type!r}: m2bert_hf_mlx loads M2-BERT checkpoints (model_type "
                "'m2_bert', or 'bert' with the Monarch Mixer fields). Use the library made for that model type."
            )
        rest = set(d) - {"model_type", "auto_map", "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path"}
        if model_type == "bert" and rest and not rest.intersection(_M2_ONLY_KEYS):
            raise ConfigError(
                "This config.json describes a plain BERT (model_type 'bert' without any Monarch Mixer field such as "
                "long_conv_l_max or hyena_filter_order), not an M2-BERT. Use transformers' BertModel for it."
            )
        for key in ("model_type", "architectures", "transformers_version", "_name_or_path"):
            d.pop(key, None)
        if "torch_dtype" in d:
            d.setdefault("dtype", d.pop("torch_dtype"))
        return cls(**{**d, **overrides})

    @classmethod
    def field_names(cls):
        """The fields a keyword argument may override: those of a default config, `num_labels` and `quantization`."""
        return set(cls().to_dict()) | {"num_labels", "quantization"}

    @classmethod
    def from_json_file(cls, path, **overrides):
        path = Path(path)
        try:
            config_dict = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} is not a readable JSON config ({e}).") from e
        if not isinstance(config_dict, dict):
            raise ConfigError(f"{path} must hold a JSON object of config fields.")
        return cls.from_upstream_dict(config_dict, **overrides)

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        """Read the config of a local folder or Hub repo (see `M2BertModel.from_pretrained` for the arguments)."""
        from .loading import load_config

        return load_config(name_or_path, **kwargs)

    def to_dict(self):
        output = super().to_dict()
        output.pop("auto_map", None)
        return output


AutoConfig.register("m2_bert", M2BertConfig)
