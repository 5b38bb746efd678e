"""The README.md model card of a converted folder, rendered from the templates in m2bert_hf_mlx.model_cards."""

from importlib import resources

from ._package import __version__
from .quantization import SKIPPABLE_GROUPS

# Layers quantize_model leaves in float whatever it is asked (see m2bert_hf_mlx.quantization).
_ALWAYS_FLOAT = "long-conv filters, short conv, LayerNorms, biases, position embeddings"
_GROUP_NAMES = {
    "embeddings": "word and token-type embeddings (and the tied MLM decoder)",
    "heads": "task heads",
    "mlp": "block-diagonal MLP",
}


def _template(name):
    return resources.files("m2bert_hf_mlx.model_cards").joinpath(name).read_text(encoding="utf-8")


def _describe_quantization(quantization, skip):
    if not quantization:
        return "none"
    kept = [_GROUP_NAMES[g] for g in SKIPPABLE_GROUPS if g in skip]
    mlp = "" if "mlp" in skip else "; block-diagonal MLP weights quantized per block (batched quantized matmul)"
    return (
        f"{quantization['bits']}-bit affine, group size {quantization['group_size']}{mlp}; "
        f"kept in float: {', '.join(kept + [_ALWAYS_FLOAT])}"
    )


def render_model_card(
    *, repo_id, architecture, config, source, base_model, revision, dtype, quantization, q_skip, tokenizer
):
    """The model card text. `base_model` is the source's Hub repo id, or None for a local source; `quantization` is
    the config entry (None when not quantized) and `q_skip` the groups left in float."""
    fill_mask = architecture == "M2BertForMaskedLM"
    usage = _template("usage_fill_mask.md" if fill_mask else "usage_sentence_similarity.md").format(repo_id=repo_id)
    return _template("model_card.md").format(
        pipeline_tag="fill-mask" if fill_mask else "sentence-similarity",
        base_model_yaml=f"base_model: {base_model}\n" if base_model else "",
        title=repo_id.rstrip("/").split("/")[-1],
        source_link=f"[{base_model}](https://huggingface.co/{base_model})" if base_model else f"`{source}`",
        usage=usage.strip(),
        max_length=config.max_sequence_length,
        source=source,
        revision=revision,
        architecture=architecture,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        dtype=dtype,
        quantization=_describe_quantization(quantization, q_skip),
        tokenizer=tokenizer,
        package_version=__version__,
    )
