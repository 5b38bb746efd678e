"""The Hugging Face Hub: downloads (`hub_download`) and uploads (`upload_model_folder`), with one-line errors.

Everything goes through huggingface_hub's own client (`snapshot_download`, `HfApi.create_repo`, `create_branch`,
`upload_folder`), so the cache, the token lookup, the upload protocol (Xet or LFS) and the endpoint handling are the
ones Hub users know. What to download (which weight files, which tokenizer files) is decided by the callers.
"""

import os
import re
import urllib.parse
from pathlib import Path

from ._package import __version__
from .errors import ConfigError, HubError, quote


def display_endpoint(endpoint):
    """A Hub URL as messages show it: without the user name and password it may carry."""
    if not endpoint:
        return "the Hugging Face Hub"
    try:
        parts = urllib.parse.urlsplit(str(endpoint))
        if parts.username is None and parts.password is None:
            return quote(str(endpoint), 200)[1:-1]
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
    except ValueError:
        return "the Hub endpoint given"
    return quote(urllib.parse.urlunsplit(parts._replace(netloc=netloc)), 200)[1:-1]


_SECRETS = re.compile(r"(?i)(bearer\s+|authorization:\s*)\S+|hf_[A-Za-z0-9]{8,}")


def describe_http_error(error, token=None):
    """A failed Hub request in a few words: the HTTP status and the server's own short message, with anything that
    looks like a token removed. Never the request's headers or URL, which huggingface_hub's message may hold."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    reason = getattr(response, "reason_phrase", "")
    text = type(error).__name__ if status is None else f"HTTP {status}"
    if status is not None and isinstance(reason, str) and reason:
        text += f" {reason}"
    message = getattr(error, "server_message", None)
    if message:
        if isinstance(token, str) and token:
            message = message.replace(token, "[token]")
        text += f", the server said {quote(_SECRETS.sub('[redacted]', str(message)), 200)}"
    return text


def hub_download(repo_id, allow_patterns, hub, *, dry_run=False):
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = display_endpoint(hub.get("endpoint"))
    # Each message says what failed and what to do, so huggingface_hub's chained tracebacks (100 lines) are left out.
    try:
        return snapshot_download(
            repo_id,
            allow_patterns=allow_patterns,
            library_name="m2bert-hf-mlx",
            library_version=__version__,
            dry_run=dry_run,
            **hub,
        )
    except HFValidationError:
        raise HubError(f"{quote(repo_id)} is neither a local folder or file nor a valid Hub repo id.") from None
    except GatedRepoError:
        raise HubError(f"{repo_id} on {where} is gated: accept its terms on the Hub and pass token=... .") from None
    except RepositoryNotFoundError:
        raise HubError(
            f"Repository {repo_id!r} was not found on {where}. Check the name, pass token=... if it is private, "
            "or give the path of a local folder."
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"Revision {hub.get('revision')!r} does not exist in {repo_id}.") from None
    except IncompleteSnapshotError:
        raise HubError(
            f"The cached copy of {repo_id} is incomplete and {where} cannot be reached; go online once to finish "
            "the download."
        ) from None
    except LocalEntryNotFoundError:
        raise HubError(
            f"{repo_id!r} is not a local folder, is not in the Hugging Face cache, and {where} cannot be reached "
            "(offline mode, local_files_only=True, or no network). Download it once online, unset HF_HUB_OFFLINE, "
            "or give the path of a local folder."
        ) from None
    except HfHubHTTPError as e:
        said = describe_http_error(e, hub.get("token"))
        raise HubError(f"{where} refused the request for {repo_id} ({said}).") from None


def hub_kwargs(revision, cache_dir, local_files_only, token, force_download, endpoint):
    return dict(
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
        force_download=force_download,
        endpoint=endpoint,
    )


DEFAULT_COMMIT_MESSAGE = "Upload M2-BERT for MLX with m2bert-hf-mlx"


def upload_model_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
):
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
        raise ConfigError(
            f"{folder} is not a model folder (no config.json): write one with model.save_pretrained(...) or "
            "`m2bert-mlx convert` first."
        )
    require_token(token)
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
            f"Cannot reach the Hub at {display_endpoint(api.endpoint)} ({type(e).__name__}). Check the endpoint URL "
            "and the network."
        ) from e
    except HfHubHTTPError as e:
        raise HubError(_describe_refusal(e, repo_id, display_endpoint(api.endpoint), token)) from e


def require_token(token):
    """Fail before any work when no token can be found: an upload without one can only be refused."""
    from huggingface_hub import get_token

    if token is None and get_token() is None:
        raise HubError(
            "No Hugging Face token found. Uploading needs a token with write access: pass token=... (--token on the "
            "command line), set HF_TOKEN, or run `hf auth login`."
        )


def _describe_refusal(error, repo_id, endpoint, token):
    status = error.response.status_code if error.response is not None else None
    said = describe_http_error(error, token)
    if status == 401:
        return (
            f"The Hub at {endpoint} rejected the token ({said}): it is invalid or expired. Pass a valid write token "
            "with token=... (--token), HF_TOKEN, or `hf auth login`."
        )
    if status == 403:
        return (
            f"The token may not write to {repo_id} on {endpoint} ({said}): use a token with write access to the "
            f"namespace {repo_id.split('/')[0]!r}."
        )
    return f"The Hub at {endpoint} refused the upload to {repo_id} ({said})."
