"""A tiny stand-in for the Hugging Face hub, for tests that cannot reach the real one.

It serves, from memory, just the routes ``huggingface_hub.snapshot_download`` uses (read from
huggingface_hub's ``hf_api.py``, ``_snapshot_download.py`` and ``file_download.py``):

- ``GET /api/models/{repo}[/revision/{rev}]``: repo info with ``sha`` and ``siblings``;
- ``GET /api/models/{repo}/tree/{rev}``: the file listing (``type``, ``path``, ``size``, ``oid``);
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: the file, with ``ETag``, ``X-Repo-Commit``
  and ``Content-Length`` (the HEAD metadata the client insists on).

Unknown repos answer 404 with ``X-Error-Code: RepoNotFound``, as the hub does, so the client
raises ``RepositoryNotFoundError``. Use it as a context manager; ``url`` is the endpoint.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]], commit: str = "a" * 40):
        self.repos = repos
        self.commit = commit
        self.requests: list[tuple[str, str]] = []  # (method, path), for assertions
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ routing

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                hub._route(self, body=True)

            def do_HEAD(self):
                hub._route(self, body=False)

        return Handler

    def _route(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(req.path).path)
        self.requests.append((req.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if repo_id not in self.repos:
                return self._not_found(req, "RepoNotFound")
            if not rest or rest[0] == "revision":
                return self._json(req, self._info(repo_id), body)
            if rest[0] == "tree":
                return self._json(req, self._tree(repo_id), body)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, filename = "/".join(parts[:2]), "/".join(parts[4:])
            if repo_id not in self.repos:
                return self._not_found(req, "RepoNotFound")
            if filename not in self.repos[repo_id]:
                return self._not_found(req, "EntryNotFound")
            return self._file(req, self.repos[repo_id][filename], body)
        return self._not_found(req, "RepoNotFound")

    def _info(self, repo_id: str) -> dict:
        files = self.repos[repo_id]
        return {
            "id": repo_id,
            "modelId": repo_id,
            "sha": self.commit,
            "private": False,
            "siblings": [{"rfilename": name} for name in files],
        }

    def _tree(self, repo_id: str) -> list[dict]:
        return [
            {"type": "file", "path": name, "size": len(data), "oid": _git_oid(data)}
            for name, data in self.repos[repo_id].items()
        ]

    # ------------------------------------------------------------------ responses

    def _json(self, req, payload, body: bool) -> None:
        data = json.dumps(payload).encode()
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if body:
            req.wfile.write(data)

    def _file(self, req, data: bytes, body: bool) -> None:
        req.send_response(200)
        req.send_header("Content-Type", "application/octet-stream")
        req.send_header("Content-Length", str(len(data)))
        req.send_header("ETag", f'"{_git_oid(data)}"')
        req.send_header("X-Repo-Commit", self.commit)
        req.end_headers()
        if body:
            req.wfile.write(data)

    def _not_found(self, req, code: str) -> None:
        data = json.dumps({"error": f"{code}"}).encode()
        req.send_response(404)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.send_header("X-Error-Code", code)
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(data)


def _git_oid(data: bytes) -> str:
    """The git blob id, which is what the hub reports as ``oid``/ETag for non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
