"""A fake Hugging Face Hub on 127.0.0.1 for end-to-end push / pull tests (stdlib only, files in memory).

It answers the requests that huggingface_hub 2.4 makes for ``create_repo``, ``upload_folder`` /
``create_commit`` (regular uploads only: it never asks for LFS or Xet), ``model_info`` / ``repo_info`` and
``hf_hub_download`` (so ``from_pretrained`` works through it):

    GET  /api/agent-harnesses                       -> 404 (the client ignores it)
    GET  /api/whoami-v2                             -> {"name": ...}
    POST /api/repos/create                          -> {"url": ...}; 409 if it exists
    POST /api/validate-yaml                         -> {} (400 with "errors" if the YAML does not parse)
    POST /api/models/<repo>/preupload/<rev>         -> every file "regular", with the stored blob's git oid
    POST /api/models/<repo>/commit/<rev>            -> applies the NDJSON commit (header, file, deletedFile)
    GET  /api/models/<repo>[/revision/<rev>]        -> model info with "sha" and "siblings"
    HEAD|GET /<repo>/resolve/<rev>/<path>           -> the file, with X-Repo-Commit and ETag headers

Auth: ``FakeHub(tokens={"hf_good"})`` accepts only those bearer tokens (anything else -> 401 "Invalid
credentials in Authorization header", like the Hub); ``tokens=None`` accepts any. Failures can be injected
with ``hub.fail("POST", "/commit/", status=500)``. The server stops itself after ``max_lifetime_s`` seconds or
``max_requests`` requests, whichever comes first, and every connection has a socket timeout, so a test that
forgets to stop it cannot hang the suite.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

__all__ = ["FakeHub", "git_blob_oid"]


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


@dataclass
class _Repo:
    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> snapshot
    head: str = "0" * 40
    messages: list[str] = field(default_factory=list)

    @property
    def files(self) -> dict[str, bytes]:
        return self.commits.get(self.head, {})


@dataclass
class _Failure:
    method: str
    pattern: re.Pattern
    status: int
    times: int


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API_MODEL = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_PREUPLOAD = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$")
_COMMIT = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$")


class FakeHub:
    """See the module docstring. Use as a context manager or call ``start()`` / ``stop()``."""

    def __init__(
        self,
        *,
        tokens: set[str] | None = None,
        user: str = "user",
        max_lifetime_s: float = 120.0,
        max_requests: int = 2000,
        max_body_bytes: int = 64 * 2**20,
    ):
        self.tokens = tokens
        self.user = user
        self.max_lifetime_s = max_lifetime_s
        self.max_requests = max_requests
        self.max_body_bytes = max_body_bytes
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._failures: list[_Failure] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake Hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        handler = type("_Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()
        self._timer = threading.Timer(self.max_lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ test helpers
    def fail(self, method: str, path_regex: str, *, status: int = 500, times: int = 1) -> None:
        """Answer the next ``times`` requests matching ``method`` and ``path_regex`` with ``status``."""
        with self._lock:
            self._failures.append(_Failure(method.upper(), re.compile(path_regex), status, times))

    def files(self, repo_id: str) -> dict[str, bytes]:
        with self._lock:
            return dict(self.repos[repo_id].files)

    def paths(self, method: str | None = None) -> list[str]:
        return [p for m, p in self.requests if method is None or m == method]

    # ------------------------------------------------------------------ request handling (under the lock)
    def _injected(self, method: str, path: str) -> int | None:
        for failure in self._failures:
            if failure.times > 0 and failure.method == method and failure.pattern.search(path):
                failure.times -= 1
                return failure.status
        return None

    def _new_commit(self, repo: _Repo, files: dict[str, bytes], message: str) -> str:
        sha = hashlib.sha1(f"{repo.head}{time.time_ns()}{message}{len(repo.commits)}".encode()).hexdigest()
        repo.commits[sha] = files
        repo.head = sha
        repo.messages.append(message)
        return sha


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    timeout = 10  # seconds of idle keep-alive before the connection is dropped

    def log_message(self, format, *args):
        pass

    # ---------------------------------------------------------------- plumbing
    def _send(
        self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False
    ):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict[str, str] | None = None, head: bool = False):
        body = json.dumps(payload).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})}, head=head)

    def _error(self, status: int, message: str, code: str | None = None, head: bool = False):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers, head=head)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.hub.max_body_bytes:
            raise ValueError(f"request body of {length} bytes is over the fake Hub's limit")
        return self.rfile.read(length) if length else b""

    def _token_ok(self) -> bool:
        if self.hub.tokens is None:
            return True
        auth = self.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and auth[len("Bearer ") :] in self.hub.tokens

    def _has_token(self) -> bool:
        return self.headers.get("Authorization", "").startswith("Bearer ")

    def _dispatch(self, method: str):
        path = unquote(urlsplit(self.path).path)
        hub = self.hub
        body = self._body() if method == "POST" else b""
        with hub._lock:
            hub.requests.append((method, path))
            over_budget = len(hub.requests) > hub.max_requests
            injected = hub._injected(method, path)
        if over_budget:
            self._error(503, "fake Hub request budget exhausted")
            threading.Thread(target=hub.stop, daemon=True).start()
            return
        if injected is not None:
            self._error(injected, f"injected failure {injected}")
            return
        head = method == "HEAD"
        # Writes need a valid token; reads with an invalid token are refused like on the Hub.
        if (method == "POST" or self._has_token()) and not self._token_ok():
            self._error(401, "Invalid credentials in Authorization header", head=head)
            return
        try:
            self._route(method, path, body, head)
        except (ValueError, KeyError) as err:
            self._error(400, f"bad request: {err}")

    def _route(self, method: str, path: str, body: bytes, head: bool):
        hub = self.hub
        if method == "GET" and path == "/api/whoami-v2":
            return self._json(200, {"name": hub.user, "type": "user", "orgs": []})
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body or b"{}")
            if payload.get("type", "model") != "model":
                return self._error(400, "the fake Hub only has model repositories")
            repo_id = f"{payload.get('organization') or hub.user}/{payload['name']}"
            with hub._lock:
                if (
                    repo_id in hub.repos
                ):  # like the Hub: 409, with the URL (create_repo(exist_ok=True) reads it)
                    message = "You already created this model repo"
                    return self._json(
                        409, {"error": message, "url": f"{hub.url}/{repo_id}"}, {"X-Error-Message": message}
                    )
                repo = _Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
                hub._new_commit(repo, {}, "initial commit")
                hub.repos[repo_id] = repo
            return self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body or b"{}").get("content", ""))
        if method == "POST" and (m := _PREUPLOAD.match(path)):
            return self._preupload(m["repo"], json.loads(body or b"{}"))
        if method == "POST" and (m := _COMMIT.match(path)):
            return self._commit(m["repo"], m["rev"], body)
        if method in ("GET", "HEAD") and (m := _API_MODEL.match(path)):
            return self._model_info(m["repo"], m["rev"] or "main", head)
        if method in ("GET", "HEAD") and (m := _RESOLVE.match(path)):
            return self._resolve(m["repo"], m["rev"], m["path"], head)
        return self._error(404, f"the fake Hub does not implement {method} {path}", head=head)

    # ---------------------------------------------------------------- endpoints
    def _repo(self, repo_id: str, head: bool = False) -> _Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not (self._has_token() and self._token_ok())):
            self._error(404, "Repository not found", "RepoNotFound", head=head)
            return None
        return repo

    def _validate_yaml(self, content: str):
        import yaml  # PyYAML comes with huggingface_hub / transformers

        match = re.match(r"^---\n(.*?)\n---\n", content, flags=re.S)
        try:
            if match:
                yaml.safe_load(match.group(1))
        except yaml.YAMLError as err:
            return self._json(400, {"errors": [{"message": f"YAML: {err}"}]})
        return self._json(200, {"errors": [], "warnings": []})

    def _preupload(self, repo_id: str, payload: dict):
        with self.hub._lock:
            repo = self._repo(repo_id)
            if repo is None:
                return None
            files = repo.files
            answer = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_oid(files[f["path"]]) if f["path"] in files else None,
                }
                for f in payload.get("files", [])
            ]
        return self._json(200, {"files": answer, "commitOid": repo.head})

    def _commit(self, repo_id: str, rev: str, body: bytes):
        if rev != "main":
            return self._error(404, f"Revision Not Found: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        with self.hub._lock:
            repo = self._repo(repo_id)
            if repo is None:
                return None
            files = dict(repo.files)
            message = ""
            for item in lines:
                key, value = item.get("key"), item.get("value") or {}
                if key == "header":
                    message = value.get("summary", "")
                elif key == "file":
                    if value.get("encoding") != "base64":
                        return self._error(400, "only base64 files are supported")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: d for p, d in files.items() if not p.startswith(prefix)}
                else:
                    return self._error(400, f"the fake Hub does not support commit operation {key!r}")
            sha = self.hub._new_commit(repo, files, message)
        return self._json(
            200,
            {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None},
        )

    def _model_info(self, repo_id: str, rev: str, head: bool):
        with self.hub._lock:
            repo = self._repo(repo_id, head)
            if repo is None:
                return None
            sha = repo.head if rev == "main" else rev
            if sha not in repo.commits:
                return self._error(404, "Revision not found", "RevisionNotFound", head=head)
            siblings = [{"rfilename": p, "size": len(d)} for p, d in sorted(repo.commits[sha].items())]
            private = repo.private
        info = {
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "private": private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "library_name": "transformers",
            "siblings": siblings,
            "lastModified": "2026-01-01T00:00:00.000Z",
            "createdAt": "2026-01-01T00:00:00.000Z",
        }
        return self._json(200, info, head=head)

    def _resolve(self, repo_id: str, rev: str, path: str, head: bool):
        with self.hub._lock:
            repo = self._repo(repo_id, head)
            if repo is None:
                return None
            sha = repo.head if rev == "main" else rev
            snapshot = repo.commits.get(sha)
            if snapshot is None:
                return self._error(404, "Revision not found", "RevisionNotFound", head=head)
            data = snapshot.get(path)
        if data is None:
            return self._error(404, "Entry not found", "EntryNotFound", head=head)
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": sha,
            "ETag": f'"{git_blob_oid(data)}"',
        }
        return self._send(200, data, headers, head=head)

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")
