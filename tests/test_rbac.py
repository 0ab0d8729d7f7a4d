"""The flow and helm under the shipped RBAC manifests, as the flow's ServiceAccount, against an emulator that
enforces RBAC for ServiceAccount tokens the way the API server does."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import urllib.error
import urllib.request
import uuid

import pytest
import yaml

from flows.pipeline import build_and_deploy, connected_locally
from sandbox.example import commit_all
from tests.conftest import HELM, REPO_ROOT

KUBECTL = REPO_ROOT / ".tools" / "bin" / "kubectl"
MCP, AGENT = "weather-mcp", "weather-agent"
SERVICE_ACCOUNT = "buildkit-pipeline"
RBAC_FILE = REPO_ROOT / "deployments" / "rbac.yaml"
RELEASE_RBAC_FILE = REPO_ROOT / "deployments" / "rbac-release.yaml"
CREATE_NAMESPACE_RBAC_FILE = REPO_ROOT / "deployments" / "rbac-create-namespace.yaml"


# ---------------------------------------------------------------- helpers


def admin(sandbox, *args: str, stdin: str | None = None) -> str:
    """kubectl as the sandbox's admin (no token: system:masters)."""
    done = subprocess.run([str(KUBECTL), "--kubeconfig", str(sandbox.kubeconfig), *args], input=stdin,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def in_build_namespace(manifest: str, build_namespace: str) -> str:
    """A shipped manifest with the test's build namespace for `build` (each test has namespaces of its own)."""
    documents = list(yaml.safe_load_all(manifest))
    for document in documents:
        if document["metadata"].get("namespace") == "build":
            document["metadata"]["namespace"] = build_namespace
        for subject in document.get("subjects") or []:
            if subject.get("namespace") == "build":
                subject["namespace"] = build_namespace
    return yaml.safe_dump_all(documents)


def service_account_user(namespace: str) -> str:
    return f"system:serviceaccount:{namespace}:{SERVICE_ACCOUNT}"


def provision(sandbox, app, *, release_namespaces: list[str]) -> str:
    """What README's "Pointing it at a real EKS cluster" tells the admin to do: namespaces, deployments/rbac.yaml,
    deployments/rbac-release.yaml in each release namespace; returns a kubeconfig of the flow's ServiceAccount."""
    build = app.config.build.namespace
    for namespace in [build, *release_namespaces]:
        if sandbox.kube.get("namespaces", None, namespace) is None:  # Sandbox.prepare creates those of the config
            admin(sandbox, "create", "namespace", namespace)
    admin(sandbox, "apply", "-f", "-", stdin=in_build_namespace(RBAC_FILE.read_text(), build))
    for namespace in release_namespaces:
        admin(sandbox, "apply", "-n", namespace, "-f", "-",
              stdin=in_build_namespace(RELEASE_RBAC_FILE.read_text(), build))
    path = app.root.parent / f"{SERVICE_ACCOUNT}.kubeconfig"
    return str(sandbox.kube.write_service_account_kubeconfig(path, build, SERVICE_ACCOUNT))


def release_names(app) -> list[str]:
    return [c.release.namespace for c in app.config.components if c.release]


def helm_revisions(sandbox, release: str, namespace: str) -> list[int]:
    out = subprocess.run([str(HELM), "history", release, "-n", namespace, "-o", "json", "--kubeconfig",
                          str(sandbox.kubeconfig)], check=True, capture_output=True, text=True).stdout
    return [entry["revision"] for entry in json.loads(out)]


def call(sandbox, method: str, path: str, token: str | None = None, body: dict | None = None,
         content_type: str = "application/json") -> tuple[int, dict]:
    """One HTTPS request to the emulator, verifying its certificate."""
    context = ssl.create_default_context(cadata=sandbox.kube.certificate.ca_pem.decode())
    request = urllib.request.Request(sandbox.kube.https_url + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            text = response.read()
            return response.status, json.loads(text) if response.headers.get_content_type() == "application/json" \
                else {"text": text.decode()}
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def account(sandbox):
    """A namespace with a ServiceAccount and a token for it, minted through the TokenRequest API."""
    namespace = f"rbac-{uuid.uuid4().hex[:8]}"
    sandbox.kube.create("namespaces", None, {"metadata": {"name": namespace}})
    sandbox.kube.create("serviceaccounts", namespace, {"metadata": {"name": "robot"}})
    status, answer = call(sandbox, "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/robot/token",
                          body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                "spec": {"expirationSeconds": 600}})
    assert status == 201, answer
    return namespace, answer["status"]["token"]


def grant(sandbox, namespace: str, rules: list[dict]) -> None:
    sandbox.kube.create("roles", namespace, {"metadata": {"name": "robot"}, "rules": rules})
    sandbox.kube.create("rolebindings", namespace, {
        "metadata": {"name": "robot"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "robot"},
        "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": namespace}]})


# ---------------------------------------------------------------- the emulator's RBAC


def test_a_service_account_is_refused_with_the_api_servers_own_words(sandbox, account):
    namespace, token = account
    user = f"system:serviceaccount:{namespace}:robot"

    status, answer = call(sandbox, "POST", "/api/v1/namespaces", token, {"metadata": {"name": "nope"}})
    assert (status, answer["reason"], answer["message"]) == (403, "Forbidden", (
        f'namespaces is forbidden: User "{user}" cannot create resource "namespaces" in API group "" at the '
        "cluster scope"))
    assert answer["details"] == {"name": "", "group": "", "kind": "namespaces"}
    status, answer = call(sandbox, "GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/x", token)
    assert (status, answer["message"]) == (403, (
        f'jobs.batch "x" is forbidden: User "{user}" cannot get resource "jobs" in API group "batch" in the '
        f'namespace "{namespace}"'))
    status, answer = call(sandbox, "GET", f"/api/v1/namespaces/{namespace}/pods/p/log", token)
    assert answer["message"].endswith(f'cannot get resource "pods/log" in API group "" in the namespace "{namespace}"')
    status, answer = call(sandbox, "GET", "/metrics", token)
    assert (status, answer["message"]) == (403, f'forbidden: User "{user}" cannot get path "/metrics"')
    assert call(sandbox, "GET", "/api/v1/namespaces", "not-a-token")[1] == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "Unauthorized",
        "reason": "Unauthorized", "code": 401}
    for path in ("/api", "/apis", "/api/v1", "/apis/apps/v1", "/version", "/openapi/v3", "/healthz"):
        assert call(sandbox, "GET", path, token)[0] == 200, path
    assert call(sandbox, "GET", "/api/v1/namespaces")[0] == 200, "no token: the sandbox's admin"
    mine = [r for r in sandbox.kube.requests if r.path == f"/apis/batch/v1/namespaces/{namespace}/jobs/x"]
    assert [(r.user, r.status) for r in mine] == [(user, 403)]


def test_verbs_subresources_and_names_are_derived_as_the_api_server_does(sandbox, account):
    namespace, token = account
    base = f"/api/v1/namespaces/{namespace}"
    grant(sandbox, namespace, [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"], "resourceNames": ["one"]},
        {"apiGroups": ["batch"], "resources": ["jobs/status"], "verbs": ["get"]},
    ])
    assert call(sandbox, "GET", f"{base}/pods", token)[0] == 200
    assert call(sandbox, "GET", f"{base}/pods?watch=false", token)[0] == 200
    status, answer = call(sandbox, "GET", f"{base}/pods?watch=true&timeoutSeconds=1", token)
    assert status == 403 and 'cannot watch resource "pods"' in answer["message"]
    assert 'cannot get resource "pods"' in call(sandbox, "GET", f"{base}/pods/p", token)[1]["message"]
    assert "cannot deletecollection" in call(sandbox, "DELETE", f"{base}/pods", token)[1]["message"]
    # a list or watch selecting one name by metadata.name is authorized for that name (resourceNames)
    assert call(sandbox, "GET", f"{base}/secrets?fieldSelector=metadata.name%3Done", token)[0] == 200
    status, answer = call(sandbox, "GET", f"{base}/secrets?fieldSelector=metadata.name%3Dtwo", token)
    assert (status, answer["message"].split(":")[0]) == (403, 'secrets "two" is forbidden')
    assert call(sandbox, "GET", f"{base}/secrets", token)[0] == 403
    assert call(sandbox, "GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/j/status", token)[0] == 404, \
        "authorized for jobs/status; the Job does not exist"
    assert call(sandbox, "GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/j", token)[0] == 403


def test_a_server_side_apply_that_creates_needs_create_as_well_as_patch(sandbox, account):
    namespace, token = account
    grant(sandbox, namespace, [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["patch"]}])
    path = f"/api/v1/namespaces/{namespace}/configmaps/applied?fieldManager=test"
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}, "data": {"a": "1"}}
    status, answer = call(sandbox, "PATCH", path, token, body, "application/apply-patch+yaml")
    assert (status, answer["message"]) == (403, 'configmaps "applied" is forbidden: ')
    sandbox.kube.create("configmaps", namespace, {"metadata": {"name": "applied"}})
    assert call(sandbox, "PATCH", path, token, body, "application/apply-patch+yaml")[0] == 200


def test_a_binding_to_a_missing_role_says_so_and_a_deleted_accounts_token_stops_working(sandbox, account):
    namespace, token = account
    sandbox.kube.create("rolebindings", namespace, {
        "metadata": {"name": "dangling"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "nowhere"},
        "subjects": [{"kind": "ServiceAccount", "name": "robot"}]})
    status, answer = call(sandbox, "GET", f"/api/v1/namespaces/{namespace}/pods", token)
    assert status == 403
    assert answer["message"].endswith(': RBAC: clusterrole.rbac.authorization.k8s.io "nowhere" not found')
    status, answer = call(sandbox, "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/robot/token",
                          body={"spec": {"expirationSeconds": 60}})
    assert (status, answer["message"]) == (422, 'TokenRequest.authentication.k8s.io "" is invalid: '
                                                "spec.expirationSeconds: Invalid value: 60: may not specify a "
                                                "duration less than 10 minutes")
    sandbox.kube.delete("serviceaccounts", namespace, "robot")
    assert call(sandbox, "GET", "/api", token)[0] == 401


def test_kubectl_with_a_service_account_kubeconfig_sends_the_token(sandbox, account, tmp_path):
    namespace, _ = account
    kubeconfig = sandbox.kube.write_service_account_kubeconfig(tmp_path / "kubeconfig", namespace, "robot")
    done = subprocess.run([str(KUBECTL), "--kubeconfig", str(kubeconfig), "create", "namespace", "nope"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f'Error from server (Forbidden): namespaces is forbidden: User "system:serviceaccount:{namespace}:robot" '
        'cannot create resource "namespaces" in API group "" at the cluster scope')


def test_a_service_account_cannot_grant_more_than_it_holds_without_escalate_or_bind(sandbox, account):
    """RBAC escalation prevention: creating or changing a Role needs every permission in it (or `escalate`), a
    RoleBinding needs the referenced role's permissions (or `bind` on it); refusals are the API server's 403."""
    namespace, token = account
    user = f"system:serviceaccount:{namespace}:robot"
    groups = f'["system:serviceaccounts" "system:serviceaccounts:{namespace}" "system:authenticated"]'
    rbac_api = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}"
    rbac_rights = {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"],
                   "verbs": ["create", "get", "patch", "update"]}
    grant(sandbox, namespace, [rbac_rights, {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}])

    def role(name: str, rules: list[dict]) -> tuple[int, dict]:
        return call(sandbox, "POST", f"{rbac_api}/roles", token, {"metadata": {"name": name}, "rules": rules})

    def binding(name: str, kind: str, role_name: str) -> tuple[int, dict]:
        return call(sandbox, "POST", f"{rbac_api}/rolebindings", token, {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role_name},
            "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": namespace}]})

    status, answer = role("wider", [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]},
                                    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}])
    assert (status, answer["reason"], answer["message"]) == (403, "Forbidden", (
        f'roles.rbac.authorization.k8s.io "wider" is forbidden: user "{user}" (groups={groups}) is attempting to '
        'grant RBAC permissions not currently held:\n{APIGroups:[""], Resources:["secrets"], Verbs:["get" "list"]}'))
    assert answer["details"] == {"name": "wider", "group": "rbac.authorization.k8s.io", "kind": "roles"}
    assert role("narrow", [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}])[0] == 201

    status, answer = binding("admin", "ClusterRole", "cluster-admin")
    assert (status, answer["message"]) == (403, (
        f'rolebindings.rbac.authorization.k8s.io "admin" is forbidden: user "{user}" (groups={groups}) is attempting '
        'to grant RBAC permissions not currently held:\n{APIGroups:["*"], Resources:["*"], Verbs:["*"]}\n'
        '{NonResourceURLs:["*"], Verbs:["*"]}'))
    assert binding("narrow", "Role", "narrow")[0] == 201
    status, answer = binding("ghost", "Role", "ghost")
    assert (status, answer["message"]) == (404, 'roles.rbac.authorization.k8s.io "ghost" not found')
    status, answer = call(sandbox, "PATCH", f"{rbac_api}/roles/narrow", token,
                          {"rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]},
                          "application/merge-patch+json")
    assert (status, answer["message"].split(":")[0]) == (403, 'roles.rbac.authorization.k8s.io "narrow" is forbidden')
    assert sandbox.kube.get("roles", namespace, "narrow")["rules"][0]["resources"] == ["configmaps"]
    assert {sandbox.kube.get("rolebindings", namespace, n) is None for n in ("admin", "ghost")} == {True}
    assert sandbox.kube.get("roles", namespace, "wider") is None

    sandbox.kube.patch("roles", namespace, "robot", {"rules": [rbac_rights, {
        "apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles"], "verbs": ["escalate"]}, {
        "apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"], "verbs": ["bind"],
        "resourceNames": ["cluster-admin"]}]})
    status, answer = call(sandbox, "PATCH", f"{rbac_api}/roles/narrow", token,
                          {"rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]},
                          "application/merge-patch+json")
    assert status == 200, answer
    assert sandbox.kube.get("roles", namespace, "narrow")["rules"][0]["resources"] == ["secrets"]
    assert binding("admin", "ClusterRole", "cluster-admin")[0] == 201, "bind on that ClusterRole"


# ---------------------------------------------------------------- the flow under the shipped manifests


def test_the_first_install_under_the_shipped_rbac_deploys_as_the_flows_service_account(
    prefect_server, sandbox, example_app
):
    """Namespaces created by the admin, deployments/rbac.yaml and deployments/rbac-release.yaml applied: the first
    run installs both releases, every API request of the run (flow, helm, rollout check) as the ServiceAccount."""
    app = example_app
    kubeconfig = provision(sandbox, app, release_namespaces=release_names(app))
    first = len(sandbox.kube.requests)

    state = run_as(app, kubeconfig)
    requests = sandbox.kube.requests[first:]

    assert state.is_completed(), state.message
    for component in (MCP, AGENT):
        release = app.config.component(component).release
        assert helm_revisions(sandbox, release.name, release.namespace) == [1]
        assert sandbox.kube.get("deployments", release.namespace, release.name) is not None
    user = service_account_user(app.config.build.namespace)
    assert requests and [(r.method, r.path) for r in requests if r.user != user] == [], \
        "every request of the run, as the ServiceAccount"
    assert not [(r.method, r.path, r.status) for r in requests if r.status in (401, 403)]
    assert {r.namespace for r in requests if r.verb in ("create", "patch")} >= {
        app.config.build.namespace, *release_names(app)}


def run_as(app, kubeconfig: str, **params):
    """One run of the real flow with the ServiceAccount's kubeconfig instead of the sandbox admin's."""
    with connected_locally(**{**app.flow_kwargs, "kubeconfig": kubeconfig}):
        return asyncio.run(build_and_deploy(config=str(app.pipeline_file), **params, return_state=True))


def set_release_key(app, component: str, key: str, value) -> None:
    document = yaml.safe_load(app.pipeline_file.read_text())
    [entry] = [c for c in document["components"] if c["name"] == component]
    entry["release"][key] = value
    app.pipeline_file.write_text(yaml.safe_dump(document, sort_keys=False))
    commit_all(app.root, f"release.{key} for {component}")


def test_create_namespace_is_opt_in_and_works_with_the_shipped_cluster_role(prefect_server, sandbox, example_app):
    """`release.create_namespace: true` with deployments/rbac-create-namespace.yaml: helm creates the namespace."""
    app = example_app
    mcp_namespace = f"{app.config.component(MCP).release.namespace}-helm-made"
    set_release_key(app, MCP, "namespace", mcp_namespace)
    set_release_key(app, MCP, "create_namespace", True)
    kubeconfig = provision(sandbox, app, release_namespaces=[])
    admin(sandbox, "apply", "-n", app.config.build.namespace, "-f", "-",
          stdin=in_build_namespace(RELEASE_RBAC_FILE.read_text(), app.config.build.namespace))
    admin(sandbox, "apply", "-f", "-",
          stdin=in_build_namespace(CREATE_NAMESPACE_RBAC_FILE.read_text(), app.config.build.namespace))
    assert sandbox.kube.get("namespaces", None, mcp_namespace) is None

    state = run_as(app, kubeconfig, components=[MCP])

    assert state.is_completed(), state.message
    namespace = sandbox.kube.get("namespaces", None, mcp_namespace)
    assert namespace["metadata"]["labels"]["name"] == mcp_namespace, "helm's own Namespace (install.go)"
    assert helm_revisions(sandbox, MCP, mcp_namespace) == [1]


def test_a_release_into_a_namespace_nobody_created_fails_with_helms_message(prefect_server, sandbox, example_app):
    """Without `release.create_namespace`, helm does not create the release namespace and the API server refuses
    its release Secret there (NamespaceLifecycle): the run fails naming the namespace; nothing lands anywhere."""
    app = example_app
    missing = f"{app.config.component(MCP).release.namespace}-never-created"
    set_release_key(app, MCP, "namespace", missing)

    state = app.run(components=[MCP])

    assert state.is_failed()
    assert f'create: failed to create: namespaces "{missing}" not found' in state.message, "helm's storage driver"
    assert sandbox.kube.get("namespaces", None, missing) is None
    assert sandbox.kube.list("secrets", missing) == []
    refused = [r for r in sandbox.kube.requests if r.namespace == missing and r.verb == "create"]
    assert refused and {r.status for r in refused} == {404}


def test_kubectl_auth_can_i_is_answered_from_the_enforced_rbac(sandbox, account, tmp_path):
    """`kubectl auth can-i` sends a SelfSubjectAccessReview (protobuf); the emulator answers it from the same RBAC
    it enforces: allowed with the binding that allows it, or not (kubernetes/kubernetes
    pkg/registry/authorization/selfsubjectaccessreview/rest.go, plugin/pkg/auth/authorizer/rbac/rbac.go)."""
    namespace, _ = account
    grant(sandbox, namespace, [{"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get"]}])
    kubeconfig = sandbox.kube.write_service_account_kubeconfig(tmp_path / "robot.kubeconfig", namespace, "robot")

    def can_i(*args: str) -> str:
        done = subprocess.run([str(KUBECTL), "--kubeconfig", str(kubeconfig), "auth", "can-i", *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode in (0, 1), done.stderr
        return done.stdout.strip()

    assert can_i("get", "pods", "-n", namespace) == "yes"
    assert can_i("get", "pods", "--subresource=log", "-n", namespace) == "yes"
    assert can_i("delete", "pods", "-n", namespace) == "no"
    assert can_i("get", "pods", "-n", "default") == "no"
    assert can_i("list", "deployments.apps", "-n", namespace) == "no"
    assert can_i("get", "/healthz") == "yes", "system:public-info-viewer"
    assert can_i("get", "/metrics") == "no"
    assert "selfsubjectaccessreviews" in admin(sandbox, "api-resources", "--api-group=authorization.k8s.io")

    status, review = call(sandbox, "POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                          token=sandbox.kube.rbac.authenticator.mint(namespace, "robot")[0],
                          body={"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                                "spec": {"resourceAttributes": {"namespace": namespace, "verb": "get",
                                                                "resource": "pods"}}})
    assert status == 201
    assert review["status"] == {"allowed": True, "reason": f'RBAC: allowed by RoleBinding "robot/{namespace}" of '
                                                           f'Role "robot" to ServiceAccount "robot/{namespace}"'}
    status, review = call(sandbox, "POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                          body={"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                                "spec": {"nonResourceAttributes": {"path": "/metrics", "verb": "get"}}})
    assert (status, review["status"]) == (201, {"allowed": True}), "the admin (system:masters): no reason"
