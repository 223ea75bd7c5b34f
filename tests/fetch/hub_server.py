"""A local HTTP server speaking the part of the Hugging Face Hub's API that
``hf_hub_download`` uses, plus plain files for URL sources. Tests point ``HF_ENDPOINT`` at it,
so nothing reaches the internet.

What huggingface_hub asks (file_download.py): ``HEAD /{repo}/resolve/{revision}/{file}``,
whose answer must carry ``X-Repo-Commit`` and an ``ETag`` (and ``Content-Length``), then a
``GET`` of the same URL, with ``Range: bytes=N-`` when an ``.incomplete`` blob is resumed.
Errors are told apart by ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo). ``/api/models/{repo}/revision/{revision}`` answers the model info too.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

_RESOLVE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)/revision/(?P<rev>[^/]+)$")


@dataclass
class Repo:
    files: dict[str, bytes]
    revisions: tuple[str, ...] = ("main",)
    token: str | None = None  # gated: only this token may read it

    def commit(self, revision: str) -> str:
        return hashlib.sha1(f"{revision}:{sorted(self.files)}".encode()).hexdigest()


@dataclass
class Hub:
    repos: dict[str, Repo] = field(default_factory=dict)
    plain: dict[str, bytes] = field(default_factory=dict)  # /files/<name>, for URL sources
    cut_after: dict[str, int] = field(default_factory=dict)  # file name: hang up mid-body, once
    # (method, path, headers with lower-case names)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    url: str = ""

    def file_url(self) -> str:
        return f"{self.url}/files/"


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _send(
            self, status: int, headers: dict[str, str], data: bytes = b"", body: bool = True
        ) -> None:
            self.send_response(status)
            headers.setdefault("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _answer(self, body: bool) -> None:
            hub.requests.append(
                (self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
            )
            path = self.path.split("?", 1)[0]
            if path.startswith("/files/"):
                return self._plain(unquote(path[len("/files/") :]), body)
            info = _INFO.match(path)
            if info:
                return self._info(unquote(info["repo"]), unquote(info["rev"]), body)
            match = _RESOLVE.match(path)
            if match is None:
                return self._send(404, {}, b"not found", body)
            repo_id, revision, name = (unquote(match[k]) for k in ("repo", "rev", "file"))
            repo = self._repo(repo_id, revision, body)
            if repo is None:
                return None
            commit = repo.commit(revision)
            data = repo.files.get(name)
            if data is None:
                error = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}
                return self._send(404, error, b"Entry not found", body)
            headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            self._ranged(name, data, headers, body)

        def _repo(self, repo_id: str, revision: str, body: bool) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._send(401, {"X-Error-Code": "RepoNotFound"}, b"Repository not found", body)
                return None
            if repo.token is not None:
                given = self.headers.get("Authorization", "")
                if given != f"Bearer {repo.token}":
                    status = 403 if given else 401
                    message = {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"}
                    self._send(status, message, b"Access to this repo is restricted", body)
                    return None
            if revision not in repo.revisions and revision != repo.commit("main"):
                self._send(404, {"X-Error-Code": "RevisionNotFound"}, b"no revision", body)
                return None
            return repo

        def _info(self, repo_id: str, revision: str, body: bool) -> None:
            repo = self._repo(repo_id, revision, body)
            if repo is not None:
                info = {
                    "id": repo_id,
                    "sha": repo.commit(revision),
                    "siblings": [{"rfilename": name} for name in sorted(repo.files)],
                }
                data = json.dumps(info).encode()
                self._send(200, {"Content-Type": "application/json"}, data, body)

        def _plain(self, name: str, body: bool) -> None:
            data = hub.plain.get(name)
            if data is None:
                return self._send(404, {}, b"no such file", body)
            self._ranged(name, data, {}, body)

        def _ranged(self, name: str, data: bytes, headers: dict[str, str], body: bool) -> None:
            cut = hub.cut_after.pop(name, None) if body else None
            if cut is not None:  # promise the whole file, send part of it, hang up
                self.send_response(200)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:cut])
                self.wfile.flush()
                self.close_connection = True
                return None
            wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if wanted is None:
                return self._send(200, headers, data, body)
            start = int(wanted[1])
            if start >= len(data):
                return self._send(416, {"Content-Range": f"bytes */{len(data)}"}, b"", body)
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self._send(206, headers, data[start:], body)

    return Handler


@contextmanager
def serving(hub: Hub) -> Iterator[Hub]:
    """Serve ``hub`` on a free local port for the duration of the block."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
