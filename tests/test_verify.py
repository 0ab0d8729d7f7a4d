"""The verify stage's pure logic, and its MCP and HTTP checks against a real MCP server of the `mcp` SDK.

The server runs on 127.0.0.1 behind the URL prefix of the API server's service proxy
(`/api/v1/namespaces/<ns>/services/<name>:<port>/proxy`) and, like the API server, answers 401 to a request
without the bearer token it expects; it records every request it gets.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import http.server
import socket
import stat
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import uvicorn
import yaml
from kubernetes_asyncio import client

from flows.config import ConfigError, VerifySpec, parse_config
from flows.kube import kube_api
from flows.report import critical_path, format_timing
from flows.results import ComponentResult, PipelineResult
from flows.verify import (
    VerificationFailed,
    check_http,
    check_mcp,
    has_checks,
    helm_test_args,
    helm_test_failure,
    helm_test_report,
    missing_tools,
    planned_checks,
    proxy_client,
    proxy_url,
    release_test_hooks,
)
from sandbox.kube import tls

REPO_ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "mcp-servers"
TOKEN = "token-of-the-flow"


# --- the stand-in: an MCP server of the SDK behind the service proxy's prefix ----------------------


class ProxiedServices:
    """Services behind `/api/v1/namespaces/<ns>/services/<name>:<port>/proxy`, as the API server proxies them."""

    def __init__(self) -> None:
        from mcp.server.mcpserver import MCPServer

        weather = MCPServer("weather", version="1.2.3")

        @weather.tool()
        def get_forecast(city: str) -> str:
            return f"sunny in {city}"

        self.mcp_app = weather.streamable_http_app(streamable_http_path="/mcp")
        self.backends = {"weather-mcp:80": self.mcp_app, "plain:80": self.plain, "silent:80": self.silent}
        self.tokens = {f"Bearer {TOKEN}"}
        self.requests: list[tuple[str, str, str]] = []

    @staticmethod
    async def respond(send, status: int, body: bytes, content_type: bytes = b"text/plain") -> None:
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]})
        await send({"type": "http.response.body", "body": body})

    async def plain(self, scope, receive, send) -> None:
        """A web server that answers every path with 200 "ok", and does not speak MCP."""
        await self.respond(send, 200 if scope["path"] != "/missing" else 404, b"ok")

    async def silent(self, scope, receive, send) -> None:
        await asyncio.sleep(3600)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self.mcp_app(scope, receive, send)
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode()
        self.requests.append((scope["method"], scope["path"], authorization))
        if authorization not in self.tokens:
            return await self.respond(send, 401, b'{"kind":"Status","status":"Failure","reason":"Unauthorized",'
                                               b'"code":401}', b"application/json")
        prefix = f"/api/v1/namespaces/{NAMESPACE}/services/"
        service, _, path = scope["path"].removeprefix(prefix).partition("/proxy")
        backend = self.backends.get(service) if scope["path"].startswith(prefix) else None
        if backend is None:
            return await self.respond(send, 404, b"not found")
        path = path or "/"
        await backend(dict(scope, path=path, raw_path=path.encode()), receive, send)


def serve(app, **ssl) -> tuple[uvicorn.Server, threading.Thread, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **ssl))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    return server, thread, sock.getsockname()[1]


@pytest.fixture(scope="module")
def services():
    app = ProxiedServices()
    server, thread, port = serve(app)
    app.base = f"http://127.0.0.1:{port}"
    yield app
    server.should_exit = True
    thread.join(10)


def kubeconfig_file(folder: Path, cluster: dict, user: dict) -> str:
    path = folder / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": cluster}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "users": [{"name": "u", "user": user}],
    }))
    return str(path)


def checked_with(kubeconfig: str, check) -> object:
    async def run():
        async with kube_api(kubeconfig) as api, proxy_client(api, 10) as http:
            return await check(http)
    return asyncio.run(run())


def api_client(base: str, token: str | None = TOKEN) -> client.ApiClient:
    configuration = client.Configuration(host=base)
    if token:
        configuration.api_key["BearerToken"] = f"Bearer {token}"
    return client.ApiClient(configuration)


def checked(services, check) -> object:
    """Run `check(http)` with a proxy client of an API client holding the flow's token."""
    async def run():
        async with api_client(services.base) as api, proxy_client(api, 10) as http:
            return await check(http)
    return asyncio.run(run())


def url(services, service: str, path: str = "/mcp") -> str:
    return proxy_url(services.base, NAMESPACE, service, 80, path)


# --- MCP ------------------------------------------------------------------------------------------


def test_the_mcp_handshake_reports_the_servers_name_version_and_tools(services):
    server = checked(services, lambda http: check_mcp(http, url(services, "weather-mcp"), ["get_forecast"], 10))
    assert (server.name, server.version, server.tools) == ("weather", "1.2.3", ["get_forecast"])
    assert server.protocol_version
    methods = [m for m, path, _ in services.requests if path.endswith("weather-mcp:80/proxy/mcp")]
    # initialize and notifications/initialized and tools/list are POSTs; the session ends with a DELETE
    assert methods.count("POST") >= 3 and methods[-1] == "DELETE"


def test_no_tools_listed_means_at_least_one(services):
    server = checked(services, lambda http: check_mcp(http, url(services, "weather-mcp"), [], 10))
    assert server.tools == ["get_forecast"]


def test_a_missing_tool_fails_naming_it_and_what_the_server_lists(services):
    with pytest.raises(VerificationFailed, match=r"MCP server weather 1.2.3 does not list get_alerts "
                                                 r"\(it lists get_forecast\)"):
        checked(services, lambda http: check_mcp(http, url(services, "weather-mcp"), ["get_forecast", "get_alerts"],
                                                 10))


def test_a_server_that_answers_http_but_not_mcp_fails_the_handshake(services):
    with pytest.raises(VerificationFailed, match="the MCP handshake failed: .*text/plain"):
        checked(services, lambda http: check_mcp(http, url(services, "plain"), [], 10))


def test_a_service_the_proxy_does_not_know_fails_with_the_status(services):
    with pytest.raises(VerificationFailed, match=r"the MCP handshake failed: .*\(HTTP 404 Not Found\)"):
        checked(services, lambda http: check_mcp(http, url(services, "nowhere"), [], 10))


def test_a_server_that_never_answers_fails_after_the_timeout(services):
    started = time.monotonic()
    with pytest.raises(VerificationFailed, match="no MCP handshake within 2s"):
        checked(services, lambda http: check_mcp(http, url(services, "silent"), [], 2))
    assert time.monotonic() - started < 15


def test_the_flows_token_goes_in_the_header_and_never_into_the_url_or_the_error(services):
    services.requests.clear()
    checked(services, lambda http: check_mcp(http, url(services, "weather-mcp"), [], 10))
    assert services.requests and all(auth == f"Bearer {TOKEN}" and TOKEN not in path
                                     for _, path, auth in services.requests)

    async def refused():
        async with api_client(services.base, "a-wrong-token") as api, proxy_client(api, 10) as http:
            return await check_mcp(http, url(services, "weather-mcp"), [], 10)
    with pytest.raises(VerificationFailed, match=r"\(HTTP 401 Unauthorized\)") as failed:
        asyncio.run(refused())
    assert "a-wrong-token" not in str(failed.value)


def test_an_exec_plugin_token_refused_with_401_is_fetched_again_and_the_request_sent_once_more(services, tmp_path):
    """`aws eks get-token` as the kubeconfig's exec plugin: its first token was revoked; after the 401 the plugin
    runs again (flows/kube.py ExecCredential.renew) and the MCP handshake goes through with the new token."""
    counter = tmp_path / "issued"
    plugin = tmp_path / "get-token"
    plugin.write_text(f"""#!{sys.executable}
import json, pathlib
counter = pathlib.Path({str(counter)!r})
n = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(n))
print(json.dumps({{"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential",
                   "status": {{"token": f"exec-token-{{n}}"}}}}))
""")
    plugin.chmod(plugin.stat().st_mode | stat.S_IEXEC)
    kubeconfig = kubeconfig_file(tmp_path, {"server": services.base}, {
        "exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": str(plugin)}})
    services.tokens.add("Bearer exec-token-2")  # exec-token-1, issued when the kubeconfig is loaded, is refused
    services.requests.clear()

    try:
        assert checked_with(kubeconfig, lambda http: check_mcp(http, url(services, "weather-mcp"),
                                                               ["get_forecast"], 10)).tools == ["get_forecast"]
    finally:
        services.tokens.discard("Bearer exec-token-2")
    sent = [auth for _, _, auth in services.requests]
    assert sent[0] == "Bearer exec-token-1" and set(sent[1:]) == {"Bearer exec-token-2"}
    assert counter.read_text() == "2"


class RecordingProxy(http.server.ThreadingHTTPServer):
    """A forward proxy for plain-HTTP requests (absolute-form request targets, RFC 9112 section 3.2.2) that
    records each target it passed on."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy.targets.append(self.path)
                parts = urllib.parse.urlsplit(self.path)
                upstream = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
                upstream.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""),
                                 headers={k: v for k, v in self.headers.items() if k.lower() != "proxy-connection"})
                answer = upstream.getresponse()
                body = answer.read()
                self.send_response(answer.status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_the_kubeconfigs_proxy_url_carries_the_checks_requests(services, tmp_path):
    """A cluster reached through a proxy (the kubeconfig's `proxy-url`, client-go rest.Config.Proxy): the checks
    go the way the API client goes."""
    proxy = RecordingProxy()
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        kubeconfig = kubeconfig_file(tmp_path, {"server": services.base,
                                                "proxy-url": f"http://127.0.0.1:{proxy.server_address[1]}"},
                                     {"token": TOKEN})
        target = url(services, "plain", "/health")
        assert checked_with(kubeconfig, lambda http: check_http(http, target, 200)) == 200
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert proxy.targets == [target]


def test_the_kubeconfigs_tls_server_name_is_the_name_checked_in_the_servers_certificate(tmp_path):
    """An API server whose certificate names it `api.cluster.internal` only, reached at 127.0.0.1 with the
    kubeconfig's `tls-server-name` (client-go rest.TLSClientConfig.ServerName)."""
    certificate = tls.create(dns_names=("api.cluster.internal",), loopback_ip=False)
    (tmp_path / "tls.crt").write_bytes(certificate.cert_pem + certificate.ca_pem)
    (tmp_path / "tls.key").write_bytes(certificate.key_pem)
    app = ProxiedServices()
    server, thread, port = serve(app, ssl_certfile=str(tmp_path / "tls.crt"), ssl_keyfile=str(tmp_path / "tls.key"))
    try:
        base = f"https://127.0.0.1:{port}"
        kubeconfig = kubeconfig_file(tmp_path, {
            "server": base, "tls-server-name": "api.cluster.internal",
            "certificate-authority-data": base64.b64encode(certificate.ca_pem).decode()}, {"token": TOKEN})
        target = proxy_url(base, NAMESPACE, "plain", 80, "/health")
        assert checked_with(kubeconfig, lambda http: check_http(http, target, 200)) == 200
    finally:
        server.should_exit = True
        thread.join(10)


# --- HTTP -----------------------------------------------------------------------------------------


def test_an_http_check_passes_on_the_expected_status(services):
    assert checked(services, lambda http: check_http(http, url(services, "plain", "/health"), 200)) == 200


def test_an_http_check_fails_with_the_status_and_the_start_of_the_body(services):
    with pytest.raises(VerificationFailed, match=r"answered 404, expected 200: ok"):
        checked(services, lambda http: check_http(http, url(services, "plain", "/missing"), 200))


def test_an_http_check_through_a_refused_token_fails_with_401(services):
    async def run():
        async with api_client(services.base, None) as api, proxy_client(api, 10) as http:
            return await check_http(http, url(services, "plain", "/health"), 200)
    with pytest.raises(VerificationFailed, match="answered 401, expected 200"):
        asyncio.run(run())


# --- pure logic -----------------------------------------------------------------------------------


def pipeline(verify: object) -> dict:
    return {
        "source": {"repo": "."}, "registry": "123456789012.dkr.ecr.us-west-2.amazonaws.com",
        "aws": {"region": "us-west-2", "bucket": "bucket"},
        "components": [{"name": "weather-mcp", "context": "c", "image": "weather-mcp",
                        "release": {"name": "weather-mcp", "chart": "charts/mcp", "namespace": NAMESPACE,
                                    "verify": verify}}],
    }


@pytest.mark.parametrize("verify, problem", [
    ({"mcp": {"service": "weather-mcp", "port": 80, "tool": ["x"]}},
     "components[0].release.verify.mcp.tool: unknown key"),
    ({"mcp": {"port": 80}}, "components[0].release.verify.mcp.service: Field required"),
    ({"mcp": {"service": "Weather_MCP", "port": 80}}, "components[0].release.verify.mcp.service: 'Weather_MCP' is "
                                                     "not a DNS label"),
    ({"http": [{"service": "a", "port": 0}]}, "components[0].release.verify.http[0].port"),
    ({"http": [{"service": "a", "port": "Not A Name"}]}, "components[0].release.verify.http[0].port"),
    ({"http": [{"service": "a", "port": 80, "path": "health"}]},
     "components[0].release.verify.http[0].path: 'health' must start with '/'"),
    ({"http": [{"service": "a", "port": 80, "path": "/../../secrets/x"}]},
     "components[0].release.verify.http[0].path: '/../../secrets/x' must not contain '.' or '..' segments"),
    ({"mcp": {"service": "a", "port": 80, "path": "/%2e%2e/pods"}},
     "components[0].release.verify.mcp.path: '/%2e%2e/pods' must not contain"),
    ({"http": [{"service": "a", "port": 80, "status": 99}]}, "components[0].release.verify.http[0].status"),
    ({"helm_test": "sometimes"}, "components[0].release.verify.helm_test"),
    ({"timeout_seconds": 1}, "components[0].release.verify.timeout_seconds"),
])
def test_a_bad_verify_section_is_refused_naming_the_key(verify, problem):
    with pytest.raises(ConfigError) as refused:
        parse_config(pipeline(verify))
    assert any(line.startswith(problem) for line in refused.value.problems), refused.value.problems


def test_verify_takes_a_port_by_name_and_a_query_in_an_http_path():
    config = parse_config(pipeline({"mcp": {"service": "weather-mcp", "port": "http"},
                                    "http": [{"service": "weather-agent", "port": 80,
                                              "path": "/forecast?city=Seattle"}]}))
    verify = config.components[0].release.verify
    assert (verify.mcp.port, verify.mcp.path, verify.http[0].status) == ("http", "/mcp", 200)


INSTALLED = {"version": 3, "hooks": [
    {"name": "weather-mcp-second", "kind": "Pod", "events": ["test"], "weight": 5},
    {"name": "weather-mcp-migrate", "kind": "Job", "events": ["pre-upgrade"]},
    {"name": "weather-mcp-test-connection", "kind": "Pod", "events": ["test"]},
]}


def test_test_hooks_are_the_releases_test_events_in_helms_order():
    assert release_test_hooks(INSTALLED) == ["weather-mcp-test-connection", "weather-mcp-second"]
    assert release_test_hooks({"version": 1}) == []


def test_helm_test_defaults_to_on_when_the_release_has_test_hooks():
    hooks = release_test_hooks(INSTALLED)
    assert planned_checks(VerifySpec(), hooks).helm_tests == hooks
    assert not planned_checks(VerifySpec(helm_test=False), hooks)
    assert not has_checks(VerifySpec(), []) and has_checks(VerifySpec(), hooks)
    assert not has_checks(VerifySpec(helm_test=False), hooks)


def test_helm_test_true_without_test_hooks_is_a_failed_check_naming_the_key():
    assert has_checks(VerifySpec(helm_test=True), [])
    with pytest.raises(VerificationFailed, match="release.verify.helm_test is true, but the installed chart has no "
                                                 "test hooks"):
        planned_checks(VerifySpec(helm_test=True), [])


def test_helm_test_argv_has_timeout_and_logs():
    release = parse_config(pipeline({"timeout_seconds": 45})).components[0].release
    assert helm_test_args(release) == ["test", "weather-mcp", "--timeout", "45s", "--logs"]


# What helm v4.1.4 writes on stdout for a failed `helm test --logs` (pkg/cmd/status.go statusPrinter,
# pkg/action/release_testing.go GetPodLogs).
HELM_TEST_STDOUT = """NAME: weather-mcp
LAST DEPLOYED: Mon Jan  5 10:00:00 2026
NAMESPACE: mcp-servers
STATUS: deployed
REVISION: 3
DESCRIPTION: Upgrade complete
TEST SUITE:     weather-mcp-test-connection
Last Started:   Mon Jan  5 10:00:05 2026
Last Completed: Mon Jan  5 10:00:07 2026
Phase:          Failed

POD LOGS: weather-mcp-test-connection
Connecting to weather-mcp:80 (10.0.0.7:80)
wget: server returned error: HTTP/1.1 503 Service Unavailable

"""


def test_a_failed_helm_test_reports_the_failed_test_and_its_log():
    phases, logs = helm_test_report(HELM_TEST_STDOUT)
    assert phases == {"weather-mcp-test-connection": "Failed"}
    assert logs["weather-mcp-test-connection"].endswith("503 Service Unavailable")
    message = helm_test_failure("Error: 1 error occurred:\n\t* pod weather-mcp-test-connection failed",
                                HELM_TEST_STDOUT)
    assert message.splitlines()[0] == "helm test: 1 error occurred:"
    assert "test weather-mcp-test-connection: Failed" in message
    assert message.endswith("--- last log lines of test pod weather-mcp-test-connection ---\n"
                            "Connecting to weather-mcp:80 (10.0.0.7:80)\n"
                            "wget: server returned error: HTTP/1.1 503 Service Unavailable")


def test_the_proxy_url_is_the_services_proxy_subresource():
    assert (proxy_url("https://127.0.0.1:6443/", "agents", "weather-agent", 80, "/forecast?city=Seattle")
            == "https://127.0.0.1:6443/api/v1/namespaces/agents/services/weather-agent:80/proxy/forecast?city=Seattle")
    assert proxy_url("https://h/k8s/clusters/c-1", "ns", "svc", "http", "/mcp") == (
        "https://h/k8s/clusters/c-1/api/v1/namespaces/ns/services/svc:http/proxy/mcp")


def test_missing_tools():
    assert missing_tools([], ["a"]) is None
    assert missing_tools([], []) == "lists no tools"
    assert missing_tools(["a", "b"], ["a"]) == "does not list b (it lists a)"


def test_the_timing_table_has_a_verify_column_and_the_agent_waits_for_the_servers_verify():
    def result(name, spans, outcome="deployed"):
        return ComponentResult(name=name, outcome=outcome, spans=spans,
                               seconds={s: round(e - b, 3) for s, (b, e) in spans.items()})
    run = PipelineResult(commit="0" * 40, ref="main", seconds={"total": 20.0}, components=[
        result("weather-mcp", {"package": (0, 1), "build": (1, 8), "deploy": (8, 10), "verify": (10, 12.5)}),
        result("weather-agent", {"package": (0, 1), "build": (1, 3), "deploy": (12.6, 15)}),
    ])
    header, mcp, agent, _ = format_timing(run).splitlines()
    assert header.split()[-3:] == ["deploy", "verify", "outcome"]
    assert mcp.split()[-2:] == ["2.50", "deployed"] and agent.split()[-2:] == ["-", "deployed"]
    path = [(c, s) for c, s, *_ in critical_path(run, {"weather-agent": ["weather-mcp"]})]
    assert path[-2:] == [("weather-mcp", "verify"), ("weather-agent", "deploy")]


def test_the_release_rbac_lets_the_flow_run_helm_test_and_reach_services_through_the_proxy():
    role = next(d for d in yaml.safe_load_all((REPO_ROOT / "deployments" / "rbac-release.yaml").read_text())
                if d["kind"] == "ClusterRole")
    rights = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"]
              for r in rule["resources"]}
    # requestinfo.go: GET -> get, POST -> create, DELETE -> delete on the services/proxy subresource
    assert rights[("", "services/proxy")] == {"get", "create", "delete"}
    # helm 4 creates hook Pods by server-side apply (patch, and create for a new object), deletes them by policy
    assert {"create", "patch", "delete", "watch", "list"} <= rights[("", "pods")]
    assert "get" in rights[("", "pods/log")]
