"""Operating the pipeline: served deployments run from scripts, blocks, the Kubernetes work pool's job variables,
parallel builds in order."""

from __future__ import annotations

import asyncio
import os

import kubernetes_validate
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
from prefect_aws import S3Bucket

from blocks.target import BuildKitPipelineTarget
from flows.config import load_config
from flows.pipeline import connection
from sandbox.example import add_agent, commit_all
from tests.conftest import REPO_ROOT
from tests.operating import MCP_REPOSITORY, last_run, prefect, run_script, serving, wait_for_deployment


@pytest.fixture
def served(prefect_server, sandbox, example_app):
    """The example app's deployments, served (`serving`)."""
    with serving(example_app) as app:
        yield app


def test_three_components_build_in_parallel_and_agents_deploy_after_the_mcp_server(prefect_server, sandbox,
                                                                                  example_app):
    app = example_app
    add_agent(app.pipeline_file, "travel-agent")
    app.pipeline_file.write_text(app.pipeline_file.read_text().replace("mode: privileged}", "mode: privileged, cache: none}"))
    commit_all(app.root, "No registry cache")
    sandbox.prepare(load_config(app.pipeline_file))
    repositories = {name: f"123456789012.dkr.ecr.us-west-2.amazonaws.com/agents-on-eks/{name}"
                    for name in ("weather-mcp", "weather-agent", "travel-agent")}
    # Long enough that all three overlap even if each slot request meets SQLite's 2 s busy retry.
    seconds = {"weather-mcp": 8, "weather-agent": 9, "travel-agent": 9}
    for name, repository in repositories.items():
        sandbox.buildkit.build_seconds[repository] = seconds[name]
    try:
        result = app.run().result()
    finally:
        for repository in repositories.values():
            sandbox.buildkit.build_seconds.pop(repository, None)

    by_name = {c.name: c for c in result.components}
    builds = {b["names"][0].split("/", 1)[1].split(":")[0].split("/")[1]: b for b in sandbox.buildkit.builds
              if any(b["pod"].startswith(c.image.job) for c in result.components)}
    assert set(builds) == set(repositories)
    latest_start = max(b["started"] for b in builds.values())
    earliest_end = min(b["ended"] for b in builds.values())
    assert latest_start < earliest_end, f"the three builds did not overlap: {[c.spans for c in result.components]}"
    mcp_deployed = by_name["weather-mcp"].spans["deploy"][1]
    for agent in ("weather-agent", "travel-agent"):
        assert by_name[agent].spans["deploy"][0] >= mcp_deployed
        assert by_name[agent].outcome == "deployed"


def test_script_runs_of_the_served_deployments_exit_0_then_1_for_a_failing_component_and_doctor_checks(served,
                                                                                                     sandbox):
    """`deployments/run.sh` against `python -m deployments.serve`; the served `doctor` deployment checks the same
    target (the sandbox's account and cluster) and records its findings as the run's `doctor` artifact."""
    mcp_only = ("--param", 'components=["weather-mcp"]', "--watch-timeout", "240")
    completed = run_script("on-demand", *mcp_only)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    release = served.config.component("weather-mcp").release
    assert sandbox.kube.get("deployments", release.namespace, release.name) is not None

    wait_for_deployment("doctor/doctor", config=str(served.pipeline_file.resolve()))
    checked = run_script("doctor/doctor", "--watch-timeout", "240")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    doctor = last_run("doctor/doctor")
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["doctor"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[doctor.id])))
    rows = [line for line in artifact.data.splitlines() if line.startswith(("| ✓ ", "| ! ", "| ✗ "))]
    assert {"aws.bucket", "ecr.repositories", "cluster.rbac", "nodes.platforms", "pipeline.charts"} <= {
        row.split("`")[1] for row in rows}
    assert not [row for row in rows if row.startswith("| ✗ ")]

    sandbox.buildkit.failures[MCP_REPOSITORY] = "failed to read dockerfile: open Dockerfile: no such file or directory"
    try:
        failed = run_script("on-demand", *mcp_only, "--param", "skip_unchanged=false")
    finally:
        sandbox.buildkit.failures.pop(MCP_REPOSITORY)
    assert failed.returncode == 1, failed.stdout + failed.stderr


def test_blocks_register_and_the_setup_script_builds_a_working_target(prefect_server, sandbox, monkeypatch):
    registered = prefect("block", "register", "-m", "blocks")
    assert registered.returncode == 0, registered.stdout + registered.stderr
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "sandbox-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sandbox-secret-key")
    monkeypatch.setenv("AWS_ENDPOINT_URL", sandbox.aws.url)
    monkeypatch.setenv("KUBECONFIG", str(sandbox.kubeconfig))
    monkeypatch.setenv("BUILDKIT_PIPELINE_BUCKET", "setup-test-contexts")
    sandbox.aws.client("s3", "us-west-2").create_bucket(
        Bucket="setup-test-contexts", CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    from deployments.setup_blocks import main as setup_blocks

    setup_blocks(["--name", "setup-test"])

    target = BuildKitPipelineTarget.load("setup-test")
    assert target.aws_credentials.get_client("sts").get_caller_identity()["Account"] == "123456789012"
    contexts = S3Bucket.load("setup-test-contexts")
    assert contexts.bucket_name == target.context_bucket.bucket_name == "setup-test-contexts"
    contexts.write_path("probe.txt", b"written through the block")
    assert contexts.read_path("probe.txt") == b"written through the block"
    config = load_config(REPO_ROOT / "examples" / "weather-app" / "buildkit-pipeline.yaml")

    async def bucket_a_run_uses() -> str:
        async with connection("setup-test", None, None, config) as connected:
            return connected.bucket

    assert config.aws.bucket != "setup-test-contexts"
    assert asyncio.run(bucket_a_run_uses()) == "setup-test-contexts"

    async def cluster_namespaces() -> list[str]:
        from kubernetes_asyncio import client

        from flows.kube import kube_api

        async with target.kubeconfig() as path:
            assert oct(os.stat(path).st_mode & 0o777) == "0o600"
            async with kube_api(path) as api:
                return [ns.metadata.name for ns in (await client.CoreV1Api(api).list_namespace()).items]

    assert "default" in asyncio.run(cluster_namespaces())


# ---------------------------------------------------------------- deployed from one checkout, run from another


# ---------------------------------------------------------------- a Kubernetes work pool


def test_the_kubernetes_job_variables_render_a_flow_pod_in_its_own_namespace_bound_into_the_build_namespace():
    """prefect.yaml's `kubernetes_job` against prefect-kubernetes 0.8.0's own default base job template, and
    deployments/flow-namespace.yaml against rbac.yaml's Role."""
    from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

    job_variables = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["definitions"]["kubernetes_job"]
    template = KubernetesWorker.get_default_base_job_template()
    assert set(job_variables) <= set(template["variables"]["properties"]), "every key is a variable of the template"
    configuration = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, job_variables))
    manifest = configuration.job_manifest
    pod = manifest["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert (configuration.namespace, manifest["metadata"]["namespace"]) == ("buildkit-pipeline", "buildkit-pipeline")
    assert pod["serviceAccountName"] == "buildkit-pipeline"
    assert container["image"].endswith("/buildkit-pipeline-flow:0.1.0") and ":latest" not in container["image"]
    assert configuration.env["BUILDKIT_PIPELINE_HOME"] == "/opt/buildkit-pipeline"
    assert manifest["spec"]["backoffLimit"] == 0

    documents = {(d["kind"], d["metadata"]["name"]): d
                 for d in yaml.safe_load_all((REPO_ROOT / "deployments" / "flow-namespace.yaml").read_text())}
    for document in documents.values():
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)
    namespace = documents[("Namespace", "buildkit-pipeline")]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] != "privileged"
    assert documents[("ServiceAccount", "buildkit-pipeline")]["metadata"]["namespace"] == "buildkit-pipeline"
    [binding] = [d for d in documents.values() if d["kind"] == "RoleBinding"]
    [role] = [d for d in yaml.safe_load_all((REPO_ROOT / "deployments" / "rbac.yaml").read_text()) if d["kind"] == "Role"]
    assert binding["metadata"]["namespace"] == role["metadata"]["namespace"] == "build"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                    "namespace": configuration.namespace}]
    assert [d for d in documents.values() if d["metadata"].get("namespace") == "build"] == [binding], \
        "nothing of the flow's but its RoleBinding lives next to the build pods"


# ---------------------------------------------------------------- automations


