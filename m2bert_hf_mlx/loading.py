"""Reading, checking and writing M2-BERT weights and configs: local folders and Hub repos, every published format.

Which files of a folder or repo hold the weights (`weight_files` chooses), reading them (`checkpoint_reader`), the
hand-off to the model's `sanitize`, the strict fit check that names every key, quantized layers, casting, and
sharded saving. The trainer's resume loads through the same `load_weights`.
"""

import copy
import errno
import inspect
import json
import logging
import os
import re
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from . import modeling_m2_bert
from .checkpoint_reader import checkpoint_keys, load_state_dict
from .configuration_m2_bert import PRESETS, M2BertConfig, read_config_file
from .errors import ConfigError, HubError, WeightsMismatchError, check_keywords, did_you_mean, quote
from .hub import hub_download, hub_kwargs
from .modeling_m2_bert import strip_training_prefixes
from .modeling_utils import DTYPE_NAMES, DTYPES, is_head_weight
from .quantization import apply_quantization
from .tokenization import TOKENIZER_FILES
from .weight_files import choose, local_weight_files

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9


# ---------------------------------------------------------------------------------------------------------------
# Resolution: a local folder or file as is, anything else through huggingface_hub.


def _prefixed(subfolder, names):
    return [f"{subfolder}/{n}" if subfolder else n for n in names]


def fetch_config_folder(name_or_path, hub, subfolder):
    """The folder holding config.json (and later the weights) of a local path or a Hub repo."""
    path = Path(name_or_path)
    if path.exists():
        return path / subfolder if subfolder and path.is_dir() else path
    folder = Path(hub_download(str(name_or_path), _prefixed(subfolder, ["config.json"]), hub))
    return folder / subfolder if subfolder else folder


# Beside a repo's cached snapshots: which files each snapshot's commit holds, recorded when a load lists them online,
# so that an offline load chooses among the repo's files as the online one did, not among those an earlier load
# happened to download.
LISTINGS_FOLDER = "m2bert-hf-mlx-listings"


def _listing_path(snapshot):
    return snapshot.parent.parent / LISTINGS_FOLDER / f"{snapshot.name}.json"


def _record_listing(snapshot, listing):
    path = _listing_path(snapshot)
    try:
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(listing), encoding="utf-8")
    except OSError:
        pass  # a read-only cache: offline loads of this repo then need weights=


def _recorded_listing(snapshot):
    try:
        listing = json.loads(_listing_path(snapshot).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    valid = isinstance(listing, dict) and all(isinstance(v, int) or v is None for v in listing.values())
    return listing if valid else None


def _top_level(listing, subfolder):
    if subfolder:
        listing = {n[len(subfolder) + 1 :]: s for n, s in listing.items() if n.startswith(subfolder + "/")}
    return {n: s for n, s in listing.items() if "/" not in n}


def fetch_weights(repo_id, hub, subfolder, folder, weights=None):
    """Download the chosen weight files (see `weight_files.choose`) and the tokenizer files of a Hub repo; return
    the local folder. Offline, the choice is made among the files the repo holds, as recorded by an earlier online
    load, and the chosen files must be cached."""
    from huggingface_hub.errors import DryRunError

    try:
        full_listing = {f.filename: f.file_size for f in hub_download(repo_id, None, hub, dry_run=True)}
    except DryRunError:
        snapshot = folder.parents[len(Path(subfolder).parts) - 1] if subfolder else folder
        _check_cached_choice(repo_id, snapshot, subfolder, folder, weights)
        return folder
    listing = _top_level(full_listing, subfolder)
    chosen = choose(listing, repo_id, weights)
    wanted = list(chosen.files) + [n for n in TOKENIZER_FILES if n in listing]
    root = Path(hub_download(repo_id, _prefixed(subfolder, wanted), hub))
    _record_listing(root, full_listing)
    return root / subfolder if subfolder else root


def _check_cached_choice(repo_id, snapshot, subfolder, folder, weights):
    listing = _recorded_listing(snapshot)
    if listing is None:
        if weights is None:
            raise HubError(
                f"Offline, which weight files {repo_id} holds is unknown (its cached copy records no listing): pass "
                "weights='NAME' naming a cached weight file, or load it once online."
            )
        cached = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
        choose(cached, f"the cached copy of {repo_id}", weights)
        return
    chosen = choose(_top_level(listing, subfolder), repo_id, weights)
    missing = [quote(n) for n in chosen.files if not (folder / n).is_file()]
    if missing:
        raise HubError(
            f"{repo_id}'s weights {', '.join(missing[:3])} are not in the Hugging Face cache and the Hub cannot be "
            "reached (offline mode or local_files_only=True): load them once online, or pass weights= with a cached "
            "weight file."
        )


def checkpoint_model_class(source, weights=None):
    """The model class for the checkpoint at `source` (a folder or a weight file): the one its config.json's
    `architectures` names when that is a class of this package (folders this package wrote, fine-tuned classifiers
    included), else from the weight names alone (no tensor is read): M2BertForMaskedLM when they hold an MLM head,
    else M2BertModel (the retrieval checkpoints also carry an unused classifier, which is reported when it loads)."""
    config_path = (source if source.is_dir() else source.parent) / "config.json"
    try:
        architectures = read_config_file(config_path).get("architectures")
    except ConfigError:
        architectures = None  # no config, or one that loading reports on
    for name in architectures if isinstance(architectures, list) else []:
        if name in ("M2BertModel", "M2BertForMaskedLM", "M2BertForSequenceClassification"):
            return getattr(modeling_m2_bert, name)
    keys = (key for path in local_weight_files(source, weights) for key in checkpoint_keys(path))
    heads = {strip_training_prefixes(key).split(".")[0] for key in keys}
    return modeling_m2_bert.M2BertForMaskedLM if "cls" in heads else modeling_m2_bert.M2BertModel


def has_pooler(keys):
    """Whether checkpoint names `keys` hold a pooler (the retrieval encoders do, the MLM checkpoints do not)."""
    return any(strip_training_prefixes(k).startswith(("bert.pooler.", "pooler.")) for k in keys)


# ---------------------------------------------------------------------------------------------------------------
# Configs


def config_from_argument(config, flag=None):
    """The config dict of a `config=` argument: an M2BertConfig, a dict, a JSON file or a preset name. A command
    line passes the `flag` that gave it, for its error to name."""
    if isinstance(config, M2BertConfig):
        return config.to_dict()
    if isinstance(config, dict):
        return dict(config)
    # A path is shown and matched as the text the user gave.
    given = os.fspath(config) if isinstance(config, os.PathLike) else config
    argument = f"{flag} {quote(given)}" if flag else f"config={quote(given)}"
    if isinstance(given, str):
        if given in PRESETS:
            return M2BertConfig.from_preset(given).to_dict()
        if Path(given).is_file():
            try:
                return M2BertConfig.from_json_file(given).to_dict()
            except ConfigError as e:
                raise ConfigError(f"{argument}: {e}") from e
    hint = did_you_mean(given, PRESETS, end=" ") if isinstance(given, str) else ""
    takes = "a JSON file or a preset name" if flag else "an M2BertConfig, a dict, a JSON file or a preset name"
    raise ConfigError(f"{argument} is not {takes}; {hint}give one of those (presets: {', '.join(PRESETS)}).")


def read_config_dict(folder, name_or_path, config=None, flag=None, *, takes_config=True):
    """The config dict of the model `name_or_path` whose files are in `folder` (see `fetch_config_folder`): that of
    `config` when given (see `config_from_argument`), else its config.json. A command line passes the `flag` that
    gives the config, for the errors to name; a caller with no config argument says so with `takes_config=False`."""
    if config is not None:
        return config_from_argument(config, flag)
    path = folder / "config.json" if folder.is_dir() else folder.parent / "config.json"
    if not path.is_file():
        if not takes_config:
            remedy = "Build its config with M2BertConfig.from_preset(name) or M2BertConfig.from_json_file(path)"
        elif flag:
            remedy = f"Pass {flag} with a JSON file or a preset name"
        else:
            remedy = "Pass config= with an M2BertConfig, a JSON file, or a preset name"
        raise ConfigError(
            f"{name_or_path} has no config.json (Composer .pt checkpoints ship none). {remedy}: {', '.join(PRESETS)}."
        )
    return read_config_file(path)


def model_config_dict(name_or_path, config=None, flag=None):
    """`read_config_dict` of a local path or Hub repo (fetched with the default Hub settings when `config` is not
    given): what `load_model` reads, for a command line to read before the model loads, with its `flag`."""
    hub = hub_kwargs(None, None, False, None, False, None)
    folder = fetch_config_folder(name_or_path, hub, "") if config is None else None
    return read_config_dict(folder, name_or_path, config, flag)


def _check_overrides(where, function, overrides):
    # transformers' rule: keywords that are config fields override the config; anything else is a mistake.
    loader_arguments = [n for n, p in inspect.signature(function).parameters.items() if p.kind is p.KEYWORD_ONLY]
    check_keywords(where, overrides, M2BertConfig.field_names() | set(loader_arguments))


def load_config(
    name_or_path,
    *,
    revision=None,
    cache_dir=None,
    local_files_only=False,
    token=None,
    force_download=False,
    endpoint=None,
    subfolder="",
    **overrides,
):
    _check_overrides("M2BertConfig.from_pretrained()", load_config, overrides)
    hub = hub_kwargs(revision, cache_dir, local_files_only, token, force_download, endpoint)
    folder = fetch_config_folder(name_or_path, hub, subfolder)
    config_dict = read_config_dict(folder, name_or_path, takes_config=False)
    return M2BertConfig.from_upstream_dict(config_dict, **overrides)


# ---------------------------------------------------------------------------------------------------------------
# Reading weights


def read_weights(files):
    """All tensors of the given weight files (any format `load_state_dict` reads), as MLX arrays keyed by name."""
    weights = {}
    for path in files:
        weights.update({k: mx.array(v) for k, v in load_state_dict(path).items()})
    return weights


# ---------------------------------------------------------------------------------------------------------------
# sanitize: checkpoint names -> this package's names


# ---------------------------------------------------------------------------------------------------------------
# Strict loading


def _name(key):
    """A tensor name as messages show it: plain when it looks like one, quoted (escapes visible, cut) otherwise."""
    return key if re.fullmatch(r"[\w.\-]{1,200}", key) else quote(key)


def _describe(keys, limit=12):
    keys = sorted(keys)
    shown = ", ".join(_name(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _missing_head_message(model, source, missing):
    # strict=False would run a randomly initialised head: fine to fine-tune a classifier, never to fill masks.
    head = f"{source} has no weights for the task head of {type(model).__name__} ({_describe(missing)})"
    if isinstance(model, modeling_m2_bert.M2BertForMaskedLM):
        return (
            f"{head}: it is an encoder checkpoint without an MLM head, such as a retrieval model. Load it with "
            "M2BertModel, or use the 'sentence-embedding' or 'feature-extraction' pipeline."
        )
    return f"{head}. To fine-tune a new head from it, pass strict=False, which starts the head from random weights."


def apply_weights(model, weights, *, strict=True, source="the checkpoint"):
    """Load sanitized weights into the model, checking that they fit (see `load_model`'s `strict`)."""
    expected = dict(tree_flatten(model.parameters()))
    other_heads = {k for k in weights if k not in expected and is_head_weight(k)}
    unexpected = set(weights) - set(expected) - other_heads
    missing = set(expected) - set(weights) - model.buffer_keys()
    mismatched = [
        _mismatch(k, weights[k], expected[k])
        for k in sorted(set(weights) & set(expected))
        if weights[k].shape != expected[k].shape or _is_float(weights[k]) != _is_float(expected[k])
    ]
    if strict and missing and not mismatched and not unexpected and all(is_head_weight(k) for k in missing):
        raise WeightsMismatchError(_missing_head_message(model, source, missing))
    problems = []
    if mismatched:
        problems.append("shape or dtype mismatches: " + "; ".join(mismatched[:12]))
    if strict and missing:
        problems.append(f"missing from {source}: {_describe(missing)}")
    if strict and unexpected:
        problems.append(f"not used by {type(model).__name__}: {_describe(unexpected)}")
    if problems:
        raise WeightsMismatchError(
            f"{source} does not fit {type(model).__name__} ({model.config.num_hidden_layers} layers, hidden size "
            f"{model.config.hidden_size}): "
            + " | ".join(problems)
            + ". Check that the config matches the checkpoint (config= or a preset) and that the model class fits "
            "it (M2BertForMaskedLM for MLM checkpoints, M2BertModel for retrieval ones)."
            + ("" if mismatched else " strict=False loads what fits and keeps the rest initialised.")
        )
    if other_heads:
        logger.warning(
            "%s has task-head weights that %s does not have; they are not loaded: %s",
            source,
            type(model).__name__,
            _describe(other_heads),
        )
    if missing:
        logger.warning("strict=False: left at their initial values: %s", _describe(missing))
    if unexpected:
        logger.warning("strict=False: not loaded: %s", _describe(unexpected))
    model.load_weights([(k, v) for k, v in weights.items() if k in expected], strict=False)


def _is_float(array):
    return mx.issubdtype(array.dtype, mx.floating)


def _mismatch(key, got, want):
    """An integer tensor never loads into a float weight, nor the reverse (a quantized weight's packed words)."""
    text = f"{_name(key)}: checkpoint {tuple(got.shape)} vs model {tuple(want.shape)}"
    return text if _is_float(got) == _is_float(want) else f"{text}, {got.dtype} where the model has {want.dtype}"


def load_weights(model, folder, *, strict=True):
    """Read the weights of a folder this package wrote into `model`, through `sanitize` and `apply_weights`'s
    checks (the trainer's resume)."""
    files = local_weight_files(Path(folder))
    weights = model.sanitize(read_weights(files))
    apply_weights(model, weights, strict=strict, source=", ".join(str(f) for f in files))


def cast_model(model, dtype):
    """Cast the weights to `dtype`, except the long-convolution filters, which stay float32 (their positional
    tables need the resolution, and the convolution runs in float32 anyway)."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}.")
    target = DTYPES[dtype]

    def cast(path, value):
        keep = ".filter_fn" in f".{path}" or mx.issubdtype(value.dtype, mx.integer)
        return value if keep else value.astype(target)

    model.update(_map_with_path(model.parameters(), cast))


def _map_with_path(tree, fn, prefix=""):
    if isinstance(tree, dict):
        return {k: _map_with_path(v, fn, f"{prefix}.{k}" if prefix else k) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map_with_path(v, fn, f"{prefix}.{i}") for i, v in enumerate(tree)]
    return fn(prefix, tree)


def _stored_dtype(weights):
    dtypes = {v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)}
    return DTYPE_NAMES[dtypes.pop()] if len(dtypes) == 1 and next(iter(dtypes)) in DTYPE_NAMES else "float32"


def _declared_dtype(config_dict):
    declared = config_dict.get("dtype") or config_dict.get("torch_dtype")
    return declared if declared in DTYPES else None


def load_model(
    cls,
    name_or_path,
    *,
    config=None,
    revision=None,
    cache_dir=None,
    local_files_only=False,
    token=None,
    force_download=False,
    dtype=None,
    strict=True,
    endpoint=None,
    subfolder="",
    weights=None,
    **config_overrides,
):
    _check_overrides(f"{cls.__name__}.from_pretrained()", load_model, config_overrides)
    hub = hub_kwargs(revision, cache_dir, local_files_only, token, force_download, endpoint)
    folder = fetch_config_folder(name_or_path, hub, subfolder)
    config_dict = read_config_dict(folder, name_or_path, config)
    # Building the config validates the model type before any weight file is fetched.
    config_obj = M2BertConfig.from_upstream_dict(config_dict, **config_overrides)
    if not Path(name_or_path).exists():
        folder = fetch_weights(str(name_or_path), hub, subfolder, folder, weights)

    files = local_weight_files(folder, weights)
    tensors = read_weights(files)
    if "add_pooling_layer" not in config_dict and "add_pooling_layer" not in config_overrides:
        # Upstream configs do not say; the retrieval checkpoints carry a pooler, the MLM ones do not.
        config_obj.add_pooling_layer = has_pooler(tensors)
    model = cls(config_obj)
    source = ", ".join(str(f) for f in files)
    tensors = model.sanitize(tensors)
    if getattr(config_obj, "quantization", None):
        apply_quantization(model, config_obj.quantization, tensors)
    apply_weights(model, tensors, strict=strict, source=source)
    cast_model(model, dtype or _declared_dtype(config_dict) or _stored_dtype(tensors))
    model.eval()
    mx.eval(model.parameters())
    model.name_or_path = str(name_or_path)  # declared on PreTrainedModel
    model.source_folder = folder if folder.is_dir() else folder.parent
    return model


# ---------------------------------------------------------------------------------------------------------------
# Saving


def save_safetensors(path, arrays):
    """mx.save_safetensors, then a check that the whole file reached the disk: MLX reports no write error (on a
    full disk it leaves a truncated file and returns)."""
    mx.save_safetensors(str(path), arrays, metadata={"format": "mlx"})
    with open(path, "rb") as f:
        head = f.read(8)
    size = path.stat().st_size
    expected = None if len(head) < 8 else 8 + int.from_bytes(head, "little") + sum(v.nbytes for v in arrays.values())
    if size != expected:
        raise OSError(errno.ENOSPC, f"{path} was not written completely ({size} bytes); is the disk full?")


def save_model(model, save_directory, *, max_shard_size=None):
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    max_shard_size = max_shard_size or DEFAULT_MAX_SHARD_SIZE
    shards, current, size = [], {}, 0
    for key in sorted(weights):
        nbytes = weights[key].nbytes
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = {}, 0
        current[key] = weights[key]
        size += nbytes
    shards.append(current)

    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for stale in save_directory.glob("model*.safetensors"):
        stale.unlink()
    weight_map = {}
    for name, shard in zip(names, shards):
        save_safetensors(save_directory / name, shard)
        weight_map.update({k: name for k in shard})
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values()), "total_parameters": model.num_parameters()},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (save_directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    # A copy: saving describes the model, it does not change the live config.
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = DTYPE_NAMES[model.dtype]
    config.save_pretrained(save_directory)
