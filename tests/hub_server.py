"""A small Hugging Face Hub on 127.0.0.1: repositories from local folders, in the hub's HTTP
layout, for testing downloads by id without internet.

It answers what ``huggingface_hub`` (and through it transformers and peft) asks:

- ``GET /api/models/{repo}[/revision/{rev}]``: the repo info (``sha``, ``siblings``);
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the file listing (``recursive``);
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{file}``: a file, with ``X-Repo-Commit`` and ``ETag``.

Unknown repositories, revisions and files get the hub's 404s with its ``X-Error-Code``
header; a repo marked private answers 401 without the right ``Authorization`` token. Each
request is recorded in ``requests`` (method, path) so tests can assert what was fetched.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

__all__ = ["HubServer"]

_LFS_SUFFIXES = (".safetensors", ".bin")


@dataclass
class _Revision:
    folder: Path
    sha: str


@dataclass
class _Repo:
    revisions: dict[str, _Revision] = field(default_factory=dict)  # branch or tag -> files
    token: str | None = None  # private: needs this bearer token


class HubServer:
    """``with HubServer() as hub: hub.add("org/name", folder); hub.url``."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add(
        self, repo_id: str, folder: Path, *, revision: str = "main", token: str | None = None
    ) -> str:
        """Serve ``folder`` as ``repo_id`` at ``revision``; returns the commit sha."""
        digest = hashlib.sha1()
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                digest.update(path.relative_to(folder).as_posix().encode())
                digest.update(hashlib.sha1(path.read_bytes()).digest())
        sha = digest.hexdigest()
        repo = self.repos.setdefault(repo_id, _Repo())
        repo.revisions[revision] = _Revision(folder, sha)
        repo.token = token
        return sha

    def downloads(self) -> list[str]:
        """The files fetched with GET so far (``repo/file``)."""
        out = []
        for method, path in self.requests:
            parts = path.split("/resolve/", 1)
            if method == "GET" and len(parts) == 2:
                out.append(f"{parts[0].strip('/')}/{parts[1].split('/', 1)[1]}")
        return out

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # -- lookups ---------------------------------------------------------------------------

    def _revision(self, repo_id: str, rev: str) -> _Revision | None:
        repo = self.repos[repo_id]
        if rev in repo.revisions:
            return repo.revisions[rev]
        return next((r for r in repo.revisions.values() if r.sha == rev), None)


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._answer(head=True)

        def do_GET(self) -> None:
            self._answer(head=False)

        def _answer(self, *, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            query = urlsplit(self.path).query
            hub.requests.append((self.command, path))
            if path.startswith("/api/models/"):
                self._api(path.removeprefix("/api/models/"), query, head)
            elif "/resolve/" in path:
                repo_id, _, rest = path.strip("/").partition("/resolve/")
                rev, _, filename = rest.partition("/")
                self._file(repo_id, rev, filename, head)
            else:
                self._error(404, "EntryNotFound", "not found", head)

        def _repo_or_error(self, repo_id: str, head: bool) -> _Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(401, "RepoNotFound", "Repository not found", head)
                return None
            if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                self._error(401, "RepoNotFound", "Invalid credentials", head)
                return None
            return repo

        def _api(self, rest: str, query: str, head: bool) -> None:
            parts = rest.split("/")
            repo_id = "/".join(parts[:2])
            if self._repo_or_error(repo_id, head) is None:
                return
            tail = parts[2:]
            rev = tail[1] if len(tail) >= 2 and tail[0] in ("revision", "tree") else "main"
            found = hub._revision(repo_id, rev)
            if found is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
                return
            files = sorted(p for p in found.folder.rglob("*") if p.is_file())
            if tail and tail[0] == "tree":
                sub = "/".join(tail[2:])
                recursive = "recursive=true" in query.lower() or "recursive=True" in query
                self._json(_tree(found.folder, files, sub, recursive), head)
                return
            info = {
                "_id": repo_id,
                "id": repo_id,
                "modelId": repo_id,
                "sha": found.sha,
                "private": bool(hub.repos[repo_id].token),
                "gated": False,
                "disabled": False,
                "tags": [],
                "siblings": [{"rfilename": p.relative_to(found.folder).as_posix()} for p in files],
            }
            self._json(info, head)

        def _file(self, repo_id: str, rev: str, filename: str, head: bool) -> None:
            if self._repo_or_error(repo_id, head) is None:
                return
            found = hub._revision(repo_id, rev)
            if found is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
                return
            path = found.folder / filename
            if not filename or not path.is_file():
                self._error(404, "EntryNotFound", f"{filename} does not exist", head)
                return
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Repo-Commit", found.sha)
            self.send_header("ETag", f'"{_etag(path, data)}"')
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def _json(self, payload: object, head: bool) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str, head: bool) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

    return Handler


def _etag(path: Path, data: bytes) -> str:
    if path.suffix in _LFS_SUFFIXES:  # LFS files: the sha256 of the content, as the hub
        return hashlib.sha256(data).hexdigest()
    return _git_blob_sha(data)


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _tree(root: Path, files: list[Path], sub: str, recursive: bool) -> list[dict[str, object]]:
    entries: list[dict[str, object]] = []
    seen_dirs: set[str] = set()
    prefix = f"{sub.strip('/')}/" if sub.strip("/") else ""
    for path in files:
        rel = path.relative_to(root).as_posix()
        if not rel.startswith(prefix):
            continue
        inner = rel[len(prefix) :]
        if "/" in inner and not recursive:
            folder = prefix + inner.split("/", 1)[0]
            if folder not in seen_dirs:
                seen_dirs.add(folder)
                entries.append({"type": "directory", "oid": "0" * 40, "path": folder})
            continue
        if recursive:
            parts = rel.split("/")[:-1]
            for i in range(len(prefix.split("/")) - 1, len(parts)):
                folder = "/".join(parts[: i + 1])
                if folder and folder not in seen_dirs:
                    seen_dirs.add(folder)
                    entries.append({"type": "directory", "oid": "0" * 40, "path": folder})
        data = path.read_bytes()
        entry: dict[str, object] = {
            "type": "file",
            "oid": _git_blob_sha(data),
            "size": len(data),
            "path": rel,
        }
        if path.suffix in _LFS_SUFFIXES:
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                            "pointerSize": 134}  # fmt: skip
        entries.append(entry)
    return entries
