"""The output classes the models return, readable as attributes and as keys (as transformers' `ModelOutput`)."""

from dataclasses import dataclass, fields

import mlx.core as mx


@dataclass
class ModelOutput:
    """Outputs readable as attributes and as keys (`out.logits`, `out["logits"]`); keys are the fields that are set."""

    def keys(self):
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key):
        if key not in self.keys():
            raise KeyError(f"{type(self).__name__} has no {key!r}; it holds {self.keys()}")
        return getattr(self, key)

    def __contains__(self, key):
        return key in self.keys()

    def __iter__(self):
        # As a dict (and transformers' ModelOutput): iterating gives the keys.
        return iter(self.keys())

    def to_tuple(self):
        return tuple(getattr(self, k) for k in self.keys())


@dataclass
class M2BertModelOutput(ModelOutput):
    last_hidden_state: mx.array
    pooler_output: mx.array | None = None


@dataclass
class MaskedLMOutput(ModelOutput):
    logits: mx.array
    loss: mx.array | None = None


@dataclass
class SequenceClassifierOutput(ModelOutput):
    logits: mx.array
    loss: mx.array | None = None
