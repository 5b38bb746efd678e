"""M2-BERT configuration: the fields of the canonical `BertConfig` (HazyResearch/m2, bert/src/configuration_bert.py)."""

import inspect
import json
import math
import os
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from .errors import ConfigError, did_you_mean, quote

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

# Types and ranges of the fields, as (minimum, maximum). The maxima are far above every published model (the 32k
# retrieval model has long_conv_l_max 32768) and keep any one table within reach of memory; `validate_config`
# then bounds the whole model by the machine's memory.
_INT_FIELDS = {
    "vocab_size": (1, 2**22),
    "hidden_size": (1, 2**16),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 2**16),
    "intermediate_size": (1, 2**18),
    "max_position_embeddings": (1, 2**20),
    "type_vocab_size": (1, 2**16),
    "long_conv_l_max": (1, 2**20),
    "hyena_filter_order": (1, 2**14),
    "hyena_emb_dim": (3, 1023),
    "monarch_mlp_nblocks": (1, 1024),
}
_FLOAT_FIELDS = {
    "hidden_dropout_prob": (0.0, 1.0),
    "attention_probs_dropout_prob": (0.0, 1.0),
    "hyena_filter_dropout": (0.0, 1.0),
    "initializer_range": (0.0, math.inf),
    "layer_norm_eps": (0.0, 1.0),
    "long_conv_kernel_learning_rate": (0.0, math.inf),
    "hyena_lr_pos_emb": (0.0, math.inf),
    "hyena_w": (-math.inf, math.inf),
    "hyena_w_mod": (-math.inf, math.inf),
    "hyena_wd": (-math.inf, math.inf),
}
_BOOL_FIELDS = (
    "use_positional_encodings",
    "hyena_training_additions",
    "bidirectional",
    "residual_long_conv",
    "use_glu_mlp",
    "use_monarch_mlp",
    "pool_all",
    "add_pooling_layer",
    "use_flash_fft",
    "use_flash_mm",
)
_TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "mask_token_id")
# Fields of a config.json or tokenizer_config.json that make transformers import code from the repo: a folder this
# package writes carries none of them.
REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines", "trust_remote_code")
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")

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
        _check_field_names(kwargs)
        if not monarch_mixer_sequence_mixing:
            raise ConfigError(
                "This config asks for the attention variant of the canonical BertConfig "
                "(monarch_mixer_sequence_mixing=False). m2bert_hf_mlx implements only the Monarch Mixer sequence "
                "mixer that every published M2-BERT uses; use transformers' BertModel for attention BERTs."
            )
        for flag, what in _UNSUPPORTED_FLAGS.items():
            if kwargs.get(flag):
                raise ConfigError(
                    f"{flag}=True asks for {what}, which no published M2-BERT uses and m2bert_hf_mlx does not "
                    "implement."
                )
        for key in REMOTE_CODE_KEYS:  # pointers at remote code, which this package replaces and never runs
            kwargs.pop(key, None)
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
        self.prompts = dict(prompts) if isinstance(prompts, dict) else {} if prompts is None else prompts
        self.default_prompt_name = default_prompt_name
        self.similarity_fn_name = similarity_fn_name
        _check_model_fields(self)  # before transformers' own checks, which fail with less helpful messages
        try:
            super().__init__(pad_token_id=pad_token_id, **kwargs)
        except Exception as e:  # transformers' validators fail on odd values with any kind of exception
            detail = f"{type(e).__name__}: {quote(str(e))}"
            raise ConfigError(f"The config's transformers fields are invalid ({detail}).") from e
        validate_config(self)

    @property
    def max_sequence_length(self):
        """The longest input the model takes: the position table and the filters' positional tables."""
        if self.use_positional_encodings:
            return min(self.max_position_embeddings, self.long_conv_l_max)
        return self.long_conv_l_max

    @classmethod
    def from_preset(cls, name, **overrides):
        """The configuration of a published M2-BERT model (`M2BertConfig.PRESETS` lists them)."""
        if not isinstance(name, str) or name not in PRESETS:
            hint = did_you_mean(name, PRESETS, end=" ")
            raise ConfigError(
                f"Unknown preset {quote(name)}; {hint}give one of the known presets: {', '.join(PRESETS)}."
            )
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_upstream_dict(cls, config_dict, **overrides):
        """Build a config from any config.json an M2-BERT checkpoint ships (this package's or the canonical code's)."""
        if not isinstance(config_dict, dict):
            raise ConfigError(f"A config must be a JSON object of fields, not {quote(config_dict)}.")
        d = dict(config_dict)
        model_type = d.get("model_type", "m2_bert")
        if model_type not in ("m2_bert", "bert"):
            raise ConfigError(
                f"Unsupported model type {quote(model_type)}: m2bert_hf_mlx loads M2-BERT checkpoints (model_type "
                "'m2_bert', or 'bert' with the Monarch Mixer fields). Use the library made for that model type."
            )
        rest = set(d) - {
            "model_type",
            "auto_map",
            "architectures",
            "transformers_version",
            "torch_dtype",
            "dtype",
            "_name_or_path",
        }
        if model_type == "bert" and rest and not rest.intersection(_M2_ONLY_KEYS):
            raise ConfigError(
                "This config.json describes a plain BERT (model_type 'bert' without any Monarch Mixer field such as "
                "long_conv_l_max or hyena_filter_order), not an M2-BERT. Use transformers' BertModel for it."
            )
        architectures = d.get("architectures")
        if architectures is not None and not (
            isinstance(architectures, list) and all(isinstance(name, str) for name in architectures)
        ):
            raise ConfigError(f"architectures must be a list of class names, not {quote(architectures)}.")
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
        return cls.from_upstream_dict(read_config_file(path), **overrides)

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        """Read the config of a local folder or Hub repo (see `M2BertModel.from_pretrained` for the arguments)."""
        from .loading import load_config

        return load_config(name_or_path, **kwargs)

    def to_dict(self):
        output = super().to_dict()
        for key in REMOTE_CODE_KEYS:
            output.pop(key, None)
        return output


def read_config_file(path):
    """The JSON object of a config.json, or a ConfigError saying why the file is not one."""
    path = Path(path)
    try:
        config_dict = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"Cannot read the config {path}: {e.strerror or e}.") from e
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(
            f"{path} is not a readable JSON config ({type(e).__name__}); fix it or download it again."
        ) from e
    if not isinstance(config_dict, dict):
        raise ConfigError(f"{path} must hold a JSON object of config fields, not {quote(config_dict)}.")
    return config_dict


def _check_field_names(fields):
    """Field names that would replace a method or a read-only property of the config are refused (a config.json
    with a "to_dict" field would otherwise break saving)."""
    for name in fields:
        attribute = inspect.getattr_static(M2BertConfig, name, None)
        if (
            name.startswith("__")
            or callable(attribute)
            or isinstance(attribute, (classmethod, staticmethod))
            or (isinstance(attribute, property) and attribute.fset is None)
        ):
            raise ConfigError(f"The config field {quote(name)} names a method or property of the config, not a field.")


def _physical_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def estimated_parameter_bytes(config):
    """The float32 bytes of the model `config` describes, with the filters' positional tables (an upper bound of
    what building it allocates, good to a few percent)."""
    D, inner, L, V = config.hidden_size, config.intermediate_size, config.long_conv_l_max, config.vocab_size
    order, emb = config.hyena_filter_order, config.hyena_emb_dim
    mlps_per_filter = 2 if config.bidirectional else 1
    filter_mlp = emb * order + 2 * order * order + order * D + 4 * order
    one_filter = mlps_per_filter * filter_mlp + L * (emb + 1) + 3 * D
    filters = 2 if config.residual_long_conv else 1
    blocks = config.monarch_mlp_nblocks if config.use_monarch_mlp else 1
    mlp = (D * (2 * inner if config.use_glu_mlp else inner) + inner * D) // blocks + 2 * D
    layer = 4 * D * D + 12 * D + filters * one_filter + mlp
    positions = config.max_position_embeddings if config.use_positional_encodings else 0
    embeddings = (V + config.type_vocab_size + positions) * D
    heads = D * D + V + config.num_labels * D
    return 4 * (embeddings + config.num_hidden_layers * layer + heads)


def validate_config(config):
    """Check every field of `config` (types, ranges, relations, and the model's size against the machine's memory)
    before anything is built: raises a ConfigError that names the field and says what it must be. Every path that
    builds a model runs it (the config's constructor, the models' constructors)."""
    _check_model_fields(config)
    num_labels = config.num_labels
    if type(num_labels) is not int or not 1 <= num_labels <= 2**16:
        raise ConfigError(f"num_labels must be an integer from 1 to {2**16}, got {quote(num_labels)}.")
    for name in _TOKEN_ID_FIELDS:
        value = getattr(config, name, None)
        if value is not None and (type(value) is not int or not 0 <= value < config.vocab_size):
            raise ConfigError(
                f"{name} must be null or a token id from 0 to vocab_size - 1 = {config.vocab_size - 1}, "
                f"got {quote(value)}."
            )
    quantization = getattr(config, "quantization", None)
    if quantization is not None and not (
        isinstance(quantization, dict)
        and all(type(quantization.get(k)) is int for k in ("group_size", "bits"))
        and isinstance(quantization.get("mode", "affine"), str)
    ):
        raise ConfigError(
            f"The quantization entry {quote(quantization)} needs integer group_size and bits; the folder was not "
            "written by this package. Convert it again with `m2bert-mlx convert -q`."
        )
    memory = _physical_memory()
    size = estimated_parameter_bytes(config)
    if memory is not None and size > memory:
        raise ConfigError(
            f"This config describes a model of about {size / 1e9:.1f} GB of float32 weights, more than this "
            f"machine's {memory / 1e9:.1f} GB of memory; check num_hidden_layers, hidden_size, vocab_size and "
            "long_conv_l_max."
        )


def _check_model_fields(config):
    """The fields of the M2-BERT architecture (those this class sets, not transformers')."""
    for name, (low, high) in _INT_FIELDS.items():
        value = getattr(config, name)
        if type(value) is not int or not low <= value <= high:
            raise ConfigError(f"{name} must be an integer from {low} to {high}, got {quote(value)}.")
    for name, (low, high) in _FLOAT_FIELDS.items():
        value = getattr(config, name)
        if type(value) not in (int, float) or not math.isfinite(value) or not low <= value <= high:
            raise ConfigError(f"{name} must be a finite number from {low} to {high}, got {quote(value)}.")
    if config.layer_norm_eps <= 0:
        raise ConfigError(f"layer_norm_eps must be positive, got {quote(config.layer_norm_eps)}.")
    for name in _BOOL_FIELDS:
        value = getattr(config, name)
        if type(value) is not bool:
            raise ConfigError(f"{name} must be true or false, got {quote(value)}.")
    if config.hyena_emb_dim % 2 == 0:
        raise ConfigError(
            f"hyena_emb_dim must be odd and >= 3 (time, cosine and sine features), got {config.hyena_emb_dim}."
        )
    if config.hidden_act not in ACTIVATIONS:
        raise ConfigError(f"Unsupported hidden_act {quote(config.hidden_act)}; supported: {', '.join(ACTIVATIONS)}.")
    dropout = config.classifier_dropout
    if dropout is not None and (type(dropout) not in (int, float) or not 0 <= dropout <= 1):
        raise ConfigError(f"classifier_dropout must be null or a number from 0 to 1, got {quote(dropout)}.")
    prompts = config.prompts
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise ConfigError(f"prompts must map prompt names to prompt texts, got {quote(prompts)}.")
    for name in ("default_prompt_name", "similarity_fn_name"):
        value = getattr(config, name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{name} must be null or a string, got {quote(value)}.")
    if config.use_monarch_mlp:
        for name in ("hidden_size", "intermediate_size"):
            if getattr(config, name) % config.monarch_mlp_nblocks:
                raise ConfigError(
                    f"{name} ({getattr(config, name)}) must be a multiple of monarch_mlp_nblocks "
                    f"({config.monarch_mlp_nblocks}): the block-diagonal MLP splits it into that many blocks."
                )


AutoConfig.register("m2_bert", M2BertConfig)
