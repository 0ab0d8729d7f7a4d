"""The whole flow on the real Prefect test server against the sandbox, checked by what crossed the wire."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)

from flows.cli import main
from flows.upload import context_key
from sandbox.example import commit_all
from tests.conftest import HELM, by_name, jobs
from tests.test_security import context_url

ALL_STAGES = ("package", "queue", "upload", "registry-auth", "build", "deploy", "verify")

MCP, AGENT = "weather-mcp", "weather-agent"


def timing_artifact(flow_run_id) -> list[dict]:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["build-and-deploy-timing"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        )
    [artifact] = artifacts
    return json.loads(artifact.data)


def namespace_of(app, component: str) -> str:
    return app.config.component(component).release.namespace


def helm_history(sandbox, release: str, namespace: str) -> list[dict]:
    out = subprocess.run(
        [str(HELM), "history", release, "-n", namespace, "-o", "json", "--kubeconfig", str(sandbox.kubeconfig)],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)


def deployed_image(sandbox, namespace: str, name: str) -> str:
    deployment = sandbox.kube.get("deployments", namespace, name)
    return deployment["spec"]["template"]["spec"]["containers"][0]["image"]


def test_first_run_builds_pushes_and_deploys_the_exact_image(prefect_server, sandbox, example_app):
    app = example_app
    config = app.config
    state = app.run()
    result = state.result()

    s3 = sandbox.aws.client("s3", config.aws.region)
    mcp = next(c for c in result.components if c.name == MCP)
    key = context_key(config.aws.prefix, MCP, mcp.archive_sha256)
    body = s3.get_object(Bucket=config.aws.bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == mcp.archive_sha256

    [job] = jobs(sandbox, app, MCP)
    assert job["metadata"]["labels"]["buildkit-pipeline/commit"] == result.commit
    pod_spec = job["spec"]["template"]["spec"]
    assert "initContainers" not in pod_spec
    [container] = pod_spec["containers"]
    assert container["securityContext"]["privileged"] is True
    assert container["command"][:2] == ["/bin/sh", "-c"] and container["args"][0] == "build"
    assert container["args"][container["args"].index("--opt") + 1] == "context=$(CONTEXT_URL)"
    assert context_url(sandbox, job).startswith(f"{sandbox.aws.url}/{config.aws.bucket}/{key}?")
    docker_config = next(e["value"] for e in container["env"] if e["name"] == "DOCKER_CONFIG")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == docker_config)
    volume = next(v for v in pod_spec["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["items"] == [{"key": ".dockerconfigjson", "path": "config.json"}]
    conditions = {c["type"]: c["status"] for c in job["status"]["conditions"]}
    assert conditions["Complete"] == "True"
    assert sandbox.kube.get("secrets", config.build.namespace, volume["secret"]["secretName"]) is None, "registry Secret outlived its build"

    [built] = [b for b in sandbox.buildkit.builds if b["pod"].startswith(job["metadata"]["name"])]
    assert built["metadata"]["containerimage.digest"] == mcp.image.digest
    ecr = sandbox.aws.client("ecr", config.aws.region)
    pushed = ecr.describe_images(repositoryName="agents-on-eks/weather-mcp",
                                 imageIds=[{"imageTag": result.commit[:12]}])["imageDetails"][0]
    assert pushed["imageDigest"] == mcp.image.digest

    repository = f"{config.registry}/agents-on-eks/weather-mcp"
    history = helm_history(sandbox, MCP, namespace_of(app, MCP))
    assert [(h["revision"], h["status"]) for h in history] == [(1, "deployed")]
    assert deployed_image(sandbox, namespace_of(app, MCP), MCP) == f"{repository}:{result.commit[:12]}@{mcp.image.digest}"
    assert mcp.release.revision == 1

    for component in result.components:
        assert component.outcome == "deployed"
        assert set(component.seconds) == set(ALL_STAGES)
        assert all(seconds > 0 for seconds in component.seconds.values())
    rows = {(row["component"], row["stage"]): row for row in timing_artifact(state.state_details.flow_run_id)}
    assert set(rows) == {(c, s) for c in (MCP, AGENT) for s in ALL_STAGES}
    assert rows[(MCP, "build")]["digest"] == mcp.image.digest
    assert rows[(MCP, "build")]["seconds"] == mcp.seconds["build"]
    assert rows[(MCP, "deploy")]["revision"] == 1


def test_agent_deploys_after_its_mcp_server(prefect_server, sandbox, example_app):
    app = example_app
    app.run().result()
    mcp_ns, agent_ns = namespace_of(app, MCP), namespace_of(app, AGENT)
    deployment_writes = {}
    for record in sandbox.kube.requests:
        if record.resource == "deployments" and record.verb in ("create", "patch", "update"):
            deployment_writes.setdefault(record.namespace, record.time)
    ready = sandbox.kube.get("deployments", mcp_ns, MCP)
    assert ready["status"]["readyReplicas"] == 1
    assert deployment_writes[mcp_ns] < deployment_writes[agent_ns]


def test_a_commit_that_changes_one_file_gives_revision_2_and_a_new_digest(prefect_server, sandbox, example_app):
    app = example_app
    first = app.run().result()
    server = app.root / "agents/weather/mcp-servers/weather-mcp-server/server.py"
    text = server.read_text()
    assert '("sunny", 35, 22)' in text
    server.write_text(text.replace('("sunny", 35, 22)', '("heat wave", 41, 28)'))
    commit = commit_all(app.root, "Phoenix is hot")

    second = app.run().result()

    assert second.commit == commit != first.commit
    before, after = by_name(first)[MCP], by_name(second)[MCP]
    assert after.archive_sha256 != before.archive_sha256
    assert after.image.digest != before.image.digest
    assert by_name(second)[AGENT].archive_sha256 == by_name(first)[AGENT].archive_sha256
    assert (before.context_uploaded, after.context_uploaded) == (True, True)
    assert _object_count(sandbox, app.config) == 3, "the unchanged agent context is stored once"
    history = helm_history(sandbox, MCP, namespace_of(app, MCP))
    assert [(h["revision"], h["status"]) for h in history] == [(1, "superseded"), (2, "deployed")]
    assert after.release.revision == 2
    assert deployed_image(sandbox, namespace_of(app, MCP), MCP).endswith(f"{commit[:12]}@{after.image.digest}")


def test_an_unchanged_rerun_gives_the_same_archive_and_uploads_nothing(prefect_server, sandbox, example_app):
    app = example_app
    first = app.run().result()
    again = app.run().result()
    for name in (MCP, AGENT):
        assert by_name(again)[name].archive_sha256 == by_name(first)[name].archive_sha256
        assert by_name(first)[name].context_uploaded is True
        assert by_name(again)[name].context_uploaded is False
    s3 = sandbox.aws.client("s3", app.config.aws.region)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=app.config.aws.bucket)["Contents"])
    assert keys == sorted(context_key(app.config.aws.prefix, n, by_name(first)[n].archive_sha256) for n in (MCP, AGENT))


def _object_count(sandbox, config) -> int:
    s3 = sandbox.aws.client("s3", config.aws.region)
    return s3.list_objects_v2(Bucket=config.aws.bucket).get("KeyCount", 0)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda text: text.replace("chart: manifests/helm/mcp,", ""), "components[0].release.chart: Field required"),
        (lambda text: text.replace("chart: manifests/helm/mcp", "chart: manifests/helm/nope"),
         "components[0].release.chart: no such directory"),
        (lambda text: text.replace("image: moby/buildkit:v0.31.2", "image: moby/buildkit:latest"), "build.image:"),
        (lambda text: text.replace("after: [weather-mcp]", "after: [weather-mpc]"),
         "components[1].release.after: no release named 'weather-mpc'"),
        (lambda text: text.replace("dockerfile: Dockerfile", "dockerfil: Dockerfile"), "components[0].dockerfil: unknown key"),
    ],
)
def test_a_malformed_pipeline_file_exits_2_naming_the_key_and_creates_nothing(
    prefect_server, sandbox, example_app, capsys, edit, expected
):
    pipeline_file, config = example_app.pipeline_file, example_app.config
    pipeline_file.write_text(edit(pipeline_file.read_text()))
    commit_all(example_app.root, "Break the pipeline file")
    objects, jobs, secrets = _object_count(sandbox, config), len(sandbox.kube.list("jobs")), len(sandbox.kube.list("secrets"))

    code = main(["run", "--config", str(pipeline_file), "--kubeconfig", str(sandbox.kubeconfig)])

    assert code == 2
    assert expected in capsys.readouterr().err
    assert _object_count(sandbox, config) == objects
    assert len(sandbox.kube.list("jobs")) == jobs
    assert len(sandbox.kube.list("secrets")) == secrets
