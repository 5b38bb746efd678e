"""`m2bert-mlx convert`: a published M2-BERT checkpoint to an MLX model folder anyone can load.

Sources: a Hub repo id or a local folder or file holding a HF `pytorch_model.bin`/`model.bin`, a Composer `.pt`
(which ships no config: give `--config` or `--preset`), safetensors, or an MLX folder to re-quantize. The output
folder holds config.json, MLX safetensors (+ index), the tokenizer files and a README.md model card. The flag names
are mlx-lm's.
"""

import contextlib
import errno
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from ..checkpoint_reader import checkpoint_keys
from ..configuration_m2_bert import PRESETS, M2BertConfig
from ..errors import ConvertError, quote
from ..hub import hub_kwargs, upload_model_folder
from ..loading import checkpoint_model_class, fetch_config_folder, fetch_weights, has_pooler, read_config_dict
from ..model_card import render_model_card
from ..modeling_utils import DTYPE_NAMES, DTYPES
from ..publishing import partial_folders, replace_folder, set_aside_folders, write_atomically, write_model_folder
from ..quantization import (
    SKIPPABLE_GROUPS,
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    check_quantization_settings,
    quantize_model,
)
from ..tokenization import check_tokenizer_fits, resolve_tokenizer
from ..weight_files import local_weight_files

DEFAULT_MLX_PATH = "mlx_model"
# What a folder this package writes holds; `--force` replaces nothing else unless `--force-any-folder` says so.
_OWN_FILES = re.compile(
    r"config\.json|README\.md|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|vocab\.txt|"
    r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
)

logger = logging.getLogger(__name__)


def convert(
    hf_path: str,
    mlx_path: str | os.PathLike = DEFAULT_MLX_PATH,
    *,
    config: str | os.PathLike | None = None,
    preset: str | None = None,
    weights: str | None = None,
    tokenizer: str | None = None,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    q_skip: Sequence[str] = (),
    revision: str | None = None,
    upload_repo: str | None = None,
    hf_endpoint: str | None = None,
    token: str | None = None,
    force: bool = False,
    force_any_folder: bool = False,
) -> Path:
    """Convert `hf_path` (Hub repo id, folder or file) into the MLX folder `mlx_path` and return its path.

    `config` (a JSON config file or a preset name) or `preset` (a preset name) gives the config of a checkpoint
    without config.json. `weights` names the weight file to convert when the source holds several (see
    `m2bert_hf_mlx.weight_files`). `tokenizer` is a folder or repo id (default: the source's tokenizer files, else
    the bert-base-uncased vocabulary shipped with this package). `dtype` is "float32", "float16" or "bfloat16"
    (default: the source's). With `quantize`, the weights are quantized (see
    `m2bert_hf_mlx.quantization.quantize_model`). With `upload_repo`, the folder is then uploaded to that Hub repo.
    The folder is written next to its final place and renamed into it, so a failure leaves no half-written folder.
    The destination is claimed first (a lock file beside it), so two conversions cannot both write it; an existing
    non-empty folder is replaced only with `force`, and only if this package wrote it (any folder with
    `force_any_folder` too); what it holds is logged first.
    """
    mlx_path = Path(mlx_path)
    with _Destination(hf_path, Path(os.path.abspath(mlx_path)), force, force_any_folder) as destination:
        return _convert(
            hf_path,
            mlx_path,
            destination,
            config=config,
            preset=preset,
            weights=weights,
            tokenizer=tokenizer,
            dtype=dtype,
            quantize=quantize,
            q_bits=q_bits,
            q_group_size=q_group_size,
            q_skip=q_skip,
            revision=revision,
            upload_repo=upload_repo,
            hf_endpoint=hf_endpoint,
            token=token,
        )


def _convert(
    hf_path,
    mlx_path,
    destination,
    *,
    config,
    preset,
    weights,
    tokenizer,
    dtype,
    quantize,
    q_bits,
    q_group_size,
    q_skip,
    revision,
    upload_repo,
    hf_endpoint,
    token,
):
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}.")
    if quantize:
        check_quantization_settings(q_bits, q_group_size, q_skip)
    hub = hub_kwargs(revision, None, False, token, False, hf_endpoint)
    is_local = Path(hf_path).exists()

    # Only config.json is fetched before the config is checked, so an unsupported model fails before a large download.
    folder = fetch_config_folder(hf_path, hub, "")
    config_obj = _resolve_config(hf_path, folder, config, preset)
    if quantize and getattr(config_obj, "quantization", None):
        raise ConvertError(
            f"{hf_path} is already quantized; convert from the float checkpoint to quantize differently."
        )
    source = Path(hf_path) if is_local else fetch_weights(hf_path, hub, "", folder, weights)
    source_folder = source if source.is_dir() else source.parent

    files = local_weight_files(source, weights)
    cls = checkpoint_model_class(source, weights)
    pooler = has_pooler(k for path in files for k in checkpoint_keys(path))

    tok, tokenizer_origin = resolve_tokenizer(
        tokenizer,
        source_folder,
        model_max_length=config_obj.max_sequence_length,
        token=hub["token"],
        endpoint=hub["endpoint"],
    )
    check_tokenizer_fits(tok, config_obj)

    # Steps: read, (quantize), write, (upload); huggingface_hub shows its own bars for the downloads.
    with tqdm(total=2 + int(quantize) + int(bool(upload_repo)), unit="step", disable=None) as progress:
        progress.set_description("Reading weights")
        model = cls.from_pretrained(
            str(source), config=config_obj, weights=weights, dtype=dtype, add_pooling_layer=pooler
        )
        progress.update()
        quantization = None
        if quantize:
            progress.set_description("Quantizing")
            quantization = quantize_model(model, bits=q_bits, group_size=q_group_size, skip=q_skip)
            progress.update()
        progress.set_description(f"Writing {mlx_path}")
        card = render_model_card(
            repo_id=upload_repo or str(mlx_path),
            architecture=cls.__name__,
            config=model.config,
            source=hf_path,
            base_model=None if is_local else hf_path,
            revision=_revision_of(source_folder, revision, is_local),
            dtype=DTYPE_NAMES[model.dtype],
            quantization=quantization,
            q_skip=q_skip,
            tokenizer=tokenizer_origin,
        )
        destination.write(lambda tmp: write_model_folder(tmp, model, tok, card))
        progress.update()
        if upload_repo:
            progress.set_description(f"Uploading to {upload_repo}")
            _upload(mlx_path, upload_repo, token, hf_endpoint)
            progress.update()
    return mlx_path


def _upload(folder, repo_id, token, endpoint):
    try:
        upload_model_folder(folder, repo_id, token=token, endpoint=endpoint)
    except (ValueError, OSError) as e:
        raise ConvertError(
            f"{folder} was written, but the upload failed: {e} Once that is fixed, upload it with: m2bert-mlx upload "
            f"--path {folder} --upload-repo {repo_id}"
        ) from e


class _Destination:
    """The output folder of one conversion, from the claim to the final rename.

    Claimed by an exclusive lock file beside it (`.<name>.m2bert-lock`, holding the process id), so a second
    conversion to the same place fails at once; a lock whose process is gone is taken over. Partial folders of
    killed runs (`.<name>.partial-*`) are removed then (and the previous contents a killed `--force` run set aside,
    `.<name>.old-*`, reported). The folder's state is recorded when it is checked, and the
    final rename refuses to replace anything else: an absent destination is created empty at once (another tool
    that writes into it keeps its files, since a rename never replaces a non-empty folder), an existing one is
    replaced only if it is still the same folder.
    """

    def __init__(self, hf_path, path, force, force_any_folder):
        self.path = path
        self.lock = path.with_name(f".{path.name}.m2bert-lock")
        self._check_place(hf_path)
        self._force, self._force_any = force, force_any_folder

    def _check_place(self, hf_path):
        path = self.path
        if path.is_symlink():
            raise ConvertError(f"--mlx-path {path} is a symbolic link; give the folder it points to, or another path.")
        if path.exists() and not path.is_dir():
            raise ConvertError(f"--mlx-path {path} is a file; give a folder path.")
        target, cwd = path.resolve(), Path.cwd().resolve()
        if target == cwd or target in cwd.parents or target == Path(target.anchor):
            raise ConvertError(f"--mlx-path {path} is the current folder or one of its parents; give a new folder.")
        source = Path(hf_path).resolve()
        if Path(hf_path).exists() and (target == source or target in source.parents):
            raise ConvertError(f"--mlx-path {path} would replace the source {hf_path}; write the MLX folder elsewhere.")

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._claim()
        try:
            self._remove_partials()
            self._inspect()
        except BaseException:
            self.lock.unlink(missing_ok=True)
            raise
        return self

    def __exit__(self, *exc):
        if self._created and exc[0] is not None:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # the empty folder this run created, unless something was written into it
        self.lock.unlink(missing_ok=True)

    def _claim(self):
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale_lock():
                    raise ConvertError(
                        f"Another conversion is writing {self.path} (lock file {self.lock}); wait for it to finish, "
                        "or choose another --mlx-path."
                    ) from None
                self.lock.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            return
        raise ConvertError(f"Cannot claim {self.path}: its lock file {self.lock} keeps reappearing.")

    def _stale_lock(self):
        try:
            pid = int(self.lock.read_text(encoding="ascii").strip()[:20])
        except (OSError, ValueError, UnicodeDecodeError):
            return False  # being written, or not ours: leave it
        if pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False

    def _remove_partials(self):
        for partial in partial_folders(self.path):
            logger.warning("Removing %s, left by a conversion that did not finish.", partial)
            shutil.rmtree(partial, ignore_errors=True)
        for old in set_aside_folders(self.path):
            logger.warning(
                "%s holds what %s held before a --force conversion that was interrupted; move it back or remove it.",
                old,
                self.path,
            )

    def _inspect(self):
        path = self.path
        self._created = False
        try:
            path.mkdir()
            self._created = True
        except FileExistsError:
            pass
        if path.is_symlink() or not path.is_dir():
            raise ConvertError(f"--mlx-path {path} changed while it was checked; run again.")
        self._identity = _identity(path)
        entries = sorted(p.name for p in path.iterdir())
        self._replaces = bool(entries)
        if not entries:
            return
        if not self._force:
            raise ConvertError(
                f"{path} already exists and is not empty; pass --force to replace it, or choose another --mlx-path."
            )
        foreign = [name for name in entries if not (_OWN_FILES.fullmatch(name) and (path / name).is_file())]
        if foreign and not self._force_any:
            shown = ", ".join(quote(n) for n in foreign[:8]) + (" ..." if len(foreign) > 8 else "")
            raise ConvertError(
                f"--force would remove {path}, which holds what this package does not write ({shown}); move those "
                "away, choose another --mlx-path, or add --force-any-folder to remove them too."
            )
        shown = ", ".join(quote(n) for n in entries[:20])
        if len(entries) > 20:
            shown += f" and {len(entries) - 20} more"
        logger.warning("--force: replacing %s and what it holds (%d): %s", path, len(entries), shown)

    def _check_claimed(self, folder):
        """`folder` (the destination, or where it was set aside) is still the folder this conversion claimed."""
        if _identity(folder) != self._identity:
            raise ConvertError(
                f"{self.path} was replaced by something else during the conversion; nothing was changed."
            )

    def write(self, write):
        """Run `write(tmp)` on a fresh sibling folder, then rename it into place (see the class)."""
        write_atomically(self.path, write, place=self._place)

    def _place(self, tmp, path):
        self._check_claimed(path)
        if self._replaces:
            replace_folder(tmp, path, check_aside=self._check_claimed)
        else:
            try:
                os.rename(tmp, path)  # replaces the empty folder, and only an empty one
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                raise ConvertError(
                    f"Something wrote into {path} during the conversion; its files were kept and the conversion "
                    "was discarded. Run again with another --mlx-path."
                ) from None


def _identity(path):
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def _resolve_config(hf_path, folder, config, preset):
    if config is not None and preset is not None:
        raise ConvertError("Give either --config or --preset, not both.")
    if preset is not None:
        return M2BertConfig.from_preset(preset)
    # convert's messages name its flags, from Python too.
    return M2BertConfig.from_upstream_dict(read_config_dict(folder, hf_path, config, flag="--config"))


def _revision_of(source_folder, revision, is_local):
    if is_local:
        return "local files"
    # huggingface_hub's cache keeps each download under snapshots/<commit sha>.
    if re.fullmatch(r"[0-9a-f]{40}", source_folder.name):
        return source_folder.name if revision in (None, source_folder.name) else f"{revision} ({source_folder.name})"
    return revision or "main"


# ---------------------------------------------------------------------------------------------------------------
# m2bert-mlx convert


def register(subparsers):
    parser = subparsers.add_parser(
        "convert",
        help="convert a PyTorch M2-BERT checkpoint into an MLX model folder",
        description="Convert an M2-BERT checkpoint (Hub repo or local folder/file: pytorch_model.bin, model.bin, "
        "Composer .pt, safetensors) into an MLX model folder with config.json, safetensors weights, tokenizer files "
        "and a model card; optionally quantize it and upload it to the Hub.",
    )
    parser.add_argument("--hf-path", required=True, help="Hub repo id, or a local folder or checkpoint file")
    parser.add_argument("--mlx-path", default=DEFAULT_MLX_PATH, help=f"output folder (default: {DEFAULT_MLX_PATH})")
    source_config = parser.add_mutually_exclusive_group()
    source_config.add_argument(
        "--config",
        metavar="CONFIG",
        help="a JSON config file or a preset name, for checkpoints without config.json",
    )
    source_config.add_argument(
        "--preset", choices=list(PRESETS), metavar="NAME", help=f"a published configuration: {', '.join(PRESETS)}"
    )
    parser.add_argument("--weights", metavar="NAME", help="the weight file to convert, when the source holds several")
    parser.add_argument(
        "--tokenizer",
        help="tokenizer folder or repo id (default: the source's, else bert-base-uncased shipped with the package)",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), help="weight dtype (default: the source's)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize the weights (MLX affine quantization)")
    parser.add_argument("--q-bits", type=int, choices=SUPPORTED_BITS, help="bits per weight (default: 4)")
    parser.add_argument(
        "--q-group-size", type=int, choices=SUPPORTED_GROUP_SIZES, help="weights per scale and bias (default: 64)"
    )
    parser.add_argument("--q-skip", nargs="+", choices=SKIPPABLE_GROUPS, default=[], help="groups to keep in float")
    parser.add_argument("--revision", help="revision of the source repo (branch, tag or commit)")
    parser.add_argument("--upload-repo", help="Hub repo id to upload the folder to")
    parser.add_argument(
        "--hf-endpoint", help="Hub URL for download and upload (default: HF_ENDPOINT, else https://huggingface.co)"
    )
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the token saved by `hf auth login`)")
    parser.add_argument(
        "--force", action="store_true", help="replace a non-empty --mlx-path that this package wrote (lists it first)"
    )
    parser.add_argument(
        "--force-any-folder", action="store_true", help="with --force, replace a --mlx-path this package did not write"
    )
    parser.set_defaults(func=run_convert)


def run_convert(args):
    if not args.quantize and (args.q_bits or args.q_group_size or args.q_skip):
        raise ConvertError("--q-bits, --q-group-size and --q-skip only apply with -q/--quantize.")
    if args.force_any_folder and not args.force:
        raise ConvertError("--force-any-folder only applies with --force.")
    folder = convert(
        args.hf_path,
        args.mlx_path,
        config=args.config,
        preset=args.preset,
        weights=args.weights,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        quantize=args.quantize,
        q_bits=args.q_bits or 4,
        q_group_size=args.q_group_size or 64,
        q_skip=tuple(args.q_skip),
        revision=args.revision,
        upload_repo=args.upload_repo,
        hf_endpoint=args.hf_endpoint,
        token=args.token,
        force=args.force,
        force_any_folder=args.force_any_folder,
    )
    print(f"Wrote {folder}" + (f" and uploaded it to {args.upload_repo}" if args.upload_repo else ""))
    return 0
