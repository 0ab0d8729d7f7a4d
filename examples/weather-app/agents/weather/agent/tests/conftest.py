from __future__ import annotations

import http.client
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # agents/weather: the local_run helper

from local_run import AGENT, MCP_SERVER, Component, free_port, running  # noqa: E402

SERVICE_HOST = "weather-mcp.mcp-servers.svc.cluster.local"


class ClusterProxy(ThreadingHTTPServer):
    """An HTTP forward proxy that knows one Service name, as pods reach Services by cluster DNS: requests for
    http://`SERVICE_HOST` go to `target_port` on 127.0.0.1, anything else gets 502. Records what it forwards."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.forwarded: list[tuple[str, str]] = []
        super().__init__(("127.0.0.1", free_port()), ProxyHandler)


class ProxyHandler(BaseHTTPRequestHandler):
    server: ClusterProxy

    def forward(self):
        target = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if target.hostname != SERVICE_HOST or target.port not in (None, 80):
            self.send_error(502, f"unknown host {target.netloc}")
            return
        self.server.forwarded.append((self.command, self.path))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "connection")}
        connection = http.client.HTTPConnection("127.0.0.1", self.server.target_port, timeout=10)
        try:
            connection.request(self.command, target.path or "/", body=body or None, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        finally:
            connection.close()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_DELETE = forward

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def app(tmp_path_factory):
    """The MCP server; an agent pointed at it by its Service name, as in the cluster, which it reaches through an
    HTTP proxy (HTTP_PROXY: how the sandbox gives pod processes cluster DNS); an agent whose MCP server is down."""
    logs = tmp_path_factory.mktemp("agent")
    server = Component(MCP_SERVER, logs / "server.log")
    proxy = ClusterProxy(server.port)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    agents = {
        "agent": Component(AGENT, logs / "agent.log", {
            "MCP_SERVER_URL": f"http://{SERVICE_HOST}/mcp", "HTTP_PROXY": f"http://127.0.0.1:{proxy.server_port}"}),
        "server-down": Component(AGENT, logs / "server-down.log",
                                 {"MCP_SERVER_URL": f"http://127.0.0.1:{free_port()}/mcp", "MCP_TIMEOUT_SECONDS": "5"}),
    }
    try:
        for _ in running(server, *agents.values()):
            yield {"proxy": proxy, **agents}
    finally:
        proxy.shutdown()
        proxy.server_close()
