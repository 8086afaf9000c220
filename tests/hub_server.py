"""A fake Hugging Face hub: a real local HTTP server with the endpoints huggingface_hub uses.

Enough for `HfApi().model_info(..., files_metadata=True)`, `list_repo_tree`, `hf_hub_download`
and `snapshot_download` (huggingface_hub 0.36), pointed at it with HF_ENDPOINT:

- `GET /api/models/{repo}` and `/api/models/{repo}/revision/{revision}`: the repo's commit and
  its files (`siblings`) with size, git blob id and, for LFS files, sha256.
- `GET /api/models/{repo}/tree/{revision}[/{path}]`: the file listing.
- `HEAD`/`GET /{repo}/resolve/{revision}/{path}`: small files are served directly with
  `X-Repo-Commit`, `ETag` (the git blob id) and `Content-Length`; LFS files (`*.safetensors`)
  answer 302 with `Location` on the fake CDN, `X-Linked-Etag` (their sha256), `X-Linked-Size`.
- `HEAD`/`GET /cdn/{sha256}`: LFS content, with `Range` support.

Unknown repos, revisions and files get 404 with the `X-Error-Code` huggingface_hub maps to its
errors. Every request is logged in `requests` as (method, path) for tests to inspect.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")


@dataclass
class HubFile:
    path: str
    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def blob_id(self) -> str:
        return hashlib.sha1(f"blob {len(self.content)}\0".encode() + self.content).hexdigest()

    def sibling(self) -> dict:
        entry = {"rfilename": self.path, "size": len(self.content), "blobId": self.blob_id}
        if self.lfs:
            entry["lfs"] = {"size": len(self.content), "sha256": self.sha256, "pointerSize": 134}
        return entry


@dataclass
class Repo:
    repo_id: str
    files: dict[str, HubFile] = field(default_factory=dict)

    @property
    def commit(self) -> str:
        digest = hashlib.sha1()
        for path in sorted(self.files):
            digest.update(f"{path}\0{self.files[path].blob_id}\n".encode())
        return digest.hexdigest()

    def at(self, revision: str | None) -> bool:
        return revision in (None, "main", self.commit)


class FakeHub:
    """`with FakeHub() as hub: hub.add_directory("org/name", path); env HF_ENDPOINT=hub.url`."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- content -------------------------------------------------------------------------------
    def add_file(self, repo_id: str, path: str, content: bytes) -> None:
        repo = self.repos.setdefault(repo_id, Repo(repo_id))
        repo.files[path] = HubFile(path, content, path.endswith(LFS_SUFFIXES))

    def add_directory(self, repo_id: str, directory: Path, prefix: str = "") -> None:
        for path in sorted(Path(directory).rglob("*")):
            if path.is_file():
                name = prefix + path.relative_to(directory).as_posix()
                self.add_file(repo_id, name, path.read_bytes())

    def file(self, repo_id: str, path: str) -> HubFile:
        return self.repos[repo_id].files[path]

    def content_downloads(self) -> list[str]:
        """Paths of the requests that sent file content (GET on resolve or the CDN)."""
        return [p for m, p in self.requests if m == "GET" and ("/resolve/" in p or "/cdn/" in p)]

    # -- server --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "start the hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # quiet
        return

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    # -- routing -------------------------------------------------------------------------------
    def _route(self, head: bool) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        self.hub.requests.append((self.command, path))
        segments = [unquote(s) for s in path.strip("/").split("/")]
        if segments[:2] == ["api", "models"] and len(segments) >= 4:
            return self._api(segments[2:], head)
        if segments[0] == "cdn" and len(segments) == 2:
            return self._cdn(segments[1], head)
        if len(segments) >= 5 and segments[2] == "resolve":
            repo_id = "/".join(segments[:2])
            return self._resolve(repo_id, segments[3], "/".join(segments[4:]), head)
        return self._error(404, "EntryNotFound", f"no route for {path}", head)

    def _api(self, rest: list[str], head: bool) -> None:
        repo = self.hub.repos.get("/".join(rest[:2]))
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found", head)
        tail = rest[2:]
        if not tail or tail[0] == "revision":
            revision = tail[1] if len(tail) > 1 else None
            if not repo.at(revision):
                return self._error(404, "RevisionNotFound", "Invalid rev id", head)
            return self._json(
                {
                    "id": repo.repo_id,
                    "modelId": repo.repo_id,
                    "sha": repo.commit,
                    "private": False,
                    "gated": False,
                    "disabled": False,
                    "siblings": [f.sibling() for f in repo.files.values()],
                },
                head,
            )
        if tail[0] == "tree" and len(tail) >= 2:
            if not repo.at(tail[1]):
                return self._error(404, "RevisionNotFound", "Invalid rev id", head)
            under = "/".join(tail[2:])
            entries = []
            for f in repo.files.values():
                if under and not f.path.startswith(under + "/"):
                    continue
                entry = {"type": "file", "oid": f.blob_id, "size": len(f.content), "path": f.path}
                if f.lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": len(f.content), "pointerSize": 134}
                entries.append(entry)
            return self._json(entries, head)
        return self._error(404, "EntryNotFound", "unknown API path", head)

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found", head)
        if not repo.at(revision):
            return self._error(404, "RevisionNotFound", "Invalid rev id", head)
        f = repo.files.get(path)
        if f is None:
            return self._error(404, "EntryNotFound", "Entry not found", head, repo.commit)
        if f.lfs:
            self.send_response(302)
            self.send_header("Location", f"{self.hub.url}/cdn/{f.sha256}")
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{f.blob_id}"')
            self.send_header("X-Linked-Etag", f'"{f.sha256}"')
            self.send_header("X-Linked-Size", str(len(f.content)))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._content(f.content, head, {"X-Repo-Commit": repo.commit, "ETag": f'"{f.blob_id}"'})

    def _cdn(self, sha256: str, head: bool) -> None:
        for repo in self.hub.repos.values():
            for f in repo.files.values():
                if f.lfs and f.sha256 == sha256:
                    return self._content(f.content, head, {"ETag": f'"{sha256}"'})
        return self._error(404, "EntryNotFound", "no such object", head)

    # -- responses -----------------------------------------------------------------------------
    def _content(self, content: bytes, head: bool, headers: dict[str, str]) -> None:
        start = 0
        requested = self.headers.get("Range", "")
        if requested.startswith("bytes="):
            first, _, last = requested[len("bytes=") :].partition("-")
            start = int(first or 0)
            end = min(int(last), len(content) - 1) if last else len(content) - 1
            body = content[start : end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(content)}")
        else:
            body = content
            self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, payload, head: bool) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(
        self, status: int, code: str, message: str, head: bool, commit: str | None = None
    ) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
