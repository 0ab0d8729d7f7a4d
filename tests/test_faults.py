"""Faults injected into the stand-ins while the real flow runs: S3 errors, Kubernetes API errors, a killed build pod.

Each test makes one remote fail the way it fails in production (S3 through a
fault proxy in front of moto, the Kubernetes API through the emulator's
injected faults, the build pod through the simulated BuildKit) and checks what
the stand-ins hold afterwards: objects in the bucket, Jobs and Secrets in the
build namespace, and the requests each of them answered. Every run builds the
MCP server alone and deploys nothing: each fault sits on the way to its build.

The rest of the fault suite lives next to the stage it exercises:

- tests/test_build_sandbox.py::test_a_dropped_watch_and_410_gone_resume_without_a_second_job
- tests/test_build_sandbox.py::test_a_cancelled_run_leaves_no_job_and_no_secret
- tests/test_deploy.py::test_a_release_that_never_becomes_ready_is_rolled_back_to_the_previous_image
- tests/test_deploy.py::test_two_runs_on_one_release_serialize_their_helm_operations
"""

from __future__ import annotations

import hashlib

import pytest
from prefect_aws import AwsClientParameters

from flows import tasks
from flows.results import PipelineFailed
from flows.upload import context_key
from sandbox.faultproxy import FaultProxy
from tests.conftest import by_name, jobs, wait_until
from tests.test_task_names import task_runs

MCP = "weather-mcp"
MCP_REPOSITORY = "123456789012.dkr.ecr.us-west-2.amazonaws.com/agents-on-eks/weather-mcp"


@pytest.fixture(autouse=True)
def quick_build(sandbox, monkeypatch):
    """A build that takes a moment, so a fault can land while it runs, and keeps the suite fast."""
    monkeypatch.setitem(sandbox.buildkit.build_seconds, MCP_REPOSITORY, 0.5)


@pytest.fixture(autouse=True)
def no_leftover_kube_faults(sandbox):
    yield
    sandbox.kube.clear_faults()


@pytest.fixture(scope="module")
def fault_proxy(sandbox):
    with FaultProxy(sandbox.aws.url) as proxy:
        yield proxy


@pytest.fixture
def s3_through_proxy(example_app, fault_proxy):
    """The flow's AWS clients (and so the presigned context URL) go through the fault proxy."""
    credentials = example_app.flow_kwargs["aws_credentials"]

    def route(**client_config) -> FaultProxy:
        example_app.flow_kwargs["aws_credentials"] = credentials.model_copy(update={
            "aws_client_parameters": AwsClientParameters(endpoint_url=fault_proxy.url, config=client_config or None)})
        return fault_proxy

    yield route
    fault_proxy.clear_faults()


@pytest.fixture
def no_retry_waits(monkeypatch):
    """The upload stage exactly as it is, retries included, minus its waits (1, 5 and 15 s) between attempts."""
    monkeypatch.setattr(tasks, "upload_context", tasks.upload_context.with_options(retry_delay_seconds=0))


@pytest.fixture
def kill_mcp_build(sandbox, monkeypatch):
    return lambda reason: monkeypatch.setitem(sandbox.buildkit.kills, MCP_REPOSITORY, reason)


def creates(sandbox, app, resource: str) -> list:
    """The emulator's record of every create (POST) of `resource` in the app's build namespace."""
    return [r for r in sandbox.kube.requests
            if r.verb == "create" and r.resource == resource and r.namespace == app.config.build.namespace]


def jobs_path(app) -> str:
    return rf"^/apis/batch/v1/namespaces/{app.config.build.namespace}/jobs$"


def stored_contexts(sandbox, app, component: str) -> list[str]:
    s3 = sandbox.aws.client("s3", app.config.aws.region)
    listing = s3.list_objects_v2(Bucket=app.config.aws.bucket, Prefix=f"{app.config.aws.prefix}{component}/")
    return [item["Key"] for item in listing.get("Contents", [])]


def served(proxy: FaultProxy, method: str, path_prefix: str) -> list[int]:
    return [s.status for s in proxy.log if s.method == method and s.path.startswith(path_prefix)]


def pushed_digest(sandbox, job_name: str) -> str:
    """The digest the build pod of this Job pushed, as the simulated BuildKit recorded it."""
    [build] = [b for b in sandbox.buildkit.builds if b["pod"].startswith(f"{job_name}-")]
    return build["metadata"]["containerimage.digest"]


def failure_message(state) -> str:
    with pytest.raises(PipelineFailed) as error:
        state.result()
    return str(error.value)


def test_s3_5xx_on_the_first_upload_attempts_is_retried_and_the_context_stored_once(
    prefect_server, sandbox, example_app, s3_through_proxy
):
    app = example_app
    bucket = app.config.aws.bucket
    proxy = s3_through_proxy()
    proxy.fail("PUT", rf"^/{bucket}/", 500)
    proxy.fail("PUT", rf"^/{bucket}/", 503)

    result = app.run(components=[MCP], deploy=False).result()

    mcp = by_name(result)[MCP]
    key = context_key(app.config.aws.prefix, MCP, mcp.archive_sha256)
    assert mcp.outcome == "built" and mcp.context_uploaded is True
    assert stored_contexts(sandbox, app, MCP) == [key]
    body = sandbox.aws.client("s3", app.config.aws.region).get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == mcp.archive_sha256
    assert served(proxy, "PUT", f"/{bucket}/{key}") == [500, 503, 200]


def test_s3_failing_for_good_fails_the_run_readably_before_any_secret_or_job(
    prefect_server, sandbox, example_app, s3_through_proxy, no_retry_waits
):
    app = example_app
    bucket, prefix = app.config.aws.bucket, app.config.aws.prefix
    proxy = s3_through_proxy(retries={"mode": "standard", "max_attempts": 2})
    proxy.fail("PUT", rf"^/{bucket}/", 503, times=None)

    state = app.run(components=[MCP], deploy=False)
    message = failure_message(state)

    folder = f"{bucket}/{prefix}{MCP}/"
    assert f"{MCP}: ContextUploadFailed: S3 answered HTTP 503 SlowDown" in message
    assert f"s3://{folder}" in message and "Fix: " in message
    assert stored_contexts(sandbox, app, MCP) == []
    assert len(served(proxy, "HEAD", f"/{folder}")) == tasks.upload_context.retries + 1, \
        "a 503 is transient: the upload stage is retried"
    puts = served(proxy, "PUT", f"/{folder}")
    assert len(puts) > 1 and set(puts) == {503}
    attempts = tasks.upload_context.retries + 1
    uploads = wait_until(lambda: [r for r in task_runs(state.state_details.flow_run_id)
                                  if r.state and r.state.is_failed() and r.run_count == attempts],
                         what="the upload's failed task run, every attempt recorded")
    assert [r.name for r in uploads] == [f"upload {MCP}"], "every retry keeps the task run's name"
    assert creates(sandbox, app, "secrets") == [] and creates(sandbox, app, "jobs") == []


@pytest.mark.parametrize("status, retry_after", [(500, None), (429, 2)], ids=["500", "429-retry-after"])
def test_a_job_create_refused_by_the_api_server_is_retried_and_creates_one_job(
    prefect_server, sandbox, example_app, status, retry_after
):
    app = example_app
    sandbox.kube.inject_fault("POST", jobs_path(app), status, retry_after=retry_after)

    result = app.run(components=[MCP], deploy=False).result()

    attempts = creates(sandbox, app, "jobs")
    assert [r.status for r in attempts] == [status, 201]
    if retry_after:
        assert attempts[1].time - attempts[0].time >= retry_after, "Retry-After is honoured"
    [job] = jobs(sandbox, app, MCP)
    image = by_name(result)[MCP].image
    assert image.job == job["metadata"]["name"]
    assert image.digest == pushed_digest(sandbox, image.job)


def test_a_lost_job_create_response_adopts_the_job_it_created(prefect_server, sandbox, example_app):
    app = example_app
    sandbox.kube.inject_fault("POST", jobs_path(app), 504, after=True)

    result = app.run(components=[MCP], deploy=False).result()

    assert [r.status for r in creates(sandbox, app, "jobs")] == [504, 409]
    [job] = jobs(sandbox, app, MCP)
    image = by_name(result)[MCP].image
    assert image.job == job["metadata"]["name"]
    assert image.digest == pushed_digest(sandbox, image.job)
    assert sandbox.kube.list("secrets", app.config.build.namespace) == []


@pytest.mark.parametrize("reason", ["OOMKilled", "Error"])
def test_a_build_pod_killed_mid_build_fails_with_a_diagnosis_and_leaves_no_secret(
    prefect_server, sandbox, example_app, kill_mcp_build, reason
):
    app = example_app
    kill_mcp_build(reason)

    message = failure_message(app.run(components=[MCP], deploy=False))

    [job] = jobs(sandbox, app, MCP)
    assert f"{MCP}: BuildFailed: {MCP}: build Job {app.config.build.namespace}/{job['metadata']['name']} failed" \
        in message
    assert f"killed at its memory limit ({reason}, exit code 137)" in message
    assert "build.resources.limits.memory" in message and "[oom-killed]" in message
    assert "RUN pip install" in message.partition("--- last 50 log lines ---")[2], "the step it died in"
    assert [r.status for r in creates(sandbox, app, "secrets")] == [201]
    assert sandbox.kube.list("secrets", app.config.build.namespace) == []
