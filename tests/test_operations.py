"""Operating the pipeline: served deployments run from scripts, prefect.yaml, parallel builds in order."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL
from prefect_aws import S3Bucket

from blocks.target import BuildKitPipelineTarget
from flows.config import load_config
from flows.pipeline import connection
from sandbox.example import add_agent, commit_all
from tests.conftest import REPO_ROOT

MCP_REPOSITORY = "123456789012.dkr.ecr.us-west-2.amazonaws.com/agents-on-eks/weather-mcp"


def prefect_env() -> dict:
    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}


def prefect(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "prefect"), *args], cwd=REPO_ROOT, env=prefect_env(),
                          capture_output=True, text=True, timeout=timeout)


def wait_for_deployment(name: str, timeout: float = 90, config: str | None = None) -> None:
    """Until the deployment exists, and with `config` until it has that pipeline file: an earlier test's serve
    process registered the same deployments with its own, and a run created before the update would get it."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            try:
                if config is None or client.read_deployment_by_name(name).parameters.get("config") == config:
                    return
            except ObjectNotFound:
                pass
            time.sleep(0.5)
    raise AssertionError(f"deployment {name} was not registered" + (f" with {config}" if config else ""))


@pytest.fixture
def served(prefect_server, sandbox, example_app):
    """`python -m deployments.serve` for the example app, with a target block pointing at the sandbox."""
    target = f"sandbox-{example_app.config.build.namespace}"
    BuildKitPipelineTarget(aws_credentials=example_app.flow_kwargs["aws_credentials"],
                           kubeconfig_path=example_app.flow_kwargs["kubeconfig"]).save(target, overwrite=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "deployments.serve", "--config", str(example_app.pipeline_file), "--target", target],
        cwd=REPO_ROOT, env=prefect_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for name in ("build-and-deploy/on-demand", "build-and-deploy/nightly", "compare-builders/compare"):
            wait_for_deployment(name, config=str(example_app.pipeline_file.resolve()))
        yield example_app
    finally:
        process.terminate()
        process.wait(30)


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


def test_a_script_run_of_the_served_deployment_exits_0_then_1_for_a_failing_component(served, sandbox):
    run_script = [str(REPO_ROOT / "deployments" / "run.sh"), "on-demand", "--watch-timeout", "240"]
    completed = subprocess.run(run_script, cwd=REPO_ROOT, env=prefect_env(), capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    release = served.config.component("weather-mcp").release
    assert sandbox.kube.get("deployments", release.namespace, release.name) is not None

    sandbox.buildkit.failures[MCP_REPOSITORY] = "failed to read dockerfile: open Dockerfile: no such file or directory"
    try:
        failed = subprocess.run([*run_script, "--param", "skip_unchanged=false"], cwd=REPO_ROOT, env=prefect_env(),
                                capture_output=True, text=True, timeout=300)
    finally:
        sandbox.buildkit.failures.pop(MCP_REPOSITORY)
    assert failed.returncode == 1, failed.stdout + failed.stderr


def test_prefect_deploy_all_creates_the_nightly_schedule_on_demand_and_compare(prefect_server):
    created = prefect("work-pool", "create", "buildkit-pipeline", "--type", "process", "--overwrite")
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = prefect("--no-prompt", "deploy", "--all")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("build-and-deploy/nightly")
        on_demand = client.read_deployment_by_name("build-and-deploy/on-demand")
        compare = client.read_deployment_by_name("compare-builders/compare")
    assert compare.entrypoint == "flows/compare.py:compare_builders" and compare.schedules == []
    [schedule] = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 2 * * *", "Europe/Berlin", True)
    assert nightly.parameters["skip_unchanged"] is False and on_demand.parameters["skip_unchanged"] is True
    assert nightly.work_pool_name == on_demand.work_pool_name == "buildkit-pipeline"
    for deployment in (nightly, on_demand, compare):
        properties = deployment.parameter_openapi_schema["properties"]
        assert not {"aws_credentials", "kubeconfig"} & set(properties)
        assert [name for name, spec in properties.items() if not spec.get("description")] == []
    assert on_demand.schedules == []


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
