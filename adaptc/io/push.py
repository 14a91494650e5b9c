"""``push_adapter``: a compiled model's adapters uploaded to the Hugging Face Hub, as
``PeftModel.push_to_hub`` uploads them.

PEFT's ``push_to_hub`` is transformers' ``PushToHubMixin``: ``create_repo(exist_ok=True)``,
``save_pretrained`` into a temporary directory, the model card, one commit. adaptc does the
same with :func:`adaptc.save_adapter` (so the repository holds PEFT's files, the adaptc spec
and ``README.md``) and huggingface_hub's ``upload_folder``:

>>> adaptc.io.push_adapter(model, "me/opt-lora", private=True)   # doctest: +SKIP

Authentication, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are huggingface_hub's. Where PEFT
uploads the card it finds on the Hub (losing the metadata it wrote itself), adaptc updates
that card with its metadata. Every failure on the Hub's side is one :class:`HubError` line
naming the repository.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from adaptc.compiler import compiled
from adaptc.hub import HubError, _first_line
from adaptc.io.card import CARD_NAME, model_card
from adaptc.io.save import save_adapter

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, HfApi

__all__ = ["push_adapter", "push_files"]


def push_adapter(
    model: nn.Module,
    repo_id: str,
    *,
    adapters: Sequence[str] | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload adapter",
    commit_description: str | None = None,
    create_pr: bool = False,
    tags: Sequence[str] | None = None,
) -> CommitInfo:
    """Upload ``model``'s adapters (all, or those named) to the Hub repository ``repo_id``.

    The repository is created when missing (``private`` applies then only, as on the Hub);
    ``revision`` is the branch to commit to (created from ``main`` when missing);
    ``create_pr`` opens a pull request against ``main`` instead of committing; ``tags`` are
    added to the model card. ``token`` None reads ``HF_TOKEN`` or the stored login; False
    sends none. Returns huggingface_hub's ``CommitInfo`` (a ``str``: the commit's URL;
    ``.oid``, ``.pr_url``).
    """
    from huggingface_hub import HfApi

    info = compiled(model, "push_adapter()")
    if create_pr and revision not in (None, "main"):
        raise ValueError(
            f"push_adapter(): create_pr opens a pull request against main; "
            f"pass revision=None (got {revision!r})"
        )
    with tempfile.TemporaryDirectory(prefix="adaptc-push-") as tmp:
        folder = save_adapter(model, Path(tmp) / "adapter", adapters=adapters)  # local first
        api = HfApi()
        try:
            repo = _open_repo(api, repo_id, private, token, revision)
            remote = _remote_card(api, repo, revision, token, Path(tmp) / "cache")
        except Exception as exc:  # huggingface_hub and httpx raise many kinds; one line each
            raise HubError(_push_error(exc, repo_id, revision, token)) from None
        if remote is not None or tags:
            spec = info.spec
            if adapters is not None:
                spec = spec.with_adapters({n: spec.adapter(n) for n in adapters})
            text = model_card(
                model, spec, existing=remote, tags=tags or (), where=f"{CARD_NAME} of {repo}"
            )
            (folder / CARD_NAME).write_text(text, encoding="utf-8")
        try:
            return api.upload_folder(
                repo_id=repo,
                folder_path=folder,
                commit_message=commit_message,
                commit_description=commit_description,
                token=token,
                revision=revision,
                create_pr=create_pr,
            )
        except Exception as exc:  # as above
            raise HubError(_push_error(exc, repo_id, revision, token)) from None


def push_files(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload files",
    commit_description: str | None = None,
    create_pr: bool = False,
    what: str = "the files",
) -> CommitInfo:
    """Upload the files of ``folder`` to ``repo_id`` (created when missing) as
    :func:`push_adapter` does, with its one-line errors (``what`` names the upload)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        repo = _open_repo(api, repo_id, private, token, revision)
        return api.upload_folder(
            repo_id=repo, folder_path=folder, commit_message=commit_message,
            commit_description=commit_description, token=token, revision=revision,
            create_pr=create_pr,
        )  # fmt: skip
    except Exception as exc:  # huggingface_hub and httpx raise many kinds; one line each
        raise HubError(_push_error(exc, repo_id, revision, token, what)) from None


def _open_repo(
    api: HfApi, repo_id: str, private: bool | None, token: str | bool | None, revision: str | None
) -> str:
    """Create the repository (and the branch ``revision``) when missing; its full id."""
    repo: str = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo, branch=revision, token=token, exist_ok=True)
    return repo


def _remote_card(
    api: HfApi, repo_id: str, revision: str | None, token: str | bool | None, cache: Path
) -> str | None:
    """The repository's ``README.md`` (to update rather than replace), or None."""
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = api.hf_hub_download(
            repo_id, CARD_NAME, revision=revision, token=token, cache_dir=str(cache)
        )
    except EntryNotFoundError:
        return None
    return Path(path).read_text(encoding="utf-8")


def _push_error(
    exc: BaseException,
    repo_id: str,
    revision: str | None,
    token: str | bool | None,
    what: str = "the adapter",
) -> str:
    import httpx2
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id}@{revision}" if revision else repo_id
    cannot = f"cannot push {what} to {at}"
    if isinstance(exc, HFValidationError):
        return f"{repo_id!r} is not a valid hub id ({_first_line(exc)})"
    if isinstance(exc, OfflineModeIsEnabled):
        return f"{cannot}: HF_HUB_OFFLINE is set; unset it to upload"
    response = exc.response if isinstance(exc, HfHubHTTPError) else None
    status = response.status_code if response is not None else None
    server = exc.server_message if isinstance(exc, HfHubHTTPError) else None
    said = _first_line(ValueError(server) if server else exc)
    if status == 401:
        if token is False or (token is None and get_token() is None):
            return (
                f"{cannot}: not logged in to the Hub ({constants.ENDPOINT}): log in with a "
                "token that can write (`hf auth login`) or set HF_TOKEN"
            )
        return (
            f"{cannot}: the Hub ({constants.ENDPOINT}) refused the token (401: {said}): log "
            "in again (`hf auth login`) or set HF_TOKEN to a token that can write"
        )
    if status == 403:
        return f"{cannot}: the token may not write there (403: {said})"
    if isinstance(exc, RevisionNotFoundError):
        return f"{cannot}: the repository has no revision {revision or 'main'!r}"
    if isinstance(exc, RepositoryNotFoundError):
        return f"{cannot}: no such repository on the Hub, or the token cannot see it"
    if status is not None:
        return f"{cannot}: the Hub refused it ({status}: {said})"
    if isinstance(exc, httpx2.TransportError | ConnectionError | OSError):
        return (
            f"{cannot}: the Hub at {constants.ENDPOINT} cannot be reached ({_first_line(exc)}): "
            "check the network, or HF_ENDPOINT"
        )
    if isinstance(exc, ValueError):  # e.g. huggingface_hub's check of README.md's metadata:
        lines = [line.strip().removeprefix("- ") for line in str(exc).splitlines()]
        return f"{cannot}: " + " ".join(line for line in lines if line)  # its reasons follow
    return f"{cannot}: {type(exc).__name__}: {_first_line(exc)}"
