"""`m2bert-mlx convert`: a published M2-BERT checkpoint to an MLX model folder anyone can load.

Sources: a Hub repo id or a local folder or file holding a HF `pytorch_model.bin`/`model.bin`, a Composer `.pt`
(which ships no config: give `--config` or `--preset`), safetensors, or an MLX folder to re-quantize. The output
folder holds config.json, MLX safetensors (+ index), the tokenizer files and a README.md model card. The flag names
are mlx-lm's.
"""

import os
import re
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from ..checkpoint_reader import checkpoint_keys
from ..configuration_m2_bert import PRESETS, M2BertConfig
from ..errors import ConvertError
from ..hub import hub_kwargs, upload_model_folder
from ..loading import checkpoint_model_class, fetch_config_folder, fetch_weights, has_pooler
from ..model_card import render_model_card
from ..modeling_utils import DTYPE_NAMES, DTYPES
from ..publishing import write_atomically, write_model_folder
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
) -> Path:
    """Convert `hf_path` (Hub repo id, folder or file) into the MLX folder `mlx_path` and return its path.

    `config` is a JSON file with the canonical config fields, or `preset` a preset name, for checkpoints without
    config.json. `weights` names the weight file to convert when the source holds several (see
    `m2bert_hf_mlx.weight_files`). `tokenizer` is a folder or repo id (default: the source's tokenizer files, else
    the bert-base-uncased vocabulary shipped with this package). `dtype` is "float32", "float16" or "bfloat16"
    (default: the source's). With `quantize`, the weights are quantized (see
    `m2bert_hf_mlx.quantization.quantize_model`). With `upload_repo`, the folder is then uploaded to that Hub repo.
    The folder is written next to its final place and renamed into it, so a failure leaves no half-written folder;
    an existing non-empty folder is replaced only with `force`.
    """
    mlx_path = Path(mlx_path)
    _check_destination(hf_path, mlx_path, force)
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
        tokenizer, source_folder, model_max_length=config_obj.max_sequence_length, token=hub["token"],
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
        write_atomically(mlx_path, lambda tmp: write_model_folder(tmp, model, tok, card))
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


def _check_destination(hf_path, mlx_path, force):
    if mlx_path.exists() and not mlx_path.is_dir():
        raise ConvertError(f"--mlx-path {mlx_path} is a file; give a folder path.")
    source = Path(hf_path).resolve()
    target = mlx_path.resolve()
    if Path(hf_path).exists() and (target == source or target in source.parents):
        raise ConvertError(f"--mlx-path {mlx_path} would replace the source {hf_path}; write the MLX folder elsewhere.")
    if mlx_path.is_dir() and any(mlx_path.iterdir()) and not force:
        raise ConvertError(
            f"{mlx_path} already exists and is not empty; pass --force to replace it, or choose another --mlx-path."
        )


def _resolve_config(hf_path, folder, config, preset):
    if config is not None and preset is not None:
        raise ConvertError("Give either --config or --preset, not both.")
    if preset is not None:
        return M2BertConfig.from_preset(preset)
    if config is not None:
        return M2BertConfig.from_json_file(config)
    config_path = folder / "config.json" if folder.is_dir() else folder.parent / "config.json"
    if not config_path.is_file():
        raise ConvertError(
            f"{hf_path} has no config.json (Composer .pt checkpoints ship none). Pass --config FILE (a JSON file with "
            f"the canonical config fields) or --preset NAME ({', '.join(PRESETS)})."
        )
    return M2BertConfig.from_json_file(config_path)


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
        "--config", metavar="FILE", help="JSON config with the canonical field names, for checkpoints without config.json"
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
    parser.add_argument("--force", action="store_true", help="replace a non-empty --mlx-path")
    parser.set_defaults(func=run_convert)


def run_convert(args):
    if not args.quantize and (args.q_bits or args.q_group_size or args.q_skip):
        raise ConvertError("--q-bits, --q-group-size and --q-skip only apply with -q/--quantize.")
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
    )
    print(f"Wrote {folder}" + (f" and uploaded it to {args.upload_repo}" if args.upload_repo else ""))
    return 0
