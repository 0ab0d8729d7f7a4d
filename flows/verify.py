"""Verify stage: after a release rolled out, does what was deployed answer?

Three kinds of check, from `release.verify`, run at once:
- `helm test` when the release has test hooks (or `helm_test: true`), its test pods' logs in the error;
- an MCP handshake (initialize, notifications/initialized, tools/list) with the official `mcp` SDK client,
  expecting the listed tools (or at least one);
- HTTP GETs that must answer with a given status.

MCP and HTTP go through the Kubernetes API server's service proxy
(`/api/v1/namespaces/<ns>/services/<name>:<port>/proxy/<path>`), authenticated as
the flow's API client is (flows/kube.py), so the worker needs no network path to
the pods and no port-forward. The API server checks the `services/proxy`
subresource with the verb of the HTTP method: GET `get`, POST `create`, DELETE
`delete` (kubernetes/kubernetes staging/src/k8s.io/apiserver/pkg/endpoints/request/
requestinfo.go, `NewRequestInfo`, master at 01bb682). The bearer token travels in
a header only: no URL, log line or error carries it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from urllib.parse import quote

import anyio
import httpx2
from kubernetes_asyncio import client
from pydantic import BaseModel, ConfigDict

from flows.config import HttpCheckSpec, McpCheckSpec, ReleaseSpec, VerifySpec
from flows.helm import DeployFailed, Helm
from flows.kube import authorization, authorization_after_refusal, tls_context

TEST_LOG_LINES = 20
MAX_TOOL_PAGES = 20
BODY_EXCERPT = 200


class VerificationFailed(RuntimeError):
    """A check failed: `summary` is one line, `details` what each failing check saw."""

    def __init__(self, summary: str, details: str = "") -> None:
        self.summary, self.details = summary, details
        super().__init__(summary + (f"\n{details}" if details else ""))


class McpServer(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    protocol_version: str
    tools: list[str]


class HttpAnswer(BaseModel):
    model_config = ConfigDict(frozen=True)

    service: str
    port: int | str
    path: str
    status: int


class Verification(BaseModel):
    """What the checks saw when every one passed; `helm_tests` is None when `helm test` did not run."""

    model_config = ConfigDict(frozen=True)

    helm_tests: list[str] | None = None
    mcp: McpServer | None = None
    http: list[HttpAnswer] = []

    def describe(self) -> str:
        parts = []
        if self.helm_tests is not None:
            parts.append(f"helm test passed ({', '.join(self.helm_tests)})")
        if self.mcp:
            parts.append(f"MCP server {self.mcp.name} {self.mcp.version} (protocol {self.mcp.protocol_version}) "
                         f"lists {', '.join(self.mcp.tools)}")
        parts += [f"GET {a.service}:{a.port}{a.path} answered {a.status}" for a in self.http]
        return "; ".join(parts)


@dataclass(frozen=True)
class Checks:
    """The checks to run for one installed release."""

    helm_tests: list[str] = field(default_factory=list)
    mcp: McpCheckSpec | None = None
    http: list[HttpCheckSpec] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.helm_tests or self.mcp or self.http)


# --- pure logic ---------------------------------------------------------------------------------


def release_test_hooks(installed: dict) -> list[str]:
    """Names of the test hooks of the release helm installed (its `--output json`), in the order helm runs them.

    helm/helm pkg/release/v1/hook.go (v4.1.4): `hooks[].events` holds `test` for a
    `helm.sh/hook: test` resource; pkg/action/hooks.go runs them sorted by weight, then name.
    Decided from the release itself, not the chart's files, so a remote chart and a test hook a
    template renders only for some values count exactly as `helm test` will see them.
    """
    hooks = [h for h in installed.get("hooks") or [] if "test" in (h.get("events") or [])]
    return [h["name"] for h in sorted(hooks, key=lambda h: (h.get("weight", 0), h.get("name", "")))]


def planned_checks(verify: VerifySpec, hooks: list[str]) -> Checks:
    """The checks for this release, given its test hooks; `helm_test` unset means "when it has test hooks"."""
    if verify.helm_test and not hooks:
        raise VerificationFailed("release.verify.helm_test is true, but the installed chart has no test hooks "
                                 "(no resource annotated `helm.sh/hook: test`)")
    run_tests = verify.helm_test if verify.helm_test is not None else bool(hooks)
    return Checks(helm_tests=hooks if run_tests else [], mcp=verify.mcp, http=list(verify.http))


def has_checks(verify: VerifySpec, hooks: list[str]) -> bool:
    """Whether a release has anything to verify; without, it deploys exactly as it did before the stage existed."""
    return bool(verify.helm_test or verify.mcp or verify.http or (hooks and verify.helm_test is None))


def helm_test_args(release: ReleaseSpec) -> list[str]:
    """`helm test` with its test pods' logs on stdout (`--logs`, written before helm deletes the pods by their
    delete policy) and a deadline for each test (`--timeout`): helm/helm pkg/cmd/release_testing.go (v4.1.4)."""
    return ["test", release.name, "--timeout", f"{release.verify.timeout_seconds}s", "--logs"]


def helm_test_report(output: str) -> tuple[dict[str, str], dict[str, str]]:
    """(test -> phase, test -> log) from `helm test --logs` stdout.

    helm/helm v4.1.4: pkg/cmd/status.go prints each test that ran as `TEST SUITE:     <name>` ... `Phase:
    <phase>`; pkg/action/release_testing.go `GetPodLogs` prints `POD LOGS: <name>`, the log, and a newline.
    """
    phases: dict[str, str] = {}
    logs: dict[str, list[str]] = {}
    suite, in_log = None, None
    for line in output.splitlines():
        if line.startswith("POD LOGS: "):
            in_log = line.removeprefix("POD LOGS: ").strip()
            logs[in_log] = []
        elif in_log is not None:
            logs[in_log].append(line)
        elif line.startswith("TEST SUITE:") and line.split(":", 1)[1].strip() != "None":
            suite = line.split(":", 1)[1].strip()
        elif line.startswith("Phase:") and suite:
            phases[suite] = line.split(":", 1)[1].strip()
    return phases, {name: "\n".join(lines).strip("\n") for name, lines in logs.items()}


def helm_test_failure(error: str, output: str) -> str:
    """What a failed `helm test` saw: helm's error, the tests that failed and the last lines of their logs."""
    phases, logs = helm_test_report(output)
    failed = [name for name, phase in phases.items() if phase != "Succeeded"] or list(logs)
    lines = [f"helm test: {error.removeprefix('Error: ').strip()}"]
    for name in failed:
        lines.append(f"test {name}: {phases.get(name, 'did not finish')}")
        if log := logs.get(name, "").strip():
            tail = log.splitlines()[-TEST_LOG_LINES:]
            lines.append(f"--- last log lines of test pod {name} ---\n" + "\n".join(tail))
    return "\n".join(lines)


def proxy_url(server: str, namespace: str, service: str, port: int | str, path: str) -> str:
    """The API server's proxy URL of `path` on a Service's port (core/v1 ServiceProxyOptions: `{name}:{port}`)."""
    return f"{server.rstrip('/')}/api/v1/namespaces/{namespace}/services/{service}:{port}/proxy{quote(path, safe='/?=&%:@,;+-._~')}"


def missing_tools(expected: list[str], listed: list[str]) -> str | None:
    """Why a tools/list answer does not do, or None."""
    if not expected:
        return None if listed else "lists no tools"
    missing = [tool for tool in expected if tool not in listed]
    if missing:
        return f"does not list {', '.join(missing)} (it lists {', '.join(listed) or 'none'})"
    return None


def _excerpt(body: bytes) -> str:
    text = body[:BODY_EXCERPT].decode("utf-8", "replace").strip()
    return f": {text}" if text else ""


# --- checks -------------------------------------------------------------------------------------


class ApiServerAuth(httpx2.Auth):
    """The API client's bearer token on every request; after a 401, the exec plugin's new token, once."""

    def __init__(self, api: client.ApiClient) -> None:
        self._api = api

    async def async_auth_flow(self, request: httpx2.Request) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        if server_name := self._api.configuration.tls_server_name:
            # the kubeconfig's `tls-server-name`: the name sent as SNI and checked in the API server's certificate,
            # as client-go does (k8s.io/client-go rest/config.go TLSClientConfig.ServerName; httpcore's
            # `sni_hostname` request extension sets both)
            request.extensions["sni_hostname"] = server_name
        sent = await authorization(self._api)
        if sent:
            request.headers["Authorization"] = sent
        response = yield request
        if response.status_code == 401 and sent:
            renewed = await authorization_after_refusal(self._api, sent)
            if renewed and renewed != sent:
                request.headers["Authorization"] = renewed
                yield request


def proxy_client(api: client.ApiClient, timeout: float) -> httpx2.AsyncClient:
    """An HTTP client to the API server as the API client reaches it: its CA, client certificate, token, server
    name and proxy (the kubeconfig's `proxy-url`; else the environment's, as kubernetes_asyncio 36.1.0
    client/rest.py does with `trust_env=True`)."""
    configuration = api.configuration
    return httpx2.AsyncClient(verify=tls_context(configuration), auth=ApiServerAuth(api), proxy=configuration.proxy,
                              timeout=httpx2.Timeout(timeout), follow_redirects=False)


def import_mcp_client() -> tuple:
    """The MCP SDK's client. Importing it takes 1 to 2 s of CPU: a run with MCP checks starts that in a thread as
    it starts (`warm_mcp_client`), while its builds run, rather than on the critical path at its first check."""
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client
    from mcp_types import PaginatedRequestParams

    return ClientSession, streamable_http_client, PaginatedRequestParams


def warm_mcp_client(components: list) -> asyncio.Future | None:
    """Start importing the MCP client when one of these components' releases has an MCP check."""
    if any(c.release and c.release.verify.mcp for c in components):
        return asyncio.ensure_future(asyncio.to_thread(import_mcp_client))
    return None


async def check_mcp(http: httpx2.AsyncClient, url: str, tools: list[str], timeout: float) -> McpServer:
    """The MCP handshake over streamable HTTP, then tools/list (every page); VerificationFailed naming what broke."""
    ClientSession, streamable_http_client, PaginatedRequestParams = import_mcp_client()

    refusals: list[str] = []

    async def note_refusal(response: httpx2.Response) -> None:
        """The SDK reports a refused POST as "Server returned an error response"; keep the status it saw."""
        if response.status_code >= 400 and str(response.request.url).startswith(url):
            refusals.append(f"{response.status_code} {response.reason_phrase}".strip())

    http.event_hooks["response"].append(note_refusal)
    try:
        with anyio.fail_after(timeout):
            async with (streamable_http_client(url, http_client=http) as (read, write),
                        ClientSession(read, write, read_timeout_seconds=timeout) as session):
                initialized = await session.initialize()
                listed, cursor = [], None
                for _ in range(MAX_TOOL_PAGES):
                    page = await session.list_tools(params=PaginatedRequestParams(cursor=cursor) if cursor else None)
                    listed += [tool.name for tool in page.tools]
                    if not (cursor := page.next_cursor):
                        break
    except TimeoutError:
        raise VerificationFailed(f"no MCP handshake within {timeout:.0f}s") from None
    except Exception as exc:  # noqa: BLE001 - the SDK raises many kinds, often grouped by its task group
        answered = f" (HTTP {refusals[-1]})" if refusals else ""
        raise VerificationFailed(f"the MCP handshake failed: {_reason(exc)}{answered}") from None
    finally:
        http.event_hooks["response"].remove(note_refusal)
    server = McpServer(name=initialized.server_info.name, version=initialized.server_info.version or "",
                       protocol_version=initialized.protocol_version, tools=listed)
    if problem := missing_tools(tools, listed):
        raise VerificationFailed(f"MCP server {server.name} {server.version} {problem}")
    return server


def _reason(exc: BaseException) -> str:
    """The innermost meaningful message of an exception or exception group."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


async def check_http(http: httpx2.AsyncClient, url: str, status: int) -> int:
    """A GET that must answer `status`."""
    try:
        response = await http.get(url)
    except httpx2.TimeoutException:
        raise VerificationFailed("no answer in time") from None
    except httpx2.HTTPError as exc:
        raise VerificationFailed(f"the request failed: {_reason(exc)}") from None
    if response.status_code != status:
        raise VerificationFailed(f"answered {response.status_code}, expected {status}{_excerpt(response.content)}")
    return response.status_code


async def run_helm_test(helm: Helm, release: ReleaseSpec) -> None:
    """`helm test`; VerificationFailed with the failing tests' logs."""
    try:
        await helm.run(helm_test_args(release), release.verify.timeout_seconds + 60)
    except DeployFailed as exc:
        raise VerificationFailed(helm_test_failure(str(exc), exc.output)) from None


async def verify_release(release: ReleaseSpec, checks: Checks, *, helm, api: client.ApiClient) -> Verification:
    """Every check at once; VerificationFailed listing each one that failed."""
    timeout = release.verify.timeout_seconds
    server = api.configuration.host
    keys: list[str] = []
    runs = []
    async with contextlib.AsyncExitStack() as clients:
        async def opened() -> httpx2.AsyncClient:
            return await clients.enter_async_context(proxy_client(api, timeout))

        if checks.helm_tests:
            keys.append("release.verify.helm_test")
            runs.append(run_helm_test(helm, release))
        if mcp := checks.mcp:
            keys.append(f"release.verify.mcp ({mcp.service}:{mcp.port}{mcp.path})")
            runs.append(check_mcp(await opened(), proxy_url(server, release.namespace, mcp.service, mcp.port,
                                                            mcp.path), mcp.tools, timeout))
        for i, check in enumerate(checks.http):
            keys.append(f"release.verify.http[{i}] (GET {check.service}:{check.port}{check.path})")
            runs.append(check_http(await opened(), proxy_url(server, release.namespace, check.service, check.port,
                                                             check.path), check.status))
        outcomes = await asyncio.gather(*runs, return_exceptions=True)
    failures = [(key, outcome) for key, outcome in zip(keys, outcomes) if isinstance(outcome, BaseException)]
    for _, outcome in failures:
        if not isinstance(outcome, VerificationFailed):
            raise outcome
    if failures:
        raise VerificationFailed(
            f"verification failed: {'; '.join(f'{key}: {exc.summary.splitlines()[0]}' for key, exc in failures)}",
            "\n".join(f"{key}: {exc}" for key, exc in failures))
    results = iter(outcomes)
    if checks.helm_tests:
        next(results)
    return Verification(
        helm_tests=checks.helm_tests or None,
        mcp=next(results) if checks.mcp else None,
        http=[HttpAnswer(service=c.service, port=c.port, path=c.path, status=next(results)) for c in checks.http],
    )
