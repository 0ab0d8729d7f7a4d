"""Runs longer than an EKS token: a kubeconfig whose user runs an exec plugin (`aws eks get-token`), against an
emulator that refuses the plugin's tokens once they expire (sandbox/kube/exec_credential.py, rbac.ExecTokens)."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import pytest
import yaml
from sandbox.kube import exec_credential
from tests.conftest import wait_until
from tests.test_rbac import KUBECTL, call

PRINCIPAL = "arn:aws:iam::123456789012:role/buildkit-pipeline"
USERNAME, GROUP = "buildkit-pipeline-ci", "buildkit-pipeline"


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
