"""The M2-BERT tokenizer: bert-base-uncased WordPiece as a transformers `BertTokenizerFast`.

Every published M2-BERT uses bert-base-uncased (30522 tokens; the models pad their vocabulary to 30528). A copy of
its `vocab.txt` ships in this package, so a tokenizer is available offline and for checkpoints that come without
tokenizer files (the Composer `.pt` files).

The canonical rule for tokenizer files found beside the weights. Some published ones contradict their vocabulary:
`"do_lower_case": false` next to bert-base-uncased's uncased vocabulary turns every capitalised word into [UNK], and
a missing `model_max_length` leaves the length to pad and truncate to undefined. The models were trained and
evaluated with bert-base-uncased, so an uncased vocabulary (no entry with an uppercase letter, special tokens aside)
is always lowercased with accents stripped, and the length is the model's maximum; each override is reported once,
naming the file. Files written by `save_tokenizer` (and so by the converter) carry the corrected settings.
"""

import json
import logging
import os
from pathlib import Path

from tokenizers import normalizers
from transformers import BertTokenizerFast

from .configuration_m2_bert import REMOTE_CODE_KEYS
from .errors import TokenizerError, quote
from .hub import hub_download, hub_kwargs

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]
VOCAB_FILE = Path(__file__).parent / "vocab.txt"
SHIPPED_VOCABULARY = "bert-base-uncased (the vocab.txt shipped with m2bert-hf-mlx)"
# sha256 of bert-base-uncased's vocab.txt, as the ecosystem conventions record it.
VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"

logger = logging.getLogger(__name__)
_reported = set()


def has_tokenizer_files(folder):
    """Whether a folder holds a tokenizer this module reads (tokenizer.json or vocab.txt)."""
    return any((Path(folder) / name).is_file() for name in ("tokenizer.json", "vocab.txt"))


def load_tokenizer(
    name_or_path: str | os.PathLike | None = None,
    *,
    model_max_length: int | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> BertTokenizerFast:
    """A `BertTokenizerFast` from a local folder or Hub repo holding tokenizer.json or vocab.txt, or, with no
    `name_or_path`, bert-base-uncased from the vocabulary shipped with this package.

    `model_max_length` should be the model's `max_position_embeddings`: the length to pad to
    (`padding="max_length"`) to reproduce the reference outputs, and the limit `truncation=True` cuts at.
    """
    if name_or_path is None:
        tokenizer = BertTokenizerFast(vocab=str(VOCAB_FILE))
    else:
        folder = _tokenizer_folder(
            name_or_path, hub_kwargs(revision, cache_dir, local_files_only, token, False, endpoint)
        )
        try:
            tokenizer = BertTokenizerFast.from_pretrained(folder)
        except Exception as e:  # tokenizers reports malformed files with its own exception types
            detail = f"{type(e).__name__}: {quote(str(e), 200)}"
            raise TokenizerError(f"The tokenizer files in {folder} cannot be read ({detail}).") from e
        _apply_canonical_rule(tokenizer, folder, model_max_length)
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    return tokenizer


def resolve_tokenizer(tokenizer=None, source=None, *, model_max_length=None, revision=None, token=None, endpoint=None):
    """The tokenizer a model runs with, and where it came from (for model cards and `m2bert-mlx info`).

    `tokenizer`, when given, is a transformers tokenizer or a folder or Hub repo id to load one from. Otherwise
    `source`, the model's folder or Hub repo id: its tokenizer files (a local folder without them gives the
    shipped vocabulary), under the canonical rule of this module; with neither, bert-base-uncased from the
    vocabulary shipped with this package. `revision`, `token` and `endpoint` apply to a Hub repo id.
    """
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        origin = "the tokenizer given"
    elif tokenizer is not None:
        loaded = load_tokenizer(str(tokenizer), revision=revision, token=token, endpoint=endpoint)
        tokenizer, origin = loaded, str(tokenizer)
    elif source is not None and (not Path(source).exists() or has_tokenizer_files(source)):
        tokenizer = load_tokenizer(
            str(source), model_max_length=model_max_length, revision=revision, token=token, endpoint=endpoint
        )
        origin = "the source's tokenizer files"
    else:
        tokenizer, origin = load_tokenizer(), SHIPPED_VOCABULARY
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    return tokenizer, origin


def check_tokenizer_fits(tokenizer, config):
    """Refuse a tokenizer whose ids do not all have a row in the model's embedding table: they would index past it.
    Its largest id counts, not its number of tokens: a tokenizer.json may map a word to any id."""
    largest = max(tokenizer.get_vocab().values(), default=-1)
    if largest >= config.vocab_size:
        raise TokenizerError(
            f"The tokenizer has ids up to {largest} ({len(tokenizer)} tokens) but the model only {config.vocab_size} "
            "embedding rows: pass the tokenizer this model was trained with (M2-BERT uses bert-base-uncased)."
        )


def _apply_canonical_rule(tokenizer, folder, model_max_length):
    """Lowercase (and strip accents) where the vocabulary is uncased, as bert-base-uncased does; report each
    override of the folder's files once (see the module docstring)."""
    config_path = Path(folder) / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    config = config if isinstance(config, dict) else {}
    overrides = []
    special = set(tokenizer.all_special_tokens)
    uncased = not any(t != t.lower() for t in tokenizer.get_vocab() if t not in special and not _bracketed(t))
    normalizer = tokenizer.backend_tokenizer.normalizer
    lowercases = normalizer is not None and normalizer.normalize_str("A") == "a"
    if uncased and not lowercases:
        tokenizer.backend_tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
        )
        # save_pretrained writes these into tokenizer_config.json.
        tokenizer.do_lower_case, tokenizer.strip_accents = True, None
        tokenizer.init_kwargs.update(do_lower_case=True, strip_accents=None)
        source = config_path if config.get("do_lower_case") is False else Path(folder) / "tokenizer.json"
        overrides.append(
            f"{source} does not lowercase, but its vocabulary is uncased: capitalised words would become [UNK]. "
            "Lowercasing and stripping accents, as bert-base-uncased (the models' tokenizer) does"
        )
    if model_max_length is not None and "model_max_length" not in config:
        overrides.append(
            f"{config_path} sets no model_max_length; using the model's maximum, {model_max_length} tokens"
        )
    for message in overrides:
        if message not in _reported:
            _reported.add(message)
            logger.warning("%s.", message)


def _bracketed(token):
    return token.startswith("[") and token.endswith("]")


def _tokenizer_folder(name_or_path, hub):
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise TokenizerError(f"{path} is a file; give the folder that holds tokenizer.json or vocab.txt.")
        folder = path
    else:
        folder = Path(hub_download(str(name_or_path), TOKENIZER_FILES, hub))
    if not has_tokenizer_files(folder):
        raise TokenizerError(
            f"{name_or_path} has no tokenizer.json or vocab.txt. M2-BERT uses bert-base-uncased: load_tokenizer() "
            "without a path gives the copy shipped with m2bert_hf_mlx."
        )
    return folder


def save_tokenizer(tokenizer, folder: str | os.PathLike, *, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json (tokenizer_class "BertTokenizer", `model_max_length`) and
    vocab.txt into `folder`, as mlx-community model folders carry them. Sets `tokenizer.model_max_length`."""
    folder = Path(folder)
    tokenizer.model_max_length = model_max_length
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if any(key in config for key in REMOTE_CODE_KEYS):
        config = {k: v for k, v in config.items() if k not in REMOTE_CODE_KEYS}
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    if [i for _, i in vocab] != list(range(len(vocab))):
        raise TokenizerError(
            "The tokenizer's token ids are not 0..n-1 without gaps, so it cannot be written as a vocab.txt."
        )
    (folder / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab), encoding="utf-8")
