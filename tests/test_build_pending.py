"""Build pods that cannot start, are disrupted, or fail: the run notices from the watch, well before the deadline.

Each test runs the real flow on the example app against the sandbox and asserts on the run's error, the time it
took, and the Jobs and pods the emulator holds.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from flows import pending
from flows.aio import within
from flows.results import PipelineFailed
from tests.conftest import jobs, wait_until
from tests.test_build_sandbox import MCP_REPOSITORY
from tests.test_deploy import deployed_image, edit_pipeline

MCP, AGENT = "weather-mcp", "weather-agent"
BUILD_LINE = "build: {namespace: build-t"


def build_settings(app, extra: str) -> None:
    """Add `key: value` pairs to the example's `build:` mapping."""
    text = app.pipeline_file.read_text()
    line = next(line for line in text.splitlines() if line.startswith("build: {"))
    edit_pipeline(app, line, line[:-1] + f", {extra}}}")


def failed_quickly(app, seconds: float) -> str:
    started = time.monotonic()
    state = app.run(deploy=False)
    elapsed = time.monotonic() - started
    with pytest.raises(PipelineFailed) as error:
        state.result()
    assert elapsed < seconds, f"the run took {elapsed:.1f} s"
    return str(error.value)


def test_a_mistyped_build_image_fails_in_seconds_and_deletes_the_job(prefect_server, sandbox, example_app):
    edit_pipeline(example_app, "image: moby/buildkit:v0.31.2", "image: moby/buildkit:v0.31.99")

    message = failed_quickly(example_app, 30)  # the deadline is 1800 s

    assert "[buildkit-image-pull]" in message and "moby/buildkit:v0.31.99" in message
    assert "never started, so it was deleted" in message and "build.image" in message
    assert jobs(sandbox, example_app) == []


def test_a_node_selector_no_node_matches_fails_after_the_pending_timeout(prefect_server, sandbox, example_app):
    build_settings(example_app, "pending_timeout_seconds: 10, node_selector: {kubernetes.io/arch: arm64}")

    message = failed_quickly(example_app, 40)

    assert "[unschedulable]" in message
    assert "didn't match Pod's node affinity/selector" in message
    assert "build.pending_timeout_seconds is 10" in message
    assert jobs(sandbox, example_app) == []


def test_an_unschedulable_pod_whose_node_is_being_provisioned_keeps_waiting(prefect_server, sandbox, example_app):
    """Karpenter's `Nominated` event on the pod: a node is coming, so the pending timeout does not apply."""
    build_settings(example_app, "pending_timeout_seconds: 10, node_selector: {kubernetes.io/arch: arm64}")
    namespace = example_app.config.build.namespace
    seen: dict = {}

    def provision() -> None:
        pod = wait_until(lambda: next((p for p in sandbox.kube.list("pods", namespace)
                                     if p["metadata"]["labels"].get("buildkit-pipeline/component") == MCP
                                     and (p.get("status") or {}).get("conditions")), None))
        sandbox.kube.record_event(pod, "Normal", "Nominated", "Pod should schedule on: nodeclaim/default-x8k2p",
                                  "karpenter")
        time.sleep(14)  # past the pending timeout: the run must still be waiting
        seen["jobs"] = jobs(sandbox, example_app, MCP)
        for job in seen["jobs"]:
            sandbox.kube.delete("jobs", namespace, job["metadata"]["name"])

    helper = threading.Thread(target=provision, daemon=True)
    helper.start()
    message = failed_quickly(example_app, 40)
    helper.join()

    assert len(seen["jobs"]) == 1, "the Job was still there after the pending timeout"
    assert "was deleted before it finished" in message


def test_a_namespace_enforcing_baseline_fails_in_seconds_with_the_pod_security_fix(prefect_server, sandbox,
                                                                                  example_app):
    namespace = example_app.config.build.namespace
    sandbox.kube.patch("namespaces", None, namespace, {"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "baseline"}}})

    message = failed_quickly(example_app, 30)

    assert "[pod-security-admission]" in message
    assert "Pod Security admission (baseline:latest) refused the build pod" in message
    assert 'privileged (container "buildkit" must not set securityContext.privileged=true)' in message
    assert f"kubectl label ns {namespace} pod-security.kubernetes.io/enforce=privileged" in message
    assert jobs(sandbox, example_app) == []
    assert sandbox.kube.list("pods", namespace) == []


def test_an_evicted_build_pod_is_replaced_and_its_image_deployed(prefect_server, sandbox, example_app, monkeypatch):
    monkeypatch.setitem(sandbox.buildkit.build_seconds, MCP_REPOSITORY, 3)
    namespace = example_app.config.build.namespace
    evicted: list[str] = []

    def evict_first_pod() -> None:
        pod = wait_until(lambda: next((p for p in sandbox.kube.list("pods", namespace)
                                     if p["metadata"]["labels"].get("buildkit-pipeline/component") == MCP
                                     and (p.get("status") or {}).get("phase") == "Running"), None))
        time.sleep(0.5)
        sandbox.kube.evict(namespace, pod["metadata"]["name"])
        evicted.append(pod["metadata"]["name"])

    helper = threading.Thread(target=evict_first_pod, daemon=True)
    helper.start()
    result = example_app.run().result()
    helper.join()

    [job] = jobs(sandbox, example_app, MCP)
    assert job["status"].get("failed") == 1 and job["status"].get("succeeded") == 1
    assert job["spec"]["template"]["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"] == "true"
    pods = sandbox.kube.list("pods", namespace, label_selector=f"job-name={job['metadata']['name']}")
    [survivor] = [p for p in pods if p["status"]["phase"] == "Succeeded"]
    assert survivor["metadata"]["name"] not in evicted
    built = next(c for c in result.components if c.name == MCP).image
    assert built.digest in deployed_image(sandbox, example_app, MCP)


def test_a_failing_run_step_is_not_retried(prefect_server, sandbox, example_app, monkeypatch):
    monkeypatch.setitem(sandbox.buildkit.failures, MCP_REPOSITORY,
                        'process "/bin/sh -c pip install -r requirements.txt" did not complete successfully: '
                        "exit code: 1")

    message = failed_quickly(example_app, 30)

    assert "[run-step-failed]" in message
    [job] = jobs(sandbox, example_app, MCP)
    failure = next(c for c in job["status"]["conditions"] if c["type"] == "FailureTarget")
    assert failure["reason"] == "PodFailurePolicy" and "matching FailJob rule at index 1" in failure["message"]
    assert len(sandbox.kube.list("pods", example_app.config.build.namespace,
                                 label_selector=f"job-name={job['metadata']['name']}")) == 1


# ------------------------------------------------------------------------ the decision, on its own


def _pod(waiting: dict | None = None, conditions: list | None = None, name: str = "bk-x-abcde") -> dict:
    status: dict = {"phase": "Pending", "conditions": conditions or []}
    if waiting:
        status["containerStatuses"] = [{"name": "buildkit", "state": {"waiting": waiting}}]
    return {"metadata": {"name": name}, "status": status}


def _event(reason: str, message: str, kind: str = "Pod", name: str = "bk-x-abcde") -> dict:
    return {"reason": reason, "message": message, "involvedObject": {"kind": kind, "name": name}}


UNSCHEDULABLE = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes"}]


@pytest.mark.parametrize("pod, events, waited, verdict", [
    (_pod({"reason": "ErrImagePull", "message": 'rpc error: code = NotFound desc = failed to pull and unpack image '
                                                '"docker.io/moby/buildkit:v9": ...: not found'}), [], 1, "fail"),
    (_pod({"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x"'}),
     [_event("Failed", 'Failed to pull image "x": ... 429 Too Many Requests - toomanyrequests: rate limit')], 1, "wait"),
    (_pod({"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x"'}),
     [_event("Failed", 'Failed to pull image "x": ... 429 Too Many Requests - toomanyrequests: rate limit')], 301,
     "fail"),
    (_pod({"reason": "CreateContainerConfigError", "message": 'secret "s" not found'}), [], 0, "fail"),
    (_pod(conditions=UNSCHEDULABLE), [], 299, "wait"),
    (_pod(conditions=UNSCHEDULABLE), [], 301, "fail"),
    (_pod(conditions=UNSCHEDULABLE), [_event("Nominated", "Pod should schedule on: nodeclaim/a")], 3000, "ok"),
    (_pod(conditions=UNSCHEDULABLE), [_event("TriggeredScaleUp", "pod triggered scale-up: [{g 0->1 (max: 3)}]")],
     3000, "ok"),
])
def test_pending_verdicts(pod, events, waited, verdict):
    found = pending.pod_verdict(pod, events, waited=waited, timeout=300)
    assert {"fail": bool(found.fail), "wait": found.recheck_in is not None and not found.fail,
            "ok": not found.fail and found.recheck_in is None}[verdict]


def test_a_guard_cancelled_as_its_next_event_arrives_stops():
    """The pending guard is cancelled once the Job ends, often just as another event arrives; on Python 3.11
    `asyncio.wait_for` returned that event instead of stopping (the bench's 50-build run hung on it)."""
    async def cancelled_with_an_event_ready() -> str:
        queue: asyncio.Queue = asyncio.Queue()
        waiting = asyncio.create_task(within(queue.get(), 300))
        await asyncio.sleep(0)
        queue.put_nowait("event")
        waiting.cancel()
        try:
            await asyncio.wait_for(asyncio.shield(waiting), 5)
        except asyncio.CancelledError:
            return "stopped"
        return "kept going"

    assert asyncio.run(cancelled_with_an_event_ready()) == "stopped"
