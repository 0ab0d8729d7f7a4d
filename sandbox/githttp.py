"""A git host on 127.0.0.1: git's own `git http-backend` behind a small CGI bridge, for `https://<token>@host/...`
style repository URLs.

The smart HTTP protocol is git's own: every request runs `git http-backend`
(git/git http-backend.c, Documentation/git-http-backend.txt, v2.39.5) with the
CGI variables it documents: GIT_PROJECT_ROOT and PATH_INFO locate the
repository, REQUEST_METHOD, QUERY_STRING, CONTENT_TYPE and CONTENT_LENGTH
describe the request, and the `Git-Protocol` header reaches it as
HTTP_GIT_PROTOCOL. Only repositories marked with `git-daemon-export-ok` are
served, as http-backend does without GIT_HTTP_EXPORT_ALL.

It serves like a public repository: it never answers 401. git sends a URL's
credentials up front only when the URL has a password, and otherwise asks for
them after a 401 (git/git http.c v2.39.5: `init_curl_http_auth` when
`http_auth.password` is set; `credential_fill` once a request got 401), so a
`<token>@` URL fetches without the token reaching the host. Each request's
path and whether it carried an Authorization header are recorded.

Source: git/git http-backend.c, http.c, Documentation/git-http-backend.txt (v2.39.5).
"""

from __future__ import annotations

import os
import subprocess
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


@dataclass(frozen=True)
class GitRequest:
    method: str
    path: str
    authorization: bool


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self._backend()

    def do_POST(self) -> None:
        self._backend()

    def _backend(self) -> None:
        url = urlsplit(self.path)
        self.server.requests.append(GitRequest(self.command, url.path, "Authorization" in self.headers))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(self.server.root),
            "PATH_INFO": url.path,
            "QUERY_STRING": url.query,
            "REQUEST_METHOD": self.command,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": self.client_address[0],
            "SERVER_PROTOCOL": self.request_version,
        }
        for header, variable in (("Git-Protocol", "HTTP_GIT_PROTOCOL"), ("Content-Encoding", "HTTP_CONTENT_ENCODING")):
            if header in self.headers:
                env[variable] = self.headers[header]
        completed = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, timeout=60)
        head, _, payload = completed.stdout.partition(b"\r\n\r\n")
        if not _:
            head, _, payload = completed.stdout.partition(b"\n\n")
        headers = [line.split(":", 1) for line in head.decode("latin-1").splitlines() if ":" in line]
        status = next((value.strip() for name, value in headers if name.lower() == "status"), "200 OK")
        code, _, reason = status.partition(" ")
        self.send_response(int(code), reason or None)
        for name, value in headers:
            if name.lower() != "status":
                self.send_header(name, value.strip())
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.requests: list[GitRequest] = []


class GitHost:
    """Serves the git repositories under `root` at http://127.0.0.1:<port>/<path>."""

    def __init__(self, root: Path):
        self._server = _Server(root)
        self._thread = threading.Thread(target=self._server.serve_forever, name="git-http", daemon=True)

    @property
    def root(self) -> Path:
        return self._server.root

    @property
    def requests(self) -> list[GitRequest]:
        return self._server.requests

    def url(self, path: str, userinfo: str | None = None) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{userinfo + '@' if userinfo else ''}{host}:{port}/{path.lstrip('/')}"

    def export(self, git_dir: Path) -> None:
        """Mark a repository for export (git-daemon-export-ok), as http-backend requires."""
        (git_dir / "git-daemon-export-ok").touch()

    def __enter__(self) -> GitHost:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
