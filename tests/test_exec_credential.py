"""Runs longer than an EKS token: a kubeconfig whose user runs an exec plugin (`aws eks get-token`), against an
emulator that refuses the plugin's tokens once they expire (sandbox/kube/exec_credential.py, rbac.ExecTokens)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
import uuid

import pytest
import yaml
from kubernetes_asyncio import client

from flows.kube import Watch, kube_api
from sandbox.kube import exec_credential
from tests.conftest import wait_until
from tests.test_rbac import (
    KUBECTL,
    RBAC_FILE,
    RELEASE_RBAC_FILE,
    admin,
    call,
    helm_revisions,
    in_build_namespace,
    release_names,
    run_as,
)

PRINCIPAL = "arn:aws:iam::123456789012:role/buildkit-pipeline"
USERNAME, GROUP = "buildkit-pipeline-ci", "buildkit-pipeline"
MCP_REPOSITORY = "123456789012.dkr.ecr.us-west-2.amazonaws.com/agents-on-eks/weather-mcp"
AGENT_REPOSITORY = "123456789012.dkr.ecr.us-west-2.amazonaws.com/agents-on-eks/weather-agent"
PYTHON_CLIENT = "OpenAPI-Generator/"  # kubernetes_asyncio's User-Agent; kubectl's and helm's name themselves


def uses_by(sandbox, client_prefix: str, since: float) -> list:
    return [u for u in sandbox.kube.exec_token_uses if u.client.startswith(client_prefix) and u.time >= since]


def outcomes(uses) -> list[str]:
    return [u.outcome for u in uses]


@pytest.fixture
def exec_namespace(sandbox, tmp_path):
    """A namespace where the exec user may read and watch ConfigMaps, through the group its access entry gives."""
    namespace = f"exec-{uuid.uuid4().hex[:8]}"
    sandbox.kube.create("namespaces", None, {"metadata": {"name": namespace}})
    sandbox.kube.create("roles", namespace, {"metadata": {"name": "reader"}, "rules": [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]}]})
    sandbox.kube.create("rolebindings", namespace, {
        "metadata": {"name": "reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": GROUP}]})
    sandbox.kube.create("configmaps", namespace, {"metadata": {"name": "first"}, "data": {}})
    return namespace


def exec_kubeconfig(sandbox, tmp_path, lifetime: float) -> str:
    return str(sandbox.kube.write_exec_kubeconfig(tmp_path / "exec.kubeconfig", PRINCIPAL, lifetime,
                                                  username=USERNAME, groups=(GROUP,)))


# ---------------------------------------------------------------- the stand-in


def test_the_plugin_prints_an_exec_credential_like_aws_eks_get_token(sandbox, tmp_path, exec_namespace):
    """The ExecCredential of client.authentication.k8s.io/v1, its expiry 14/15 of the lifetime in whole seconds;
    the emulator answers the token as RBAC allows for the mapped user, and 401 once it has expired."""
    path = exec_kubeconfig(sandbox, tmp_path, 2)
    user = yaml.safe_load(open(path))["users"][0]["user"]["exec"]
    before = time.time()
    done = subprocess.run([user["command"], *user["args"]], capture_output=True, text=True, timeout=30,
                          env={"KUBERNETES_EXEC_INFO": json.dumps({"apiVersion": exec_credential.V1,
                                                                   "kind": "ExecCredential",
                                                                   "spec": {"interactive": False}})})
    assert done.returncode == 0, done.stderr
    credential = json.loads(done.stdout)
    assert (credential["kind"], credential["apiVersion"], set(credential["status"])) == (
        "ExecCredential", exec_credential.V1, {"token", "expirationTimestamp"})
    expires = time.mktime(time.strptime(credential["status"]["expirationTimestamp"], "%Y-%m-%dT%H:%M:%SZ")) \
        - time.timezone
    assert expires >= int(before)
    token = credential["status"]["token"]
    assert token.startswith(exec_credential.PREFIX)

    assert call(sandbox, "GET", f"/api/v1/namespaces/{exec_namespace}/configmaps", token)[0] == 200
    status, answer = call(sandbox, "GET", f"/api/v1/namespaces/{exec_namespace}/secrets", token)
    assert (status, answer["message"]) == (403, f'secrets is forbidden: User "{USERNAME}" cannot list resource '
                                                f'"secrets" in API group "" in the namespace "{exec_namespace}"')
    _, issued, lifetime_end = exec_credential.verify(sandbox.kube.rbac.authenticator.exec_tokens.key, token)
    assert issued >= before and lifetime_end == issued + 2 and expires <= issued + 2 * 14 / 15
    wait_until(lambda: time.time() > lifetime_end, timeout=5, what="the token's lifetime")
    assert call(sandbox, "GET", f"/api/v1/namespaces/{exec_namespace}/configmaps", token)[1] == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "Unauthorized",
        "reason": "Unauthorized", "code": 401}
    assert call(sandbox, "GET", f"/api/v1/namespaces/{exec_namespace}/configmaps", token[:-2] + "AA")[0] == 401
    assert call(sandbox, "GET", f"/api/v1/namespaces/{exec_namespace}/configmaps",
                exec_credential.mint(sandbox.kube.rbac.authenticator.exec_tokens.key,
                                     "arn:aws:iam::123456789012:role/nobody", 60))[0] == 401, "no access entry"


def test_kubectl_authenticates_through_the_plugin(sandbox, tmp_path, exec_namespace):
    """client-go runs the plugin itself (exec.go) and sends its token: kubectl is the mapped user."""
    path = exec_kubeconfig(sandbox, tmp_path, 60)
    since = time.time()
    done = subprocess.run([str(KUBECTL), "--kubeconfig", path, "get", "configmaps", "-n", exec_namespace, "-o", "name"],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "configmap/first\n"), done.stderr
    assert outcomes(uses_by(sandbox, "kubectl/", since)) == ["accepted"]
    assert [r.user for r in sandbox.kube.requests if r.namespace == exec_namespace][-1:] == [USERNAME]


# ---------------------------------------------------------------- the flow's API client


def test_the_flows_client_runs_the_plugin_again_once_the_token_has_expired(sandbox, tmp_path, exec_namespace):
    """Before a request, a token past its expirationTimestamp is replaced: the request is never refused."""
    path = exec_kubeconfig(sandbox, tmp_path, 2)
    since = time.time()

    async def two_requests_a_token_apart():
        async with kube_api(path) as api:
            core = client.CoreV1Api(api)
            await core.list_namespaced_config_map(exec_namespace)
            await asyncio.sleep(2.1)
            return await core.list_namespaced_config_map(exec_namespace)

    listed = asyncio.run(two_requests_a_token_apart())
    assert [c.metadata.name for c in listed.items] == ["first"]
    assert outcomes(uses_by(sandbox, PYTHON_CLIENT, since)) == ["accepted", "accepted"]


def test_a_refused_token_is_replaced_and_the_request_and_a_reopened_watch_sent_again(sandbox, tmp_path,
                                                                                       exec_namespace):
    """A 401 for a token the client still holds valid (revoked, or a server clock ahead): the plugin runs again,
    the request goes once more with the new token; a watch opened again after its stream ended the same."""
    path = exec_kubeconfig(sandbox, tmp_path, 600)
    since = time.time()

    async def through_a_revocation():
        async with kube_api(path) as api:
            core = client.CoreV1Api(api)
            await core.list_namespaced_config_map(exec_namespace)
            sandbox.kube.revoke_exec_tokens()
            listed = await core.list_namespaced_config_map(exec_namespace)
            async with Watch(api) as stream:
                async for event in stream.stream(core.list_namespaced_config_map, exec_namespace, timeout_seconds=30):
                    sandbox.kube.revoke_exec_tokens()
                    sandbox.kube.drop_watches()
            names = []
            async with Watch(api) as stream:
                async for event in stream.stream(core.list_namespaced_config_map, exec_namespace, timeout_seconds=1):
                    names.append(event["object"].metadata.name)
            return listed, names

    listed, names = asyncio.run(through_a_revocation())
    assert [c.metadata.name for c in listed.items] == ["first"]
    assert names == ["first"]
    assert outcomes(uses_by(sandbox, PYTHON_CLIENT, since)) == ["accepted", "revoked", "accepted", "revoked",
                                                                "accepted"]
    mine = [r for r in sandbox.kube.requests if r.namespace == exec_namespace]
    assert [r.status for r in mine if r.query.get("watch")][-2:] == [401, 200], "the reopened watch, sent again"


# ---------------------------------------------------------------- a pipeline run


def provision_exec_user(sandbox, app) -> None:
    """The shipped RBAC manifests, and RoleBindings of the same roles for the group the access entry gives
    (EKS access entries map an IAM principal to a username and `kubernetesGroups`)."""
    build = app.config.build.namespace
    admin(sandbox, "apply", "-f", "-", stdin=in_build_namespace(RBAC_FILE.read_text(), build))
    group = [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": GROUP}]
    sandbox.kube.create("rolebindings", build, {
        "metadata": {"name": "buildkit-pipeline-group"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "buildkit-pipeline"},
        "subjects": group})
    for namespace in release_names(app):
        admin(sandbox, "apply", "-n", namespace, "-f", "-",
              stdin=in_build_namespace(RELEASE_RBAC_FILE.read_text(), build))
        sandbox.kube.create("rolebindings", namespace, {
            "metadata": {"name": "buildkit-pipeline-release-group"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "buildkit-pipeline-release"},
            "subjects": group})


def build_pod_running(sandbox, app) -> bool:
    return any((p.get("status") or {}).get("phase") == "Running"
               for p in sandbox.kube.list("pods", app.config.build.namespace))


def test_a_run_longer_than_its_exec_token_builds_and_deploys(prefect_server, sandbox, example_app, tmp_path):
    """Tokens of 3 s, builds held until the helper is done: the build's watches reopen after the token expired, a
    token is revoked mid-build, and the cleanup, helm and the rollout check come after; the run refreshes and passes.
    On the code before the fix every request after the first token's lifetime got 401 and both builds failed."""
    app = example_app
    provision_exec_user(sandbox, app)
    kubeconfig = exec_kubeconfig(sandbox, tmp_path, 3)
    since, first = time.time(), len(sandbox.kube.requests)
    problems: list[str] = []

    def mid_build() -> None:
        """Once the run's token expired during a build, end its watches (they reopen: a new token, no refusal);
        then revoke that token and end them again (they reopen: refused, a new token, sent again)."""
        def flow_uses() -> list:
            return uses_by(sandbox, PYTHON_CLIENT, since)

        try:
            wait_until(lambda: build_pod_running(sandbox, app), timeout=120, what="a build pod running")
            wait_until(lambda: flow_uses() and time.time() > max(u.expires for u in flow_uses()), timeout=10,
                       what="the run's token to expire")
            accepted = len(flow_uses())
            sandbox.kube.drop_watches()
            wait_until(lambda: len(flow_uses()) > accepted, timeout=10, what="a new token once the last expired")
            sandbox.kube.revoke_exec_tokens()
            sandbox.kube.drop_watches()
            wait_until(lambda: "revoked" in outcomes(flow_uses()), timeout=10, what="a refused request")
        except AssertionError as exc:
            problems.append(str(exc))
        finally:
            release.set()

    release = threading.Event()
    for repository in (MCP_REPOSITORY, AGENT_REPOSITORY):
        sandbox.buildkit.holds[repository] = release
    helper = threading.Thread(target=mid_build, daemon=True)
    helper.start()
    try:
        state = run_as(app, kubeconfig)
        requests = sandbox.kube.requests[first:]
    finally:
        release.set()
        for repository in (MCP_REPOSITORY, AGENT_REPOSITORY):
            sandbox.buildkit.holds.pop(repository, None)
        helper.join(timeout=30)

    assert state.is_completed(), state.message
    assert problems == []
    for component in ("weather-mcp", "weather-agent"):
        release = app.config.component(component).release
        assert helm_revisions(sandbox, release.name, release.namespace) == [1]
    flow = uses_by(sandbox, PYTHON_CLIENT, since)
    assert outcomes(flow).count("accepted") >= 3, "the run's own client ran the plugin again"
    assert "revoked" in outcomes(flow) and "expired" not in outcomes(flow), \
        "refused only when revoked: an expired token is replaced before it is sent"
    helm = uses_by(sandbox, "Helm/", since)
    assert helm and set(outcomes(helm)) == {"accepted"}
    assert {r.user for r in requests if r.status != 401} == {USERNAME}, "every request as the exec user"
    refused = [r for r in requests if r.status == 401]
    assert refused and not [r for r in requests if r.status == 403]
    for request in refused:
        assert any(r.path == request.path and r.method == request.method and r.status < 400 and r.time >= request.time
                   for r in requests), f"{request.method} {request.path} was sent again and answered"
