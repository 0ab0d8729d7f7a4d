"""`doctor`'s cluster checks against the emulator: green on a prepared sandbox, each one red with its fix when the one
thing it checks is missing, and `--fix` repairs what is safe to create."""

from __future__ import annotations

import asyncio
import subprocess

import pytest
import yaml

from flows.doctor.flow import check_target
from sandbox.example import commit_all
from tests.conftest import REPO_ROOT

KUBECTL = REPO_ROOT / ".tools" / "bin" / "kubectl"
ENFORCE = "pod-security.kubernetes.io/enforce"
FLOW_ACCOUNT = "buildkit-pipeline"


def cluster_findings(app, *, kubeconfig: str | None = None, fix: bool = False, said: list | None = None) -> dict:
    """check -> [findings] of the cluster group, as `doctor` reports them for the app's pipeline file."""
    kwargs = dict(app.flow_kwargs)
    if kubeconfig:
        kwargs["kubeconfig"] = kubeconfig
    findings = asyncio.run(check_target(app.pipeline_file, fix=fix, say=(said.append if said is not None else print),
                                        **kwargs))
    grouped: dict = {}
    for finding in findings:
        if finding.check.startswith("cluster"):
            grouped.setdefault(finding.check, []).append(finding)
    return grouped


def only(grouped: dict, check: str):
    [finding] = grouped[check]
    return finding


def edit_pipeline(app, change) -> None:
    document = yaml.safe_load(app.pipeline_file.read_text())
    change(document)
    app.pipeline_file.write_text(yaml.safe_dump(document, sort_keys=False))
    commit_all(app.root, "doctor test: pipeline file changed")


def admin(sandbox, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run([str(KUBECTL), "--kubeconfig", str(sandbox.kubeconfig), *args], input=stdin,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def shipped(name: str, build_namespace: str) -> str:
    from flows.doctor.cluster import in_build_namespace
    return in_build_namespace((REPO_ROOT / "deployments" / name).read_text(), build_namespace)


def flow_kubeconfig(sandbox, app, *, release_rbac: bool) -> str:
    """README's RBAC step as the admin does it, then a kubeconfig of the flow's ServiceAccount (as test_rbac.py)."""
    build = app.config.build.namespace
    admin(sandbox, "apply", "-f", "-", stdin=shipped("rbac.yaml", build))
    if release_rbac:
        for namespace in {c.release.namespace for c in app.config.components if c.release}:
            admin(sandbox, "apply", "-n", namespace, "-f", "-", stdin=shipped("rbac-release.yaml", build))
    path = app.root.parent / f"{FLOW_ACCOUNT}.kubeconfig"
    return str(sandbox.kube.write_service_account_kubeconfig(path, build, FLOW_ACCOUNT))


def release_namespaces(app) -> list[str]:
    return sorted({c.release.namespace for c in app.config.components if c.release})


# ---------------------------------------------------------------- green


def test_every_cluster_check_passes_on_a_prepared_sandbox(sandbox, example_app):
    grouped = cluster_findings(example_app)

    assert set(grouped) == {"cluster.reachable", "cluster.build-namespace", "cluster.pod-security",
                            "cluster.service-account", "cluster.rbac"}
    assert all(f.status == "pass" for findings in grouped.values() for f in findings), grouped
    assert "Kubernetes v1.35.0-sandbox" in only(grouped, "cluster.reachable").found
    assert len(grouped["cluster.rbac"]) == 1 + len(release_namespaces(example_app)), "build + each release namespace"


def test_the_flow_account_with_the_shipped_rbac_passes(sandbox, example_app):
    kubeconfig = flow_kubeconfig(sandbox, example_app, release_rbac=True)

    grouped = cluster_findings(example_app, kubeconfig=kubeconfig)

    assert [f.status for f in grouped.get("cluster.rbac", [])] == ["pass"] * 3, grouped
    unreadable = only(grouped, "cluster.build-namespace")
    assert unreadable.status == "warn" and "may not read the namespace" in unreadable.found, "deployments/rbac.yaml " \
        "grants no namespace reads: an AccessDenied is a warning with what to run instead"
    assert unreadable.fix == f"kubectl get namespace {example_app.config.build.namespace} --show-labels"
    reviews = [r for r in sandbox.kube.requests if r.resource == "selfsubjectaccessreviews"
               and r.user == f"system:serviceaccount:{example_app.config.build.namespace}:{FLOW_ACCOUNT}"]
    assert reviews and {r.status for r in reviews} == {201}


# ---------------------------------------------------------------- red, and repaired


def test_an_unknown_token_is_unreachable_with_the_fix(sandbox, example_app):
    kubeconfig = flow_kubeconfig(sandbox, example_app, release_rbac=False)
    sandbox.kube.delete("serviceaccounts", example_app.config.build.namespace, FLOW_ACCOUNT)

    grouped = cluster_findings(example_app, kubeconfig=kubeconfig)

    assert list(grouped) == ["cluster.reachable"], "nothing else can be asked"
    finding = only(grouped, "cluster.reachable")
    assert finding.status == "fail" and "answered 401 Unauthorized" in finding.found
    assert f"kubectl --kubeconfig {kubeconfig} version" in finding.fix


def test_a_missing_build_namespace_and_account_are_created_by_fix(sandbox, example_app):
    namespace = f"{example_app.config.build.namespace}-new"
    edit_pipeline(example_app, lambda d: d["build"].update(namespace=namespace))

    grouped = cluster_findings(example_app)

    red = only(grouped, "cluster.build-namespace")
    assert red.status == "fail" and f"{namespace} (build.namespace) does not exist" in red.found
    assert red.fix == f"kubectl create namespace {namespace}\nkubectl label namespace {namespace} {ENFORCE}=privileged"
    assert only(grouped, "cluster.service-account").status == "fail"
    assert only(grouped, "cluster.pod-security").status == "fail"

    said: list[str] = []
    repaired = cluster_findings(example_app, fix=True, said=said)

    assert all(f.status == "pass" for findings in repaired.values() for f in findings), repaired
    assert any(line.startswith("fixing cluster.build-namespace: kubectl create namespace") for line in said)
    created = sandbox.kube.get("namespaces", None, namespace)
    assert created["metadata"]["labels"][ENFORCE] == "privileged"
    account = sandbox.kube.get("serviceaccounts", namespace, "buildkit")
    assert account["automountServiceAccountToken"] is False
    versions = (created["metadata"]["resourceVersion"], account["metadata"]["resourceVersion"])

    said.clear()
    cluster_findings(example_app, fix=True, said=said)
    assert not [line for line in said if line.startswith("fixing cluster.")], "nothing left to repair"
    assert versions == (sandbox.kube.get("namespaces", None, namespace)["metadata"]["resourceVersion"],
                        sandbox.kube.get("serviceaccounts", namespace, "buildkit")["metadata"]["resourceVersion"])


def test_a_stricter_pod_security_level_fails_with_the_label_command(sandbox, example_app):
    namespace = example_app.config.build.namespace
    sandbox.kube.patch("namespaces", None, namespace, {"metadata": {"labels": {ENFORCE: "baseline"}}})

    finding = only(cluster_findings(example_app), "cluster.pod-security")

    assert finding.status == "fail"
    assert "enforces Pod Security baseline" in finding.found and "privileged BuildKit" in finding.found
    assert finding.fix == f"kubectl label namespace {namespace} {ENFORCE}=privileged --overwrite"
    assert finding.repair is None, "an operator's level is never overwritten"


def test_kaniko_needs_baseline_and_restricted_refuses_it(sandbox, example_app):
    namespace = example_app.config.build.namespace
    edit_pipeline(example_app, lambda d: d["build"].update(builder="kaniko"))
    sandbox.kube.patch("namespaces", None, namespace, {"metadata": {"labels": {ENFORCE: "baseline"}}})
    assert only(cluster_findings(example_app), "cluster.pod-security").status == "pass"

    sandbox.kube.patch("namespaces", None, namespace, {"metadata": {"labels": {ENFORCE: "restricted"}}})
    finding = only(cluster_findings(example_app), "cluster.pod-security")

    assert finding.status == "fail" and "they need baseline (Kaniko" in finding.found
    assert finding.fix == f"kubectl label namespace {namespace} {ENFORCE}=baseline --overwrite"


def test_a_missing_label_is_the_cluster_default_and_fix_labels_it(sandbox, example_app):
    namespace = example_app.config.build.namespace
    sandbox.kube.patch("namespaces", None, namespace, {"metadata": {"labels": {ENFORCE: None}}})

    finding = only(cluster_findings(example_app), "cluster.pod-security")

    assert finding.status == "warn"
    assert "the cluster's default level applies" in finding.found
    assert finding.fix == f"kubectl label namespace {namespace} {ENFORCE}=privileged"
    assert only(cluster_findings(example_app, fix=True), "cluster.pod-security").status == "pass"
    labelled = sandbox.kube.get("namespaces", None, namespace)
    assert labelled["metadata"]["labels"][ENFORCE] == "privileged"
    said: list[str] = []
    cluster_findings(example_app, fix=True, said=said)
    assert not [line for line in said if line.startswith("fixing cluster.")]
    assert sandbox.kube.get("namespaces", None, namespace)["metadata"]["resourceVersion"] == \
        labelled["metadata"]["resourceVersion"]


def test_a_missing_build_service_account_is_created_by_fix(sandbox, example_app):
    namespace = example_app.config.build.namespace
    sandbox.kube.delete("serviceaccounts", namespace, "buildkit")

    finding = only(cluster_findings(example_app), "cluster.service-account")

    assert finding.status == "fail" and "buildkit (build.service_account) does not exist" in finding.found
    assert "kind: ServiceAccount" in finding.fix and "automountServiceAccountToken: false" in finding.fix
    assert only(cluster_findings(example_app, fix=True), "cluster.service-account").status == "pass"
    assert sandbox.kube.get("serviceaccounts", namespace, "buildkit") is not None


def test_release_namespaces_without_the_release_rbac_each_list_what_is_missing(sandbox, example_app):
    build = example_app.config.build.namespace
    kubeconfig = flow_kubeconfig(sandbox, example_app, release_rbac=False)

    grouped = cluster_findings(example_app, kubeconfig=kubeconfig)

    by_namespace = {f.found.split(":")[0].removeprefix("in "): f for f in grouped["cluster.rbac"]}
    assert by_namespace[build].status == "pass"
    for namespace in release_namespaces(example_app):
        finding = by_namespace[namespace]
        assert finding.status == "fail"
        for missing in ("get secrets", "create secrets", "create deployments.apps", "patch services",
                        "create pods", "get pods/log", "get services/proxy", "watch replicasets.apps"):
            assert missing in finding.found, (missing, finding.found)
        assert finding.fix.startswith(
            f"sed -E 's/^( *namespace:) build$/\\1 {build}/' deployments/rbac-release.yaml"
            f" | kubectl apply -n {namespace} -f -\n")
    mcp = by_namespace[example_app.config.component("weather-mcp").release.namespace]
    assert "delete services/proxy weather-mcp:80" in mcp.found, "the MCP session's end"


def test_fix_applies_the_release_rbac(sandbox, example_app):
    """An identity that may manage RBAC (bind and escalate) but holds no release rights: `--fix` applies
    deployments/rbac-release.yaml in each release namespace, and a second `--fix` changes nothing."""
    build = example_app.config.build.namespace
    kubeconfig = flow_kubeconfig(sandbox, example_app, release_rbac=False)
    manager = f"rbac-manager-{build}"
    sandbox.kube.create("clusterroles", None, {"metadata": {"name": manager}, "rules": [
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings", "clusterroles",
                                                                   "clusterrolebindings"],
         "verbs": ["get", "create", "update", "bind", "escalate"]}]})
    sandbox.kube.create("clusterrolebindings", None, {
        "metadata": {"name": manager},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": manager},
        "subjects": [{"kind": "ServiceAccount", "name": FLOW_ACCOUNT, "namespace": build}]})
    try:
        assert {f.status for f in cluster_findings(example_app, kubeconfig=kubeconfig)["cluster.rbac"]} == \
            {"pass", "fail"}

        repaired = cluster_findings(example_app, kubeconfig=kubeconfig, fix=True)

        assert [f.status for f in repaired["cluster.rbac"]] == ["pass"] * 3, repaired["cluster.rbac"]
        for namespace in release_namespaces(example_app):
            binding = sandbox.kube.get("rolebindings", namespace, "buildkit-pipeline-release")
            assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FLOW_ACCOUNT, "namespace": build}]
        role = sandbox.kube.get("clusterroles", None, "buildkit-pipeline-release")
        said: list[str] = []
        cluster_findings(example_app, kubeconfig=kubeconfig, fix=True, said=said)
        assert not [line for line in said if line.startswith("fixing cluster.")]
        assert sandbox.kube.get("clusterroles", None, "buildkit-pipeline-release")["metadata"]["resourceVersion"] == \
            role["metadata"]["resourceVersion"]
    finally:
        sandbox.kube.delete("clusterrolebindings", None, manager)
        sandbox.kube.delete("clusterroles", None, manager)


def test_create_namespace_needs_the_create_namespace_rbac(sandbox, example_app):
    build = example_app.config.build.namespace
    mcp = example_app.config.component("weather-mcp").release.namespace
    new_namespace = f"{mcp}-helm-made"

    def helm_creates_it(document):
        [entry] = [c for c in document["components"] if c["name"] == "weather-mcp"]
        entry["release"].update(namespace=new_namespace, create_namespace=True)

    edit_pipeline(example_app, helm_creates_it)
    kubeconfig = flow_kubeconfig(sandbox, example_app, release_rbac=True)

    [finding] = [f for f in cluster_findings(example_app, kubeconfig=kubeconfig)["cluster.rbac"]
                 if f.found.startswith(f"in {new_namespace}:")]

    assert finding.status == "fail"
    assert f"create namespaces {new_namespace} (cluster-wide)" in finding.found
    assert "deployments/rbac-create-namespace.yaml | kubectl apply -f -" in finding.fix
    assert build in finding.fix


@pytest.mark.parametrize("review, field", [
    ({"spec": {}}, "spec.resourceAttributes"),
    ({"spec": {"resourceAttributes": {"verb": "get"}, "nonResourceAttributes": {"path": "/", "verb": "get"}}},
     "spec.nonResourceAttributes"),
])
def test_an_invalid_review_is_refused_like_the_api_server(sandbox, review, field):
    from tests.test_rbac import call

    status, answer = call(sandbox, "POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                          body={"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview", **review})

    assert status == 422 and answer["reason"] == "Invalid"
    assert answer["message"].startswith(f'SelfSubjectAccessReview.authorization.k8s.io "" is invalid: {field}: ')
