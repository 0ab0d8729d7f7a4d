"""An HTTP reverse proxy on 127.0.0.1 that forwards to a target (moto) and fails chosen requests.

Requests go to the target as the client sent them: method, path and query,
headers including Host, and body. SigV4 signs the Host header, so an unchanged
Host keeps every signature, presigned URLs included, valid behind the proxy.
Only hop-by-hop headers are not passed on; the proxy itself answers
`Expect: 100-continue` and reads the body before forwarding it.

`fail(...)` makes the next N requests that match a method and a path pattern
answer an S3-style error instead, or every such request from then on (status
`DROP`: the connection is closed with no answer, a network fault); `log`
is what the proxy answered, injected or forwarded. A `refuse` function, when
given, answers what the target would serve but S3 refuses (sandbox/presign.py).

Source: the S3 error responses (docs.aws.amazon.com AmazonS3 ErrorResponses.html; codes as in botocore
data/s3/2006-03-01/service-2.json, v1.43.117) for the bodies it answers.
"""

from __future__ import annotations

import http.client
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple
from urllib.parse import urlsplit

from sandbox.presign import Refusal

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "expect"}
S3_ERRORS = {
    400: ("BadRequest", "Bad Request"),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
    429: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    502: ("BadGateway", "Bad Gateway"),
    503: ("SlowDown", "Please reduce your request rate."),
    504: ("GatewayTimeout", "Gateway Timeout"),
}
DROP = 0


class Served(NamedTuple):
    method: str
    path: str
    status: int


class _Answer(NamedTuple):
    status: int
    reason: str
    headers: list[tuple[str, str]]
    content: bytes


@dataclass
class FaultRule:
    method: str
    path: re.Pattern
    status: int
    remaining: int | None  # None: for good

    def take(self, method: str, path: str) -> bool:
        """Whether this rule answers the request; counts it down if so."""
        if self.remaining == 0 or self.method not in ("*", method) or not self.path.search(path):
            return False
        if self.remaining is not None:
            self.remaining -= 1
        return True


def s3_error_body(status: int, resource: str, request_id: str) -> bytes:
    code, message = S3_ERRORS.get(status, (http.client.responses.get(status, "Error").replace(" ", ""),
                                           http.client.responses.get(status, "Error")))
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>").encode()


class FaultProxy:
    def __init__(self, target: str, refuse: Callable[[str, Mapping[str, str]], Refusal | None] | None = None) -> None:
        parts = urlsplit(target)
        self.refuse = refuse
        self.target_host, self.target_port = parts.hostname, parts.port or 80
        self._rules: list[FaultRule] = []
        self._log: list[Served] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> FaultProxy:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ---------------------------------------------------------------- faults and log

    def fail(self, method: str, path_regex: str, status: int, times: int | None = 1) -> None:
        """Answer `status` to the next `times` requests whose method and path (re.search) match; None: all of them.

        Rules are consulted in the order they were added, so two calls queue two faults."""
        with self._lock:
            self._rules.append(FaultRule(method.upper(), re.compile(path_regex), status, times))

    def clear_faults(self) -> None:
        with self._lock:
            self._rules.clear()

    @property
    def log(self) -> list[Served]:
        with self._lock:
            return list(self._log)

    def _injected_status(self, method: str, path: str) -> int | None:
        with self._lock:
            for rule in self._rules:
                if rule.take(method, path):
                    return rule.status
        return None

    def _record(self, method: str, path: str, status: int) -> int:
        with self._lock:
            self._log.append(Served(method, path, status))
            return len(self._log)


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    return type("FaultProxyHandler", (_ProxyHandler,), {"proxy": proxy})


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: FaultProxy

    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def log_message(self, format: str, *args) -> None:
        pass

    def _serve(self) -> None:
        body = self._read_body()
        path = urlsplit(self.path).path
        injected = self.proxy._injected_status(self.command, path)
        if injected == DROP:
            self.proxy._record(self.command, path, DROP)
            self.close_connection = True
            return
        if injected is not None:
            number = self.proxy._record(self.command, path, injected)
            self._answer_error(injected, path, f"fault-proxy-{number}")
            return
        refused = self.proxy.refuse(self.path, self.headers) if self.proxy.refuse else None
        if refused is not None:
            number = self.proxy._record(self.command, path, refused.status)
            self._answer(refused.status, refused.body(f"fault-proxy-{number}"), f"fault-proxy-{number}")
            return
        try:
            answer = self._fetch(body)
        except OSError:
            self.proxy._record(self.command, path, 502)
            self._answer_error(502, path, "fault-proxy-unreachable")
            return
        self.proxy._record(self.command, path, answer.status)
        self._relay(answer)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline().strip():
            pass  # trailers
        return b"".join(chunks)

    def _fetch(self, body: bytes) -> _Answer:
        """The target's answer to this request, sent on unchanged."""
        connection = http.client.HTTPConnection(self.proxy.target_host, self.proxy.target_port, timeout=60)
        try:
            connection.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    connection.putheader(name, value)
            if body or self.command in ("PUT", "POST", "PATCH"):
                connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body or None)
            response = connection.getresponse()
            return _Answer(response.status, response.reason, response.getheaders(), response.read())
        finally:
            connection.close()

    def _relay(self, answer: _Answer) -> None:
        """The target's answer to the client; a HEAD keeps the target's Content-Length and sends no body."""
        self.send_response_only(answer.status, answer.reason)
        for name, value in answer.headers:
            if name.lower() not in HOP_BY_HOP and not (name.lower() == "content-length" and self.command != "HEAD"):
                self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer.content)

    def _answer_error(self, status: int, resource: str, request_id: str) -> None:
        self._answer(status, s3_error_body(status, resource, request_id), request_id)

    def _answer(self, status: int, body: bytes, request_id: str) -> None:
        content = b"" if self.command == "HEAD" else body
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)
