"""Models, adapters and configs named by a hub id, fetched as transformers and peft fetch them.

Downloads go through ``huggingface_hub``: its cache (``HF_HOME``, ``HF_HUB_CACHE`` or
``cache_dir``), ``revision`` (branch, tag or commit), the token from ``HF_TOKEN`` or
``hf auth login``, ``HF_ENDPOINT``, its progress bars, and ``HF_HUB_OFFLINE=1`` (the
cache only). Every failure becomes one :class:`HubError` line naming the id.

>>> folder = snapshot("ybelkada/opt-350m-lora", what="adapter")     # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "ADAPTER_FILES",
    "CHECKPOINT_FILES",
    "HubError",
    "download_file",
    "is_hub_id",
    "snapshot",
]

# ``org/name`` or a bare ``name`` (the hub's legacy canonical models, e.g. ``gpt2``)
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")

# What an adapter repository holds (top level, and one level of named sub-adapters).
ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "adaptc_spec.yaml",
    "*/adapter_config.json",
    "*/adapter_model.safetensors",
    "*/adapter_model.bin",
)
# What a merge needs of a model repository: the safetensors weights and the small files
# beside them (config, tokenizer, chat template, a custom model's code, which the merged
# checkpoint needs and adaptc never runs); not the other weight formats.
CHECKPOINT_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.txt",
    "*.model",
    "*.jinja",
    "*.tiktoken",
    "*.py",
)


class HubError(ValueError):
    """A hub id could not be fetched (one line: the id, the reason, what to do)."""


def is_hub_id(text: str) -> bool:
    """Whether ``text`` can name a hub repository (and is not a path)."""
    return bool(_HUB_ID.match(text)) and not text.startswith(".") and ".." not in text


def snapshot(
    repo_id: str,
    *,
    what: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_patterns: Sequence[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local snapshot folder of ``repo_id`` (downloaded unless cached and current).

    ``what`` names the repository in errors (``model``, ``adapter``); ``allow_patterns``
    limits the files fetched (all when None); ``token`` None reads ``HF_TOKEN`` or the
    stored login, as huggingface_hub does.
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=None if cache_dir is None else str(cache_dir),
                allow_patterns=None if allow_patterns is None else list(allow_patterns),
                token=token,
                local_files_only=local_files_only,
            )
        )
    except Exception as exc:  # huggingface_hub raises many kinds; each becomes one line
        raise HubError(
            _explain(exc, repo_id, what, revision, local_only=local_files_only)
        ) from None


def download_file(
    repo_id: str,
    filename: str,
    *,
    what: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
) -> Path:
    """One file of ``repo_id`` (e.g. ``config.json``): its path in the local cache."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                cache_dir=None if cache_dir is None else str(cache_dir),
                token=token,
            )
        )
    except Exception as exc:  # as in snapshot()
        raise HubError(_explain(exc, repo_id, what, revision, filename)) from None


def _explain(
    exc: BaseException,
    repo_id: str,
    what: str,
    revision: str | None,
    filename: str | None = None,
    *,
    local_only: bool = False,
) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id}@{revision}" if revision else repo_id
    name = f"the {what} {at}"
    if isinstance(exc, HFValidationError):
        return f"{repo_id!r} is not a local path and not a valid hub id ({_first_line(exc)})"
    if isinstance(exc, GatedRepoError):
        return (
            f"{name} is gated on the Hub: accept its conditions on its page, then log in "
            "(`hf auth login`) or set HF_TOKEN"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return (
            f"{name}: no such repository on the Hub ({constants.ENDPOINT}), or it is private: "
            "log in (`hf auth login`) or set HF_TOKEN"
        )
    if isinstance(exc, RevisionNotFoundError):
        return f"{name}: the repository has no revision {revision or 'main'!r}"
    if isinstance(exc, RemoteEntryNotFoundError):
        return f"{name} has no file {filename or ''}".rstrip()
    if isinstance(exc, LocalEntryNotFoundError | FileNotFoundError):
        if local_only:
            return f"{name} is not in the Hugging Face cache (local_files_only)"
        if constants.HF_HUB_OFFLINE:
            return (
                f"{name} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                f"download it where there is network (`hf download {repo_id}`), or unset "
                "HF_HUB_OFFLINE"
            )
        return (
            f"{name} could not be downloaded from {constants.ENDPOINT} and is not in the "
            f"Hugging Face cache: check the network (`hf download {repo_id}` fills the cache)"
        )
    if isinstance(exc, OSError | ConnectionError):
        return f"cannot download {name} from {constants.ENDPOINT}: {_first_line(exc)}"
    return f"cannot download {name}: {type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
