"""Reading checkpoint files into name -> numpy array dicts, without executing anything from the file."""

from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: corrupt, truncated or of an unsupported kind."""


def load_state_dict(path):
    """Return the tensors of a checkpoint file as numpy arrays keyed by their names."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: unsupported checkpoint format {path.suffix!r}; expected .safetensors")
    try:
        return {k: np.asarray(v) for k, v in load_file(path).items()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); download it again") from e
