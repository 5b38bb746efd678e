"""The base class of the models: the attributes other modules read, weight bookkeeping, and the hand-offs to the
modules above the model (`from_pretrained`, `save_pretrained`, `push_to_hub`), which import them when called so that
the model itself knows nothing of files or the Hub."""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .hyena_filter import Buffers

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# The task heads, which one model class has and another lacks: reported, then left out, when a checkpoint of one
# loads into the other; quantized as the group "heads".
HEAD_PREFIXES = ("cls", "classifier", "pooler", "bert.pooler")


def is_head_weight(name):
    """Whether a weight or module name belongs to a task head (`HEAD_PREFIXES`)."""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in HEAD_PREFIXES)


class PreTrainedModel(nn.Module):
    """Loading, saving and weight bookkeeping shared by the model classes.

    `name_or_path` is the folder or Hub repo id the model was loaded from and `source_folder` the local folder
    holding its files (both None for a model built in memory); `from_pretrained` sets them.
    """

    config_class = None
    name_or_path: str | None = None
    source_folder: Path | None = None

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} takes an {self.config_class.__name__}, got {type(config).__name__}."
            )
        self.config = config

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> "PreTrainedModel":
        """Load a model from a local folder or a Hub repo id.

        Arguments: `config`, `revision`, `cache_dir`, `local_files_only`, `token`, `force_download`, `dtype`
        ("float32", "float16", "bfloat16"), `strict` (default True: every checkpoint tensor used and every weight
        filled), `endpoint`, `weights` (the weight file to read when the folder or repo holds several; see
        `m2bert_hf_mlx.weight_files`); any other keyword overrides a config field.
        """
        from .loading import load_model

        return load_model(cls, name_or_path, **kwargs)

    def save_pretrained(self, save_directory, *, max_shard_size: int | None = None) -> None:
        """Write config.json and the weights as MLX safetensors (sharded above `max_shard_size` bytes, default 5 GB)."""
        from .loading import save_model

        save_model(self, save_directory, max_shard_size=max_shard_size)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload this model (config, weights, tokenizer, card) to a Hub repo; see
        `m2bert_hf_mlx.publishing.push_to_hub`."""
        from .publishing import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def buffer_keys(self) -> set:
        """Names of the fixed arrays (torch buffers): stored in checkpoints, not parameters, never trained."""
        return {
            f"{prefix}.{name}" if prefix else name
            for prefix, module in self.named_modules()
            if isinstance(module, Buffers)
            for name in module.buffer_names
        }

    def num_parameters(self, only_trainable: bool = False) -> int:
        """Parameter count as transformers reports it: buffers excluded, the tied decoder counted once."""
        params = self.trainable_parameters() if only_trainable else self.parameters()
        buffers = self.buffer_keys()
        return sum(v.size for k, v in tree_flatten(params) if k not in buffers)
