"""Writing a complete model folder (weights, config, tokenizer files, model card) and publishing it on the Hub.

`write_atomically` writes a folder beside its target and renames it into place, so an interrupted write never leaves
a folder that looks complete; the trainer's checkpoints, the demo recipe and `convert` use it. `convert`, which writes
into a folder the user names, gives its own placing step, which checks at the rename that the destination is still
the folder it claimed and checked (`conversion/convert.py`'s `_Destination`). Both replace a folder that exists
with `replace_folder`, which puts it back when its replacement cannot take its place.
"""

import re
import secrets
import shutil
import tempfile
from pathlib import Path

from .errors import OutputFileError
from .hub import require_token, upload_model_folder
from .model_card import render_model_card
from .modeling_utils import DTYPE_NAMES
from .quantization import float_groups
from .tokenization import resolve_tokenizer, save_tokenizer

# The suffixes, before their random part, of the folder `write_atomically` writes and of the one `replace_folder`
# sets aside.
_PARTIAL = ".partial-"
_ASIDE = ".old-"
# Either folder's whole name: `.<name>`, the suffix, the random hex part.
_LEFTOVER = re.compile(rf"\.(.+)(?:{re.escape(_PARTIAL)}|{re.escape(_ASIDE)})[0-9a-f]+")


def write_atomically(target, write, place=None):
    """Run `write(tmp)` on a fresh sibling folder `.<name>.partial-<hex>` (`partial_folders` finds it), then
    `place(tmp, target)` to put it at `target`: by default a rename that replaces what is there. On any failure, a
    signal too, the sibling is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}{_PARTIAL}{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        write(tmp)
        (place or _replace)(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp, target):
    if target.exists():
        replace_folder(tmp, target)
        return
    try:
        tmp.rename(target)
    except OSError as e:
        raise OutputFileError(
            f"Cannot write {target} ({e.strerror or e}); nothing was written there. Check that its folder is "
            "writable and run again."
        ) from e


def replace_folder(tmp, target, check_aside=None):
    """Rename the folder `tmp` to `target`, a folder that exists: `target` is renamed aside to `.<name>.old-<hex>`,
    `check_aside(old)` may refuse it by raising, and once `tmp` is in place the old folder is removed. On any
    failure before that, a signal too, the old folder is renamed back, so `target` keeps what it held."""
    old = target.with_name(f".{target.name}{_ASIDE}{secrets.token_hex(4)}")
    try:
        target.rename(old)
        try:
            if check_aside is not None:
                check_aside(old)
            tmp.rename(target)
        except BaseException:
            old.rename(target)
            raise
    except OSError as e:
        reason = e.strerror or e
        if old.exists():
            raise OutputFileError(
                f"Cannot replace {target} ({reason}), and its previous contents could not be put back: they are in "
                f"{old}; move them back to {target}."
            ) from e
        raise OutputFileError(
            f"Cannot replace {target} ({reason}); it keeps its previous contents. Fix that and run again."
        ) from e
    shutil.rmtree(old)


def partial_folders(target):
    """The folders `write_atomically` was writing for `target` and did not remove: a run killed while it wrote.
    `target`'s name may be a glob pattern (`checkpoint-*`), for the folders of several targets."""
    return sorted(target.parent.glob(f".{target.name}{_PARTIAL}*"))


def set_aside_folders(target):
    """The folders `replace_folder` set aside for `target` and did not remove: a run killed between its renames.
    `target`'s name may be a glob pattern, as for `partial_folders`."""
    return sorted(target.parent.glob(f".{target.name}{_ASIDE}*"))


def leftover_target(folder):
    """The target that a folder of `partial_folders` or `set_aside_folders` was written for or set aside from, or None
    for a folder whose name these helpers did not give."""
    match = _LEFTOVER.fullmatch(folder.name)
    return folder.with_name(match[1]) if match else None


def write_model_folder(folder, model, tokenizer, card):
    """The MLX folder contract: config.json, safetensors weights, tokenizer files and the README.md model card."""
    folder = Path(folder)
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder, model_max_length=model.config.max_sequence_length)
    (folder / "README.md").write_text(card, encoding="utf-8")


def push_to_hub(
    model,
    repo_id: str,
    *,
    tokenizer=None,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
):
    """Save `model` into a temporary folder with the MLX folder contract (config.json, safetensors weights,
    tokenizer files, README.md model card) and upload it with `upload_model_folder` (same arguments); return the
    `CommitInfo`.

    `tokenizer` is a transformers tokenizer; by default, the tokenizer files of the folder the model was loaded
    from, else the bert-base-uncased vocabulary shipped with the package.
    """
    require_token(token)
    tokenizer, origin = resolve_tokenizer(tokenizer, model.source_folder)
    name = model.name_or_path
    from_hub = name is not None and not Path(name).exists()
    card = render_model_card(
        repo_id=repo_id,
        architecture=type(model).__name__,
        config=model.config,
        source=name or "a model built in memory",
        base_model=name if from_hub else None,
        revision="as loaded" if from_hub else "local files",
        dtype=DTYPE_NAMES[model.dtype],
        quantization=getattr(model.config, "quantization", None),
        q_skip=float_groups(model),
        tokenizer=origin,
    )
    with tempfile.TemporaryDirectory(prefix="m2bert-push-") as tmp:
        write_model_folder(tmp, model, tokenizer, card)
        return upload_model_folder(
            tmp,
            repo_id,
            token=token,
            endpoint=endpoint,
            private=private,
            revision=revision,
            commit_message=commit_message,
        )
