"""Uploading to the Hugging Face Hub: `push_to_hub`, `upload_model_folder` and the `upload` sub-command.

Everything goes through huggingface_hub's own client (`HfApi.create_repo`, `create_branch`, `upload_folder`), so
the token lookup, the upload protocol (Xet or LFS) and the endpoint handling are the ones Hub users know.
"""

import sys
import tempfile
from pathlib import Path

from .loading import HubError

DEFAULT_COMMIT_MESSAGE = "Upload M2-BERT for MLX with m2bert-hf-mlx"


def upload_model_folder(folder, repo_id, *, token=None, endpoint=None, private=False, revision=None,
                        commit_message=None):
    """Upload every file of a model folder to `repo_id` in one commit and return the `CommitInfo`.

    The repo is created if it does not exist (`private` applies then). `token` is a Hub token with write access;
    by default huggingface_hub looks it up (HF_TOKEN, then the token saved by `hf auth login`). `endpoint` is the
    Hub URL (default: HF_ENDPOINT, else huggingface.co). `revision` is the branch to commit to, created from main
    if missing.
    """
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{folder} is not a model folder (no config.json): write one with model.save_pretrained(...) or "
            "`m2bert-mlx convert` first."
        )
    _require_token(token)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
        )
    except httpx2.TransportError as e:
        raise HubError(
            f"Cannot reach the Hub at {api.endpoint} ({type(e).__name__}: {e}). Check the endpoint URL and the network."
        ) from e
    except HfHubHTTPError as e:
        raise HubError(_describe_refusal(e, repo_id, api.endpoint)) from e


def push_to_hub(model, repo_id, *, tokenizer=None, token=None, endpoint=None, private=False, revision=None,
                commit_message=None):
    """Save `model` into a temporary folder with the MLX folder contract (config.json, safetensors weights,
    tokenizer files, README.md model card) and upload it with `upload_model_folder` (same arguments); return the
    `CommitInfo`.

    `tokenizer` is a transformers tokenizer; by default, the tokenizer files of the folder the model was loaded
    from, else the bert-base-uncased vocabulary shipped with the package.
    """
    from .conversion.model_card import render_model_card
    from .loading import DTYPE_NAMES
    from .quantization import float_groups
    from .tokenization import has_tokenizer_files, load_tokenizer, save_tokenizer

    _require_token(token)
    source = getattr(model, "source_folder", None)
    if tokenizer is not None:
        origin = "the tokenizer given to push_to_hub"
    elif source is not None and has_tokenizer_files(source):
        tokenizer, origin = load_tokenizer(source), "the source's tokenizer files"
    else:
        tokenizer, origin = load_tokenizer(), "bert-base-uncased (the vocab.txt shipped with m2bert-hf-mlx)"
    name = getattr(model, "name_or_path", None)
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
        folder = Path(tmp)
        model.save_pretrained(folder)
        save_tokenizer(tokenizer, folder, model_max_length=model.config.max_sequence_length)
        (folder / "README.md").write_text(card, encoding="utf-8")
        return upload_model_folder(
            folder, repo_id, token=token, endpoint=endpoint, private=private, revision=revision,
            commit_message=commit_message,
        )


def _require_token(token):
    """Fail before any work when no token can be found: an upload without one can only be refused."""
    from huggingface_hub import get_token

    if token is None and get_token() is None:
        raise HubError(
            "No Hugging Face token found. Uploading needs a token with write access: pass token=... (--token on the "
            "command line), set HF_TOKEN, or run `hf auth login`."
        )


def _describe_refusal(error, repo_id, endpoint):
    status = error.response.status_code if error.response is not None else None
    detail = f" The Hub said: {error.server_message}" if error.server_message else ""
    if status == 401:
        return (
            f"The Hub at {endpoint} rejected the token (401 Unauthorized): it is invalid or expired. Pass a valid "
            f"write token with token=... (--token), HF_TOKEN, or `hf auth login`.{detail}"
        )
    if status == 403:
        return (
            f"The token may not write to {repo_id} on {endpoint} (403 Forbidden): use a token with write access to "
            f"the namespace {repo_id.split('/')[0]!r}.{detail}"
        )
    return f"The Hub at {endpoint} refused the upload to {repo_id}: {error}"


# ---------------------------------------------------------------------------------------------------------------
# m2bert-mlx upload


def register(subparsers):
    parser = subparsers.add_parser(
        "upload",
        help="upload a model folder to the Hugging Face Hub",
        description="Upload a model folder (config.json, weights, tokenizer files, model card) to a Hub repo, "
        "creating the repo if needed.",
    )
    parser.add_argument("--path", required=True, help="the model folder to upload")
    parser.add_argument("--upload-repo", required=True, help="the Hub repo id, e.g. your-name/m2-bert-80M-mlx")
    parser.add_argument("--hf-endpoint", help="the Hub URL (default: HF_ENDPOINT, else https://huggingface.co)")
    parser.add_argument(
        "--token", help="a Hub token with write access (default: HF_TOKEN or the token saved by `hf auth login`)"
    )
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", help="the branch to commit to, created from main if missing (default: main)")
    parser.add_argument("--commit-message", help=f"(default: {DEFAULT_COMMIT_MESSAGE!r})")
    parser.set_defaults(func=run_upload)


def run_upload(args):
    try:
        info = upload_model_folder(
            args.path, args.upload_repo, token=args.token, endpoint=args.hf_endpoint, private=args.private,
            revision=args.revision, commit_message=args.commit_message,
        )
    except (HubError, ValueError) as e:
        print(f"m2bert-mlx upload: error: {e}", file=sys.stderr)
        return 1
    print(f"Uploaded {args.path} to {info.commit_url}")
    return 0
