"""The build stage against the sandbox: live logs, watch resumption, reuse, cache, secrets, failures, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time

import pytest

from flows.pipeline import build_and_deploy
from flows.results import PipelineFailed
from sandbox.example import commit_all
from tests.conftest import by_name, jobs, run_logs, wait_until

MCP, AGENT = "weather-mcp", "weather-agent"
MCP_REPOSITORY = "123456789012.dkr.ecr.us-west-2.amazonaws.com/agents-on-eks/weather-mcp"
MCP_CONTEXT = "agents/weather/mcp-servers/weather-mcp-server"


@pytest.fixture
def slow_mcp_build(sandbox, monkeypatch):
    return lambda seconds: monkeypatch.setitem(sandbox.buildkit.build_seconds, MCP_REPOSITORY, seconds)


@pytest.fixture
def failing_mcp_build(sandbox, monkeypatch):
    return lambda text: monkeypatch.setitem(sandbox.buildkit.failures, MCP_REPOSITORY, text)


def in_background(app, **params) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target():
        outcome["state"] = app.run(**params)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_build_log_lines_reach_the_prefect_log_before_the_job_finishes(prefect_server, sandbox, example_app,
                                                                       slow_mcp_build):
    slow_mcp_build(8)
    # without the registry cache an earlier build of the same context in this session cannot make the steps instant
    thread, outcome = in_background(example_app, deploy=False, no_cache=True)
    [job] = wait_until(lambda: jobs(sandbox, example_app, MCP))
    flow_run_id = job["metadata"]["labels"]["buildkit-pipeline/flow-run"]

    streamed = wait_until(lambda: [m for m in run_logs(flow_run_id) if m.startswith(f"{MCP} | #")], timeout=20)

    still_running = sandbox.kube.get("jobs", example_app.config.build.namespace, job["metadata"]["name"])
    assert not [c for c in still_running["status"].get("conditions", []) if c["type"] == "Complete"]
    assert any("load remote build context" in line for line in streamed)
    thread.join(60)
    assert outcome["state"].is_completed()


def test_a_dropped_watch_and_410_gone_resume_without_a_second_job(prefect_server, sandbox, example_app,
                                                                  slow_mcp_build):
    slow_mcp_build(3)
    thread, outcome = in_background(example_app, deploy=False)
    wait_until(lambda: jobs(sandbox, example_app, MCP))
    time.sleep(0.5)
    sandbox.kube.expire_history()
    sandbox.kube.drop_watches()
    thread.join(60)

    result = outcome["state"].result()
    assert by_name(result)[MCP].outcome == "built"
    assert len(jobs(sandbox, example_app, MCP)) == 1
    creates = [r for r in sandbox.kube.requests if r.verb == "create" and r.resource == "jobs"
               and r.namespace == example_app.config.build.namespace]
    assert len(creates) == 2, "one Job per component"


def test_skip_unchanged_reuses_the_image_and_creates_no_job(prefect_server, sandbox, example_app):
    first = example_app.run().result()
    before = len(jobs(sandbox, example_app))

    second = example_app.run(skip_unchanged=True).result()

    assert len(jobs(sandbox, example_app)) == before
    for name in (MCP, AGENT):
        assert by_name(second)[name].image.reused is True
        assert by_name(second)[name].image.digest == by_name(first)[name].image.digest
        assert by_name(second)[name].outcome == "deployed"
        assert "build" in by_name(second)[name].seconds and "upload" not in by_name(second)[name].seconds


def test_a_changed_context_is_built_even_with_skip_unchanged_and_uses_the_registry_cache(
    prefect_server, sandbox, example_app
):
    example_app.run(deploy=False).result()
    server = example_app.root / MCP_CONTEXT / "server.py"
    server.write_text(server.read_text() + "\n# cache me if you can\n")
    commit_all(example_app.root, "Change the server")

    result = example_app.run(deploy=False, skip_unchanged=True).result()

    mcp, agent = by_name(result)[MCP], by_name(result)[AGENT]
    assert mcp.outcome == "built" and agent.outcome == "unchanged"
    latest = [b for b in sandbox.buildkit.builds if b["pod"].startswith(mcp.image.job)]
    assert latest[-1]["cache_imported"] is True
    cached, total = mcp.cache_hits
    assert 0 < cached < total
    assert any(row["cached"] for row in mcp.steps)


def test_build_secrets_reach_the_build_as_files_and_leave_with_it(prefect_server, sandbox, example_app):
    app = example_app
    namespace = app.config.build.namespace
    sandbox.kube.create("secrets", namespace, {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pip", "namespace": namespace},
        "data": {"token": "cGlwLXRva2VuLXZhbHVl"},
    })
    secrets_manager = sandbox.aws.client("secretsmanager", app.config.aws.region)
    arn = secrets_manager.create_secret(Name=f"npmrc-{namespace}", SecretString="//registry/:_authToken=xyz")["ARN"]
    text = app.pipeline_file.read_text().replace(
        "    image: agents-on-eks/weather-mcp\n",
        "    image: agents-on-eks/weather-mcp\n"
        "    secrets:\n"
        "      - {id: pip-token, kubernetes: {name: pip, key: token}}\n"
        f"      - {{id: npmrc, aws_secrets_manager: '{arn}'}}\n",
    )
    app.pipeline_file.write_text(text)
    commit_all(app.root, "Build secrets")

    result = app.run(deploy=False).result()

    job = by_name(result)[MCP].image.job
    [build] = [b for b in sandbox.buildkit.builds if b["pod"].startswith(job)]
    assert build["secrets"] == {
        "pip-token": hashlib.sha256(b"pip-token-value").hexdigest(),
        "npmrc": hashlib.sha256(b"//registry/:_authToken=xyz").hexdigest(),
    }
    assert sandbox.kube.get("secrets", namespace, f"{job}-secrets") is None
    assert sandbox.kube.get("secrets", namespace, f"{job}-registry") is None
    assert sandbox.kube.get("secrets", namespace, "pip") is not None, "the user's own Secret stays"


def test_a_failed_build_names_component_job_diagnosis_and_log_tail(prefect_server, sandbox, example_app,
                                                                   failing_mcp_build):
    failing_mcp_build('process "/bin/sh -c pip install --no-cache-dir -r requirements.txt" '
                      "did not complete successfully: exit code: 1")
    state = example_app.run()

    with pytest.raises(PipelineFailed) as error:
        state.result()
    message = str(error.value)
    [job] = jobs(sandbox, example_app, MCP)
    assert f"{MCP}: BuildFailed: {MCP}: build Job {example_app.config.build.namespace}/{job['metadata']['name']}" in message
    assert "[run-step-failed]" in message and "pip install" in message
    assert "--- last 50 log lines ---" in message
    assert f"{AGENT}: " in message and "not deployed because weather-mcp did not deploy" in message
    assert sandbox.kube.list("secrets", example_app.config.build.namespace) == []


def test_a_cancelled_run_leaves_no_job_and_no_secret(prefect_server, sandbox, example_app, slow_mcp_build):
    slow_mcp_build(30)
    namespace = example_app.config.build.namespace

    async def start_then_cancel():
        task = asyncio.create_task(build_and_deploy(config=str(example_app.pipeline_file), deploy=False))
        while not jobs(sandbox, example_app, MCP):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        task.cancel()
        with contextlib.suppress(BaseException):
            await task

    with example_app.connected():
        asyncio.run(start_then_cancel())

    wait_until(lambda: not jobs(sandbox, example_app, MCP), timeout=10)
    assert sandbox.kube.list("secrets", namespace) == []
    assert sandbox.kube.list("pods", namespace, label_selector=f"buildkit-pipeline/component={MCP}") == []


def test_a_cancelled_build_whose_job_delete_fails_stays_cancelled_and_is_not_retried(
        prefect_server, sandbox, example_app, slow_mcp_build):
    """The API refusing to delete the Job of a cancelled build must not turn the cancellation into a failure that
    the build task retries with a new Job; the run's cleanup hook deletes what is left."""
    slow_mcp_build(30)
    namespace = example_app.config.build.namespace
    outcome = []

    async def start_then_cancel():
        task = asyncio.create_task(build_and_deploy(config=str(example_app.pipeline_file), components=[MCP],
                                                    deploy=False))
        while not jobs(sandbox, example_app, MCP):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        sandbox.kube.inject_fault("DELETE", rf"/namespaces/{namespace}/(jobs|secrets)/", 503, times=100)
        task.cancel()
        try:
            await task
        except BaseException as exc:  # noqa: BLE001 - what the cancelled run ended with is the point
            outcome.append(exc)
        await asyncio.sleep(3)  # longer than the build task's first retry delay

    try:
        with example_app.connected():
            asyncio.run(start_then_cancel())
    finally:
        sandbox.kube.clear_faults()

    creates = [r for r in sandbox.kube.requests if r.verb == "create" and r.resource == "jobs"
               and r.namespace == namespace]
    assert len(creates) == 1, "the cancelled build was retried with a new Job"
    assert [type(exc) for exc in outcome] == [asyncio.CancelledError]


def test_build_failed_is_not_retried(prefect_server, sandbox, example_app, failing_mcp_build):
    failing_mcp_build("failed to read dockerfile: open Dockerfile: no such file or directory")
    with pytest.raises(PipelineFailed, match="dockerfile-missing"):
        example_app.run(deploy=False).result()
    creates = [r for r in sandbox.kube.requests if r.verb == "create" and r.resource == "jobs"
               and r.namespace == example_app.config.build.namespace]
    assert len(creates) == 2, "one create per component: a failed build is not retried"
