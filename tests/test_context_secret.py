"""The presigned context URL stays out of the Job: it lives in the build's registry Secret, the container gets it
as `CONTEXT_URL` from a `secretKeyRef` and the kubelet puts it into the args where they say `$(CONTEXT_URL)`.

A user bound to the `view` ClusterRole reads Jobs and Pods but not Secrets, and neither builder's failed
download (which prints the URL) leaves its signature in the run log or the steps artifact.
"""

from __future__ import annotations

import base64
import json

import pytest

from flows.build import build_job_manifest
from flows.builders import log_reader
from flows.kaniko import kaniko_job_manifest
from flows.secrecy import QUERY_WITHHELD
from sandbox.example import commit_all
from sandbox.faultproxy import DROP
from sandbox.kube import kubelet
from sandbox.shell import run_argv
from tests.conftest import jobs
from tests.test_build_job import request as buildkit_request
from tests.test_rbac import call
from tests.test_security import context_url, run_artifacts, run_logs, url_query

MCP = "weather-mcp"
SIGNED = "https://b.s3.amazonaws.com/build/k.tar.gz?X-Amz-Credential=A%2F1&X-Amz-Signature=abc$(HOME)$$x"

# third_party/forked/golang/expansion/expand_test.go (kubernetes/kubernetes), doExpansionTest
MAPPING = {"VAR_A": "A", "VAR_B": "B", "VAR_C": "C", "VAR_REF": "$(VAR_A)", "VAR_EMPTY": ""}
EXPANSIONS = [
    ("$(VAR_A)", "A"), ("$(VAR_A)-$(VAR_A)", "A-A"), ("$(VAR_A)-1", "A-1"), ("___$(VAR_B)___", "___B___"),
    ("___$(VAR_C)", "___C"), ("$(VAR_A)_$(VAR_B)_$(VAR_C)", "A_B_C"), ("$$(VAR_B)_$(VAR_A)", "$(VAR_B)_A"),
    ("$$(VAR_A)_$$(VAR_B)", "$(VAR_A)_$(VAR_B)"), ("f000-$$VAR_A", "f000-$VAR_A"),
    ("foo\\$(VAR_C)bar", "foo\\Cbar"), ("foo\\\\$(VAR_C)bar", "foo\\\\Cbar"),
    ("foo\\\\\\\\$(VAR_A)bar", "foo\\\\\\\\Abar"), ("$(VAR_A$(VAR_B))", "$(VAR_A$(VAR_B))"),
    ("$(VAR_A$(VAR_B)", "$(VAR_A$(VAR_B)"), ("$(VAR_REF)", "$(VAR_A)"),
    ("%%$(VAR_REF)--$(VAR_REF)%%", "%%$(VAR_A)--$(VAR_A)%%"), ("foo$(VAR_EMPTY)bar", "foobar"),
    ("foo$(VAR_Awhoops!", "foo$(VAR_Awhoops!"), ("f00__(VAR_A)__", "f00__(VAR_A)__"),
    ("$?_boo_$!", "$?_boo_$!"), ("$VAR_A", "$VAR_A"), ("$(VAR_DNE)", "$(VAR_DNE)"),
    ("$$$$$$(BIG_MONEY)", "$$$(BIG_MONEY)"), ("$$$$$$(VAR_A)", "$$$(VAR_A)"),
    ("$$$$$$$(GOOD_ODDS)", "$$$$(GOOD_ODDS)"), ("$$$$$$$(VAR_A)", "$$$A"), ("$VAR_A)", "$VAR_A)"),
    ("${VAR_A}", "${VAR_A}"), ("$(VAR_B)_______$(A", "B_______$(A"), ("$(VAR_C)_______$(", "C_______$("),
    ("$(VAR_A)foobarzab$", "Afoobarzab$"), ("foo-\\$(VAR_A", "foo-\\$(VAR_A"), ("--$($($($($--", "--$($($($($--"),
    ("$($($($($--foo$(", "$($($($($--foo$("), ("foo0--$($($($(", "foo0--$($($($("),
    ("$(foo$$var)", "$(foo$$var)"), ("\n", "\n"),
]


def secret(name: str, **data: str) -> dict:
    return {"metadata": {"name": name}, "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


# ---------------------------------------------------------------- the kubelet's expansion


@pytest.mark.parametrize(("text", "expanded"), EXPANSIONS)
def test_the_kubelet_expands_a_reference_as_expand_go_does(text, expanded):
    assert kubelet.expand(text, MAPPING.get) == expanded


def test_the_environment_is_built_in_order_and_a_secret_value_is_never_expanded():
    """makeEnvironmentVariables: a value sees only the variables declared before it; a secretKeyRef is the
    Secret's bytes as they are; then command and args are expanded once against the result."""
    secrets = {"s": secret("s", url="u?$(FIRST)&$$")}
    pod = {"metadata": {"namespace": "n"}}
    container = {"command": ["run", "$(URL)", "$$(URL)"], "args": ["$(SECOND)", "$(LATER)", "$(MISSING)"], "env": [
        {"name": "FIRST", "value": "1"},
        {"name": "SECOND", "value": "$(FIRST)-$(LATER)"},
        {"name": "URL", "valueFrom": {"secretKeyRef": {"name": "s", "key": "url"}}},
        {"name": "LATER", "value": "2"},
    ]}
    env = kubelet.container_env(pod, container, secrets.get)
    assert env == {"FIRST": "1", "SECOND": "1-$(LATER)", "URL": "u?$(FIRST)&$$", "LATER": "2"}
    assert kubelet.expand_command_and_args(container, env) == (
        ["run", "u?$(FIRST)&$$", "$(URL)"], ["1-$(LATER)", "2", "$(MISSING)"])
    with pytest.raises(kubelet.EnvError, match="couldn't find key url in Secret n/other"):
        kubelet.container_env(pod, {"env": [{"name": "U", "valueFrom": {"secretKeyRef": {
            "name": "other", "key": "url"}}}]}, {"other": secret("other", nope="x")}.get)


@pytest.mark.parametrize("manifest", [build_job_manifest, kaniko_job_manifest])
def test_the_builder_gets_the_url_exactly_as_the_secret_holds_it_and_the_job_does_not(manifest):
    """The kubelet expands before the shell runs the BuildKit script, and the shell does not expand the
    parameters `"$@"` hands on; the script itself has nothing the kubelet would change."""
    request = buildkit_request(builder="kaniko" if manifest is kaniko_job_manifest else "buildkit")
    job = manifest(request)
    assert "X-Amz-" not in json.dumps(job) and request.context_url not in json.dumps(job)
    [container] = job["spec"]["template"]["spec"]["containers"]
    secrets = {request.registry_secret: secret(request.registry_secret, **{"context-url": SIGNED})}
    env = kubelet.container_env({"metadata": {"namespace": "build"}}, container, secrets.get)
    command, args = kubelet.expand_command_and_args(container, env)
    assert command == container.get("command", [])
    received: list[list[str]] = []

    def builder(process) -> int:
        received.append(process.args)
        return 1  # no metadata file to copy: the script stops at `&&`

    if command:
        assert run_argv([*command, *args], None, env, {"buildctl-daemonless.sh": builder}, print) == 1
        [passed] = received
    else:
        passed = args
    assert f"context={SIGNED}" in passed or f"--context={SIGNED}" in passed


def test_a_reference_to_a_missing_variable_reaches_the_builder_as_written():
    container = build_job_manifest(buildkit_request())["spec"]["template"]["spec"]["containers"][0]
    _, args = kubelet.expand_command_and_args(container, {"DOCKER_CONFIG": "/x"})
    assert "context=$(CONTEXT_URL)" in args


# ---------------------------------------------------------------- the run


def view_token(sandbox, namespace: str) -> str:
    """A ServiceAccount bound to the built-in `view` ClusterRole in `namespace`, and a token for it."""
    sandbox.kube.create("serviceaccounts", namespace, {"metadata": {"name": "viewer"}})
    sandbox.kube.create("rolebindings", namespace, {
        "metadata": {"name": "viewer"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"kind": "ServiceAccount", "name": "viewer", "namespace": namespace}]})
    status, answer = call(sandbox, "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/viewer/token",
                          body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                "spec": {"expirationSeconds": 600}})
    assert status == 201, answer
    return answer["status"]["token"]


def test_a_viewer_reads_the_build_job_and_its_pod_but_not_the_context_url(prefect_server, sandbox, example_app):
    app = example_app
    namespace = app.config.build.namespace
    state = app.run(components=[MCP], deploy=False)
    assert state.is_completed(), state.message

    [job] = jobs(sandbox, app, MCP)
    url = context_url(sandbox, job)
    signature = url_query(url)["X-Amz-Signature"]
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert {"name": "CONTEXT_URL", "valueFrom": {"secretKeyRef": {
        "name": f"{job['metadata']['name']}-registry", "key": "context-url"}}} in container["env"]
    assert "context=$(CONTEXT_URL)" in container["args"]
    pods = sandbox.kube.list("pods", namespace, label_selector=f"job-name={job['metadata']['name']}")
    assert pods and "X-Amz-" not in json.dumps([job, pods])
    [record] = [b for b in sandbox.buildkit.builds if b["pod"] == pods[-1]["metadata"]["name"]]
    assert record["context_url"] == url, "the builder downloaded the URL the kubelet put in"

    token = view_token(sandbox, namespace)
    status, seen = call(sandbox, "GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/{job['metadata']['name']}",
                        token)
    assert status == 200 and signature not in json.dumps(seen)
    status, seen = call(sandbox, "GET", f"/api/v1/namespaces/{namespace}/pods", token)
    assert status == 200 and seen["items"] and signature not in json.dumps(seen)
    for path in (f"/api/v1/namespaces/{namespace}/secrets",
                 f"/api/v1/namespaces/{namespace}/secrets/{job['metadata']['name']}-registry"):
        status, refused = call(sandbox, "GET", path, token)
        assert status == 403, refused
        assert 'cannot get resource "secrets"' in refused["message"] or \
            'cannot list resource "secrets"' in refused["message"]


@pytest.mark.parametrize("builder", ["buildkit", "kaniko"])
def test_a_failed_download_leaves_no_signature_in_the_run_log_or_the_steps(prefect_server, sandbox, example_app,
                                                                              builder):
    """The connection to S3 drops: both builders print Go's `Get "<url>": ...`, the whole presigned URL."""
    app = example_app
    if builder == "kaniko":
        app.pipeline_file.write_text(app.pipeline_file.read_text().replace("mode: privileged", "builder: kaniko"))
        commit_all(app.root, "Kaniko")
    sandbox.aws.front.fail("GET", rf"^/{app.config.aws.bucket}/build/{MCP}/[0-9a-f]+\.tar\.gz$", DROP, times=None)
    try:
        state = app.run(components=[MCP], deploy=False)
    finally:
        sandbox.aws.front.clear_faults()

    assert state.is_failed()
    [job] = jobs(sandbox, app, MCP)
    signature = url_query(context_url(sandbox, job))["X-Amz-Signature"]
    flow_run_id = state.state_details.flow_run_id
    logs, artifacts = run_logs(flow_run_id), run_artifacts(flow_run_id)
    assert any(f'Get "{sandbox.aws.url}/' in line and QUERY_WITHHELD in line for line in logs), \
        "the builder printed no URL: nothing was withheld"
    assert not [line for line in logs if signature in line]
    assert not [artifact for artifact in artifacts if signature in artifact]
    if builder == "buildkit":
        [steps] = [a for a in artifacts if '"build-steps-weather-mcp"' in a]
        assert QUERY_WITHHELD in steps, "the step's error carries the withheld URL"


def test_the_log_reader_withholds_the_url_in_a_buildkit_steps_error():
    reader = log_reader("buildkit")
    vertex = {"digest": "sha256:1", "name": "[internal] load remote build context",
              "started": "2026-01-01T00:00:00Z", "completed": "2026-01-01T00:00:01Z",
              "error": f'Get "{SIGNED}": EOF'}
    out = reader.feed(json.dumps({"vertexes": [vertex]}))
    assert "X-Amz-Signature" not in json.dumps(out) and QUERY_WITHHELD in out[-1]
    [step] = reader.steps()
    assert step.error == f'Get "https://b.s3.amazonaws.com/build/k.tar.gz{QUERY_WITHHELD}": EOF'
