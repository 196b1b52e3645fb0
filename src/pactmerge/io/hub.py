"""The Hugging Face Hub: model ids resolved in the local cache, and uploading a merged folder.

A model reference that is not an existing path and looks like a Hub id -- ``owner/name``,
optionally ``owner/name@revision`` (a branch, tag or commit) -- is looked up in the local Hugging
Face cache (``$HF_HUB_CACHE``, default ``$HF_HOME/hub``, default ``~/.cache/huggingface/hub``)
with ``huggingface_hub``'s offline resolution (``snapshot_download(..., local_files_only=True)``):
pactmerge never downloads. A missing model gets a one-line error saying how to download it.

``huggingface_hub`` is optional: it is imported only when a Hub id is used or a folder is pushed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pactmerge.errors import PactMergeError

# owner/name[@revision]: the Hub's repo-id characters; a revision may hold slashes (refs/pr/1).
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.][\w./-]*))?")
# .../models--owner--name/snapshots/<commit>/... : a folder inside the Hub cache.
_CACHE_PATH = re.compile(r"(?:^|/)models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/[0-9a-f]{40}(?:/|$)")


def parse_hub_id(ref: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` if ``ref`` has the form ``owner/name[@revision]``, else None."""
    m = _HUB_ID.fullmatch(ref)
    if m is None or ".." in ref or ref.endswith((".safetensors", ".bin", ".pt", ".pth")):
        return None
    return m.group("repo"), m.group("revision")


def _download_hint(repo: str, revision: str | None) -> str:
    return f"hf download {repo}" + (f" --revision {revision}" if revision else "")


def resolve_hub_id(ref: str) -> Path:
    """The local snapshot folder of the Hub id ``ref`` (``owner/name[@revision]``).

    Raises:
        PactMergeError: ``ref`` is not in the local cache (the message says how to download it),
            or ``huggingface_hub`` is not installed.
    """
    parsed = parse_hub_id(ref)
    if parsed is None:
        raise PactMergeError(f"{ref}: no such file or directory")
    repo, revision = parsed
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PactMergeError(
            f"{ref}: no such file or directory; to read it as a Hugging Face Hub id, install huggingface_hub"
            f" (pip install huggingface_hub) and download it ({_download_hint(repo, revision)})"
        ) from None
    try:
        folder = snapshot_download(repo, revision=revision, local_files_only=True)
    except Exception:  # LocalEntryNotFoundError, an invalid id, an incomplete snapshot: all "not usable here"
        raise PactMergeError(
            f"{ref}: no such file or directory, and not in the local Hugging Face cache; download it with"
            f" `{_download_hint(repo, revision)}`"
        ) from None
    return Path(folder)


def local_reference(ref: Any) -> Any:
    """``ref`` with a Hub id replaced by its local snapshot folder; paths, state dicts and other
    references are returned unchanged (an existing path always wins over a Hub id)."""
    if isinstance(ref, Mapping) or not isinstance(ref, (str, os.PathLike)):
        return ref
    text = os.fspath(ref)
    if Path(text).expanduser().exists() or parse_hub_id(text) is None:
        return ref
    return resolve_hub_id(text)


def hub_id_of(ref: Any) -> str | None:
    """The Hub id a model reference names, for the model card: the id itself (without the
    revision), or ``owner/name`` of a folder inside the Hub cache; None otherwise."""
    if not isinstance(ref, (str, os.PathLike)):
        return None
    text = os.fspath(ref)
    parsed = parse_hub_id(text)
    if parsed is not None and not Path(text).expanduser().exists():
        return parsed[0]
    m = _CACHE_PATH.search(Path(text).expanduser().as_posix())
    return f"{m.group('owner')}/{m.group('name')}" if m else None


def check_push_ready(repo_id: str) -> None:
    """Fail before any work if ``--push-to-hub repo_id`` cannot succeed: a malformed repo id,
    ``huggingface_hub`` missing, or no login token."""
    if parse_hub_id(repo_id) is None or "@" in repo_id:
        raise PactMergeError(f"--push-to-hub {repo_id}: expected a Hub repo id, owner/name")
    try:
        from huggingface_hub import get_token
    except ImportError:
        raise PactMergeError(
            f"--push-to-hub {repo_id}: needs the huggingface_hub package (pip install huggingface_hub)"
        ) from None
    if not get_token():
        raise PactMergeError(
            f"--push-to-hub {repo_id}: not logged in to the Hugging Face Hub; run `hf auth login` or set HF_TOKEN"
        )


def push_folder(folder: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Upload a merged model folder to the Hub repo ``repo_id`` (created if missing); returns its URL.

    Raises:
        PactMergeError: as :func:`check_push_ready`, or the upload failed (the message says why).
    """
    check_push_ready(repo_id)
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=os.fspath(folder), commit_message="Upload merged model")
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PactMergeError(
            f"--push-to-hub {repo_id}: upload failed ({first}); the merged folder is {folder}"
        ) from None
    return f"https://huggingface.co/{repo_id}"
