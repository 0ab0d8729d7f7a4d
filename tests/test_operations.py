"""Operating the pipeline: served deployments run from scripts, prefect.yaml, parallel builds in order."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL
from prefect_aws import S3Bucket

from blocks.target import BuildKitPipelineTarget
from flows.config import load_config
from flows.pipeline import connection
from sandbox.example import add_agent, commit_all
from tests.conftest import REPO_ROOT, ExampleApp

MCP_REPOSITORY = "123456789012.dkr.ecr.us-west-2.amazonaws.com/agents-on-eks/weather-mcp"
DEPLOYMENTS = ("build-and-deploy/nightly", "build-and-deploy/on-demand", "compare-builders/compare")


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


@contextmanager
def serving(app):
    """`python -m deployments.serve` for the app, with a target block pointing at the sandbox."""
    target = f"sandbox-{app.config.build.namespace}"
    BuildKitPipelineTarget(aws_credentials=app.flow_kwargs["aws_credentials"],
                           kubeconfig_path=app.flow_kwargs["kubeconfig"]).save(target, overwrite=True)
    # a run is picked up within PREFECT_RUNNER_POLL_FREQUENCY (prefect/settings/models/runner.py, 3.9.1: default
    # 10 s); cancelling does not wait for it (FlowRunCancellingObserver listens to events, polls only as fallback)
    process = subprocess.Popen(
        [sys.executable, "-m", "deployments.serve", "--config", str(app.pipeline_file), "--target", target],
        cwd=REPO_ROOT, env={**prefect_env(), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for name in ("build-and-deploy/on-demand", "build-and-deploy/nightly", "compare-builders/compare"):
            wait_for_deployment(name, config=str(app.pipeline_file.resolve()))
        yield app
    finally:
        process.terminate()
        process.wait(30)


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


@dataclass
class Deployed:
    app: ExampleApp
    target: str
    deployments: dict
    """The deployments as `prefect deploy --all` left them, by name."""


@pytest.fixture(scope="module")
def deployed(prefect_server, example_app_in, tmp_path_factory) -> Deployed:
    """The module's one `prefect deploy --all`, as an operator runs it: in a checkout (the "laptop") that is gone
    when the runs start, with BUILDKIT_PIPELINE_CONFIG naming the pipeline file where the workers read it."""
    app = example_app_in(tmp_path_factory.mktemp("deployed"))
    target = sandbox_target(app)
    created = prefect("work-pool", "create", "buildkit-pipeline", "--type", "process", "--overwrite")
    assert created.returncode == 0, created.stdout + created.stderr
    deployer = project_checkout(tmp_path_factory.mktemp("laptop") / "buildkit-pipeline")
    deployed = subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "prefect"), "--no-prompt", "deploy", "--all"],
                              cwd=deployer, env={**prefect_env(), "BUILDKIT_PIPELINE_CONFIG": str(app.pipeline_file)},
                              capture_output=True, text=True, timeout=240)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    shutil.rmtree(deployer)
    with get_client(sync_client=True) as client:
        deployments = {name: client.read_deployment_by_name(name) for name in DEPLOYMENTS}
    return Deployed(app, target, deployments)


@pytest.mark.timeout(900)
def test_prefect_deploy_all_creates_the_nightly_schedule_on_demand_and_compare(deployed):
    """Also: `run.sh` stops watching a run no worker picks up (the module's worker starts after this test)."""
    unset = prefect("--no-prompt", "deploy", "--all")
    assert unset.returncode != 0 and "set BUILDKIT_PIPELINE_CONFIG before `prefect deploy`" in unset.stdout + unset.stderr
    nightly, on_demand, compare = (deployed.deployments[name] for name in DEPLOYMENTS)
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
    assert (nightly.work_queue_name, on_demand.work_queue_name, compare.work_queue_name) == (
        "nightly", "on-demand", "on-demand")
    assert nightly.global_concurrency_limit.limit == 1 and on_demand.global_concurrency_limit is None
    assert nightly.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert nightly.parameters["config"] == on_demand.parameters["config"] == str(deployed.app.pipeline_file)

    waited = run_script("on-demand", "--param", f"target={deployed.target}",
                        env={"BUILDKIT_PIPELINE_WATCH_TIMEOUT": "3"}, timeout=120)
    delete_runs_not_started("build-and-deploy/on-demand")
    assert waited.returncode == 3, waited.stdout + waited.stderr
    assert "exceeded watch timeout of 3 seconds" in waited.stdout


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


def project_checkout(destination: Path) -> Path:
    """A checkout of this repository as the working tree has it now (new and changed files included)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def sandbox_target(app) -> str:
    name = f"sandbox-{app.config.build.namespace}"
    BuildKitPipelineTarget(aws_credentials=app.flow_kwargs["aws_credentials"],
                           kubeconfig_path=app.flow_kwargs["kubeconfig"]).save(name, overwrite=True)
    return name


def run_script(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO_ROOT / "deployments" / "run.sh"), *args], cwd=REPO_ROOT,
                          env={**prefect_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout)


def last_run(deployment_name: str):
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployment_name)
        [run] = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                                      sort=FlowRunSort.START_TIME_DESC, limit=1)
    return run


def delete_runs_not_started(deployment_name: str) -> None:
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployment_name)
        for run in client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))):
            if run.state and run.state.is_scheduled():
                client.delete_flow_run(run.id)


@pytest.fixture(scope="module")
def worker_checkout(deployed, tmp_path_factory):
    """The module's process worker, in a second checkout at another path, with BUILDKIT_PIPELINE_HOME pointing at
    it."""
    box = tmp_path_factory.mktemp("worker-box")
    home = project_checkout(box / "buildkit-pipeline")
    env = {**prefect_env(), "BUILDKIT_PIPELINE_HOME": str(home), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PATH": f"{REPO_ROOT / '.tools' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    log = (box / "worker.log").open("w")
    worker = subprocess.Popen([str(REPO_ROOT / ".venv" / "bin" / "prefect"), "worker", "start", "--pool",
                               "buildkit-pipeline", "--type", "process"], cwd=home, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        yield home
    finally:
        # prefect/utilities/processutils/__init__.py `setup_signal_handlers_worker` (3.9.1): the first SIGTERM asks
        # the worker to shut down gracefully (as SIGINT), the second sends it SIGKILL. The graceful shutdown was
        # seen to hang for minutes with no flow run left (every worker in three runs of this module).
        worker.terminate()
        try:
            worker.wait(5)
        except subprocess.TimeoutExpired:
            worker.terminate()
            worker.wait(30)
        log.close()


@pytest.mark.timeout(900)
def test_deployed_from_one_checkout_a_worker_in_another_runs_it_and_refuses_a_dirty_tree(sandbox, deployed,
                                                                                          worker_checkout):
    """`prefect deploy --all` in a checkout that is gone when the run starts (`deployed`); the worker's own
    checkout (BUILDKIT_PIPELINE_HOME) has the code, and the pipeline file is where the deployer said it is on the
    worker."""
    app, target = deployed.app, deployed.target
    on_demand = deployed.deployments["build-and-deploy/on-demand"]
    assert on_demand.parameters["config"] == str(app.pipeline_file)
    assert on_demand.pull_steps == [{"prefect.deployments.steps.set_working_directory": {
        "directory": "{{ $BUILDKIT_PIPELINE_HOME }}"}}]

    untracked = app.root / "scratch.txt"
    untracked.write_text("not committed\n")
    refused = run_script("on-demand", "--param", f"target={target}", "--watch-timeout", "600", timeout=660)
    untracked.unlink()
    assert refused.returncode == 1, refused.stdout + refused.stderr
    dirty = last_run("build-and-deploy/on-demand")
    assert dirty.state.is_failed() and "has uncommitted changes (scratch.txt)" in dirty.state.message
    assert not sandbox.kube.list("jobs", app.config.build.namespace,
                                 label_selector={"buildkit-pipeline/flow-run": str(dirty.id)})

    completed = run_script("on-demand", "--param", f"target={target}", "--param", 'components=["weather-mcp"]',
                           "--param", "skip_unchanged=false", "--watch-timeout", "600", timeout=660)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    run = last_run("build-and-deploy/on-demand")
    assert sandbox.kube.list("jobs", app.config.build.namespace,
                             label_selector={"buildkit-pipeline/flow-run": str(run.id)})
    release = app.config.component("weather-mcp").release
    assert sandbox.kube.get("deployments", release.namespace, release.name) is not None


@pytest.mark.timeout(900)
def test_a_deployment_run_s_time_limit_comes_from_its_environment(sandbox, deployed, worker_checkout):
    """BUILDKIT_PIPELINE_FLOW_TIMEOUT_SECONDS as a job variable (here per run; per deployment in prefect.yaml's
    job_variables) sets the flow's timeout_seconds in the run's own process."""
    sandbox.buildkit.build_seconds[MCP_REPOSITORY] = 60
    try:
        timed_out = run_script("on-demand", "--param", f"target={deployed.target}", "--param",
                               'components=["weather-mcp"]', "--param", "skip_unchanged=false",
                               "--job-variable", 'env={"BUILDKIT_PIPELINE_FLOW_TIMEOUT_SECONDS": "8"}',
                               "--watch-timeout", "600", timeout=660)
    finally:
        sandbox.buildkit.build_seconds.pop(MCP_REPOSITORY, None)
    assert timed_out.returncode == 1, timed_out.stdout + timed_out.stderr
    run = last_run("build-and-deploy/on-demand")
    assert (run.state.type.value, run.state.name) == ("FAILED", "TimedOut"), run.state
    assert run.end_time - run.start_time < timedelta(seconds=50)


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


@pytest.mark.timeout(900)
def test_the_automation_script_notifies_on_failed_and_crashed_runs_and_crashes_zombies(deployed):
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from deployments.automations import FAILED, ZOMBIES
    from deployments.automations import main as create_automations

    webhook = CustomWebhookNotificationBlock(name="ops", url="http://127.0.0.1:9/hook", json_data={"text": "{{body}}"})
    block_id = webhook.save("ops-alerts", overwrite=True)
    with get_client(sync_client=True) as client:
        ids = {str(client.read_deployment_by_name(name).id) for name in DEPLOYMENTS}

    with pytest.raises(SystemExit) as refused:
        create_automations(["--notify", "custom-webhook/no-such-block"])
    assert refused.value.code == 2
    create_automations(["--notify", "custom-webhook/ops-alerts", "--heartbeat-seconds", "60"])
    create_automations(["--notify", "custom-webhook/ops-alerts", "--heartbeat-seconds", "60"])

    with get_client(sync_client=True) as client:
        assert len(client.read_automations_by_name(FAILED)) == len(client.read_automations_by_name(ZOMBIES)) == 1
    failed, zombies = Automation.read(name=FAILED), Automation.read(name=ZOMBIES)
    related = {"prefect.resource.role": "deployment",
               "prefect.resource.id": {f"prefect.deployment.{i}" for i in ids}}

    def related_of(trigger) -> dict:
        [spec] = trigger.match_related if isinstance(trigger.match_related, list) else [trigger.match_related]
        values = spec.model_dump() if hasattr(spec, "model_dump") else dict(spec)
        return {k: set(v) if isinstance(v, list) else v for k, v in values.items()}

    assert failed.trigger.posture == "Reactive" and failed.trigger.threshold == 1
    assert failed.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert failed.trigger.match.model_dump() == {"prefect.resource.id": "prefect.flow-run.*"}
    assert related_of(failed.trigger) == related
    [notify] = failed.actions
    assert (notify.type, notify.block_document_id) == ("send-notification", block_id)
    assert zombies.trigger.posture == "Proactive" and zombies.trigger.after == {"prefect.flow-run.heartbeat"}
    assert zombies.trigger.expect == {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed",
                                      "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                                      "prefect.flow-run.Crashed"}
    assert zombies.trigger.for_each == {"prefect.resource.id"} and zombies.trigger.within == timedelta(seconds=180)
    assert related_of(zombies.trigger) == related
    [crash] = zombies.actions
    assert (crash.type, crash.state.value) == ("change-flow-run-state", "CRASHED")
