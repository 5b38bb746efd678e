"""Which weight file of a folder or Hub repo a load reads.

Published M2-BERT repositories often hold several weight files side by side (the LoCoV1 encoders carry
`pytorch_model.bin`, renamed copies such as `pytorch_model_V1.bin`, a Composer `..._checkpoint.pt` and safetensors
with long names). A load never guesses between them: one candidate loads; several load without asking only when all
of them have standard names (`model.safetensors`, `pytorch_model.bin`, `model.bin`, or their sharded forms: the
same weights in other formats, taken in that order); otherwise the caller names one with `weights=`, and the error
lists the candidates with their sizes.

A candidate is a weight file, or a sharded set: the index `NAME.EXT.index.json` with `NAME.EXT` or its shards
`NAME-0000i-of-0000n.EXT`. It is named `NAME.EXT`; `weights=` also takes the index's name.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, quote

WEIGHT_EXTENSIONS = (".safetensors", ".bin", ".pt")
STANDARD_NAMES = ("model.safetensors", "pytorch_model.bin", "model.bin")
# The optimizer state this package's trainer saves in each checkpoint, beside the model's weights.
OPTIMIZER_FILE = "optimizer.safetensors"
# What trainers save beside the weights, training state rather than models: transformers' Trainer's pickles, and
# this package's optimizer state.
TRAINING_STATE_FILES = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", OPTIMIZER_FILE)
_SHARD = re.compile(r"(?P<stem>.+)-\d{5}-of-\d{5}(?P<ext>\.safetensors|\.bin)")
_INDEX = re.compile(r"(?P<name>.+(?:\.safetensors|\.bin))\.index\.json")


@dataclass
class Candidate:
    """One loadable set of weights: its name and the files (with sizes in bytes, None when unknown) it spans."""

    name: str
    files: dict = field(default_factory=dict)

    @property
    def index(self):
        return f"{self.name}.index.json" if f"{self.name}.index.json" in self.files else None

    @property
    def size(self):
        sizes = list(self.files.values())
        return None if None in sizes else sum(sizes)

    def describe(self):
        shards = sum(1 for n in self.files if _SHARD.fullmatch(n))
        extra = f", {shards} shards" if shards else ""
        name = self.name if self.name.isprintable() else quote(self.name)
        return f"{name} ({format_size(self.size)}{extra})"


def format_size(nbytes: int | None) -> str:
    """A byte count as people read it: 351.2 MB."""
    if nbytes is None:
        return "size unknown"
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000


def candidates(sizes: dict) -> list[Candidate]:
    """The candidates among a folder's or repo's top-level files, given as {file name: size or None}."""
    groups = {}
    for name, size in sizes.items():
        if name in TRAINING_STATE_FILES:
            continue
        index, shard = _INDEX.fullmatch(name), _SHARD.fullmatch(name)
        if index:
            key = index["name"]
        elif shard:
            key = shard["stem"] + shard["ext"]
        elif name.endswith(WEIGHT_EXTENSIONS):
            key = name
        else:
            continue
        groups.setdefault(key, Candidate(key)).files[name] = size
    return [groups[k] for k in sorted(groups)]


def choose(sizes: dict, where, weights: str | None = None) -> Candidate:
    """The candidate to load among `sizes` ({file name: size}) of the folder or repo `where`.

    `weights` names it (a candidate's name or its index file); without it there must be a single candidate, or only
    standard names. Raises CheckpointError, listing the candidates, otherwise.
    """
    found = candidates(sizes)
    listed = "; ".join(c.describe() for c in found)
    if weights is not None:
        for candidate in found:
            if weights in (candidate.name, candidate.index):
                return candidate
        if not found:
            raise CheckpointError(f"weights={weights!r}: {where} holds no weight file.")
        raise CheckpointError(f"weights={weights!r} is not a weight file of {where}; it holds: {listed}.")
    if not found:
        raise CheckpointError(
            f"No weights found in {where}: expected model.safetensors (or shards with an index), pytorch_model.bin, "
            "model.bin or a Composer .pt file."
        )
    if len(found) == 1:
        return found[0]
    if all(c.name in STANDARD_NAMES for c in found):
        return min(found, key=lambda c: STANDARD_NAMES.index(c.name))
    raise CheckpointError(
        f"{where} holds several weight files: {listed}. Choose one with weights='NAME' (--weights NAME on the "
        "command line)."
    )


def local_weight_files(folder: Path, weights: str | None = None) -> list[Path]:
    """The files to read for the weights of a local folder (or the file itself), the chosen candidate's shards
    in their index's order."""
    if folder.is_file():
        if weights is not None:
            raise CheckpointError(f"weights={weights!r} chooses a file in a folder, but {folder} is a file already.")
        return [folder]
    sizes = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    candidate = choose(sizes, folder, weights)
    if candidate.index is None:
        return [folder / n for n in candidate.files]
    index = folder / candidate.index
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{index} is not a valid weight index ({type(e).__name__}); download it again.") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names; download it again.")
    shards = sorted(set(weight_map.values()))
    outside = [quote(n) for n in shards if not _is_file_name(n)]
    if outside:
        raise CheckpointError(
            f"{index} names shards outside its folder ({', '.join(outside[:3])}); this index cannot be used."
        )
    missing = [quote(n) for n in shards if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(
            f"{folder} is missing the weight shards {', '.join(missing[:8])} that {index.name} names; download "
            "them again."
        )
    return [folder / n for n in shards]


def _is_file_name(name):
    """Whether a name that a file of a model folder gives (an index's shard) names a file of that folder: no path
    separator, no `..`, no absolute path, no NUL, so that no download can make loading (or an upload) read
    elsewhere."""
    return name not in ("", ".", "..") and Path(name).name == name and not any(c in name for c in "/\\\0")
