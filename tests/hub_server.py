"""A small Hugging Face Hub on 127.0.0.1: repositories from local folders, in the hub's HTTP
layout, for testing downloads and uploads by id without internet.

It answers what ``huggingface_hub`` (and through it transformers and peft) asks. Reading:

- ``GET /api/models/{repo}[/revision/{rev}]``: the repo info (``sha``, ``siblings``);
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the file listing (``recursive``);
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{file}``: a file, with ``X-Repo-Commit`` and ``ETag``.

Writing (``create_repo``, ``create_branch``, ``upload_folder``, ``create_commit``, pull
requests), for a token of a user given to ``HubServer(users=...)``:

- ``POST /api/repos/create``: a new empty repository (409 when it exists; ``private``
  makes it readable only with the creator's token);
- ``POST /api/models/{repo}/branch/{branch}``: a branch from ``startingPoint`` or ``main``;
- ``POST /api/models/{repo}/discussions`` and ``GET .../discussions/{num}``: a pull request
  (its branch is ``refs/pr/{num}``);
- ``POST /api/validate-yaml``: a README's metadata, refused as the hub refuses an empty or
  non-id ``base_model``;
- ``POST /api/models/{repo}/preupload/{rev}``: every file is ``regular`` (its content then
  comes inline in the commit), with the ``oid`` of the file already there;
- ``POST /api/models/{repo}/commit/{rev}``: the NDJSON commit (header, ``file`` entries with
  base64 content, ``deletedFile`` / ``deletedFolder``); ``create_pr=1`` commits to a new
  pull request. The new revision is served for download like an added one.

Unknown repositories, revisions and files get the hub's 404s with its ``X-Error-Code``
header; a repo marked private answers 401 without the right ``Authorization`` token; a write
without a known token is a 401, into a namespace the user does not own a 403. Each request is
recorded in ``requests`` (method, path) so tests can assert what was fetched.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["HubServer"]

_LFS_SUFFIXES = (".safetensors", ".bin")
_NAME = re.compile(r"^[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?$")
_MODEL_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")


@dataclass
class _Revision:
    folder: Path
    sha: str


@dataclass
class _Repo:
    revisions: dict[str, _Revision] = field(default_factory=dict)  # branch or tag -> files
    token: str | None = None  # private: needs this bearer token
    commits: dict[str, _Revision] = field(default_factory=dict)  # every sha ever served
    pulls: list[dict[str, Any]] = field(default_factory=list)  # pull requests, num = index + 1


class HubServer:
    """``with HubServer() as hub: hub.add("org/name", folder); hub.url``.

    ``users`` maps a token to the user's name and the other namespaces (organisations) it
    may write to: ``HubServer(users={"hf_x": ("tester", "org")})``.
    """

    def __init__(self, *, users: Mapping[str, Sequence[str]] | None = None) -> None:
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.users = {token: tuple(names) for token, names in (users or {}).items()}
        self.commit_messages: list[tuple[str, str]] = []  # (repo, summary) of each commit
        self._storage = tempfile.TemporaryDirectory(prefix="hub-server-")
        self._lock = threading.Lock()
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
        sha = _tree_digest(folder).hexdigest()
        repo = self.repos.setdefault(repo_id, _Repo())
        repo.revisions[revision] = repo.commits[sha] = _Revision(folder, sha)
        repo.token = token
        return sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (path in the repo -> content)."""
        found = self._revision(repo_id, revision)
        assert found is not None, f"{repo_id} has no revision {revision}"
        return {
            p.relative_to(found.folder).as_posix(): p.read_bytes()
            for p in sorted(found.folder.rglob("*"))
            if p.is_file()
        }

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
        self._storage.cleanup()

    # -- lookups ---------------------------------------------------------------------------

    def _revision(self, repo_id: str, rev: str) -> _Revision | None:
        repo = self.repos[repo_id]
        if rev in repo.revisions:
            return repo.revisions[rev]
        return repo.commits.get(rev)

    # -- writes ----------------------------------------------------------------------------

    def _new_revision(
        self,
        repo_id: str,
        parent: _Revision | None,
        changes: Mapping[str, bytes | None],
        message: str,
    ) -> _Revision:
        """A copy of ``parent`` with ``changes`` (path -> content, None deletes the file, a
        path ending in ``/`` the folder), stored under the server's own directory."""
        folder = Path(tempfile.mkdtemp(dir=self._storage.name))
        if parent is not None:
            shutil.copytree(parent.folder, folder, dirs_exist_ok=True)
        for path, content in changes.items():
            target = folder / path
            if content is None and path.endswith("/"):
                shutil.rmtree(target, ignore_errors=True)
            elif content is None:
                target.unlink(missing_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
        digest = _tree_digest(folder)
        digest.update(f"{parent.sha if parent else ''}\0{message}".encode())
        revision = _Revision(folder, digest.hexdigest())
        self.repos[repo_id].commits[revision.sha] = revision
        return revision


def _tree_digest(folder: Path) -> Any:
    digest = hashlib.sha1()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode())
            digest.update(hashlib.sha1(path.read_bytes()).digest())
    return digest


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._answer(head=True)

        def do_GET(self) -> None:
            self._answer(head=False)

        def do_POST(self) -> None:
            body = self._body()
            split = urlsplit(self.path)
            segments = [unquote(s) for s in split.path.strip("/").split("/")]
            hub.requests.append((self.command, unquote(split.path)))
            query = parse_qs(split.query)
            with hub._lock:  # one write at a time, as the hub orders commits
                if segments == ["api", "repos", "create"]:
                    self._create_repo(json.loads(body))
                elif segments == ["api", "validate-yaml"]:
                    self._validate_yaml(json.loads(body))
                elif len(segments) >= 5 and segments[:2] == ["api", "models"]:
                    repo_id = "/".join(segments[2:4])
                    action, rest = segments[4], "/".join(segments[5:])
                    if self._writable(repo_id) is None:
                        return
                    if action == "branch":
                        self._create_branch(repo_id, rest, json.loads(body or b"{}"))
                    elif action == "discussions":
                        self._open_pull(repo_id, json.loads(body))
                    elif action == "preupload":
                        self._preupload(repo_id, rest, json.loads(body))
                    elif action == "commit":
                        self._commit(repo_id, rest, body, "1" in query.get("create_pr", []))
                    else:
                        self._error(404, "EntryNotFound", "not found", False)
                else:
                    self._error(404, "EntryNotFound", "not found", False)

        # -- reading -----------------------------------------------------------------------

        def _answer(self, *, head: bool) -> None:
            split = urlsplit(self.path)
            segments = [unquote(s) for s in split.path.strip("/").split("/")]
            hub.requests.append((self.command, unquote(split.path)))
            if segments[:2] == ["api", "models"] and len(segments) >= 3:
                repo_id = "/".join(segments[2:4])
                if segments[4:5] == ["discussions"] and len(segments) == 6:
                    self._pull_details(repo_id, segments[5], head)
                else:
                    self._api(repo_id, segments[4:], split.query, head)
            elif "resolve" in segments[1:3]:
                at = segments.index("resolve", 1)
                repo_id = "/".join(segments[:at])
                rev = segments[at + 1] if len(segments) > at + 1 else ""
                self._file(repo_id, rev, "/".join(segments[at + 2 :]), head)
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

        def _api(self, repo_id: str, tail: list[str], query: str, head: bool) -> None:
            if self._repo_or_error(repo_id, head) is None:
                return
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

        def _pull_details(self, repo_id: str, num: str, head: bool) -> None:
            repo = self._repo_or_error(repo_id, head)
            if repo is None:
                return
            if not num.isdigit() or not 0 < int(num) <= len(repo.pulls):
                self._error(404, "EntryNotFound", f"Discussion {num} not found", head)
                return
            self._json(repo.pulls[int(num) - 1], head)

        # -- writing -----------------------------------------------------------------------

        def _user(self) -> tuple[str, ...] | None:
            """The namespaces the request's token may write to, or None (401 sent)."""
            auth = self.headers.get("Authorization") or ""
            if not auth.startswith("Bearer "):
                self._error(401, None, "Invalid username or password.", False)
                return None
            names = hub.users.get(auth.removeprefix("Bearer "))
            if names is None:
                self._error(401, None, "Invalid credentials in Authorization header", False)
                return None
            return names

        def _writable(self, repo_id: str) -> _Repo | None:
            names = self._user()
            if names is None:
                return None
            repo = self._repo_or_error(repo_id, False)
            if repo is None:
                return None
            if repo_id.split("/")[0] not in names:
                message = f"You don't have the rights to write to {repo_id}"
                self._error(403, None, message, False)
                return None
            return repo

        def _create_repo(self, payload: dict[str, Any]) -> None:
            names = self._user()
            if names is None:
                return
            name, namespace = payload.get("name") or "", payload.get("organization") or names[0]
            if not _NAME.match(name) or not _NAME.match(namespace):
                self._error(400, None, f"Invalid repo name {namespace}/{name}", False)
                return
            if payload.get("type") not in (None, "model"):
                self._error(400, None, "this hub serves models only", False)
                return
            if namespace not in names:
                message = (
                    f"You don't have the rights to create a model under the namespace {namespace!r}"
                )
                self._error(403, None, message, False)
                return
            repo_id = f"{namespace}/{name}"
            url = f"{hub.url}/{repo_id}"
            if repo_id in hub.repos:
                body = {"error": "You already created this model repo", "url": url}
                self._json(body, False, status=409)
                return
            repo = hub.repos[repo_id] = _Repo()
            if payload.get("visibility") == "private":
                repo.token = self.headers["Authorization"].removeprefix("Bearer ")
            repo.revisions["main"] = hub._new_revision(repo_id, None, {}, "initial commit")
            self._json({"url": url, "name": repo_id, "id": repo_id}, False)

        def _create_branch(self, repo_id: str, branch: str, payload: dict[str, Any]) -> None:
            repo = hub.repos[repo_id]
            start = hub._revision(repo_id, payload.get("startingPoint") or "main")
            if start is None:
                self._error(404, "RevisionNotFound", "Invalid starting point", False)
            elif branch in repo.revisions:
                self._json({"error": "Reference already exists"}, False, status=409)
            else:
                repo.revisions[branch] = start
                self._json({}, False)

        def _open_pull(self, repo_id: str, payload: dict[str, Any]) -> None:
            repo = hub.repos[repo_id]
            if not payload.get("pullRequest"):
                self._error(400, None, "this hub opens pull requests only", False)
                return
            self._json({"num": self._new_pull(repo_id, repo, payload["title"])}, False)

        def _new_pull(self, repo_id: str, repo: _Repo, title: str) -> int:
            num = len(repo.pulls) + 1
            repo.revisions[f"refs/pr/{num}"] = repo.revisions["main"]
            repo.pulls.append(
                {
                    "title": title,
                    "num": num,
                    "author": {"name": "tester"},
                    "createdAt": "2024-01-01T00:00:00.000Z",
                    "status": "draft",
                    "repo": {"name": repo_id, "type": "model"},
                    "isPullRequest": True,
                    "events": [],
                    "changes": {"base": "refs/heads/main"},
                    "filesWithConflicts": [],
                }
            )
            return num

        def _validate_yaml(self, payload: dict[str, Any]) -> None:
            errors = _metadata_errors(payload.get("content", ""))
            if errors:
                self._json({"errors": [{"message": m} for m in errors]}, False, status=400)
            else:
                self._json({"warnings": []}, False)

        def _preupload(self, repo_id: str, rev: str, payload: dict[str, Any]) -> None:
            found = hub._revision(repo_id, rev)
            if found is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", False)
                return
            files = []
            for entry in payload["files"]:
                there = found.folder / entry["path"]
                oid = _git_blob_sha(there.read_bytes()) if there.is_file() else None
                files.append(
                    {
                        "path": entry["path"],
                        "uploadMode": "regular",  # contents come inline in the commit
                        "shouldIgnore": False,
                        "oid": oid,
                    }
                )
            self._json({"files": files, "commitOid": found.sha}, False)

        def _commit(self, repo_id: str, rev: str, body: bytes, create_pr: bool) -> None:
            repo = hub.repos[repo_id]
            parent = hub._revision(repo_id, rev)
            if parent is None or rev not in repo.revisions:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", False)
                return
            header: dict[str, Any] = {}
            changes: dict[str, bytes | None] = {}
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    header = value
                elif key == "file" and value.get("encoding") == "base64":
                    changes[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    changes[value["path"]] = None
                elif key == "deletedFolder":
                    changes[value["path"].rstrip("/") + "/"] = None
                else:  # lfsFile: this hub never asks for LFS uploads
                    self._error(400, None, f"unexpected commit entry {key!r}", False)
                    return
            readme = changes.get("README.md")
            if readme is not None and (errors := _metadata_errors(readme.decode())):
                self._error(400, None, "; ".join(errors), False)
                return
            parent_commit = header.get("parentCommit")
            if parent_commit is not None and parent_commit != parent.sha:
                self._error(412, None, "A commit has happened since", False)
                return
            summary = header.get("summary", "")
            pull_url = None
            if create_pr:
                num = self._new_pull(repo_id, repo, summary)
                rev = f"refs/pr/{num}"
                pull_url = f"{hub.url}/{repo_id}/discussions/{num}"
            revision = hub._new_revision(repo_id, parent, changes, summary)
            repo.revisions[rev] = revision
            hub.commit_messages.append((repo_id, summary))
            answer = {
                "success": True,
                "commitOid": revision.sha,
                "commitUrl": f"{hub.url}/{repo_id}/commit/{revision.sha}",
                "pullRequestUrl": pull_url,
            }
            self._json(answer, False)

        # -- plumbing ----------------------------------------------------------------------

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _json(self, payload: object, head: bool, *, status: int = 200) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, code: str | None, message: str, head: bool) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            if code is not None:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

    return Handler


def _metadata_errors(readme: str) -> list[str]:
    """What the hub refuses in a README's YAML block (a subset: ``base_model``)."""
    if not readme.startswith("---"):
        return []
    block = readme.split("\n---", 1)[0].removeprefix("---")
    try:
        data = yaml.safe_load(block) or {}
    except yaml.YAMLError as exc:
        return [f"Invalid YAML in README.md metadata: {exc}"]
    if not isinstance(data, dict):
        return ["README.md metadata must be a mapping"]
    if "base_model" not in data:
        return []
    base = data["base_model"]
    names = base if isinstance(base, list) else [base]
    if not names or any(not n for n in names):
        return ['"base_model" is not allowed to be empty']
    bad = [str(n) for n in names if not isinstance(n, str) or not _MODEL_ID.match(n)]
    return [f'"base_model" with value "{n}" is not a valid model id' for n in bad]


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
