"""Cancelling a served run from the API (as the UI does), and helm releases a killed helm left pending."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import State, StateType

from flows.build_run import delete_run_objects
from flows.kube import kube_api
from tests.conftest import HELM, wait_until
from tests.operating import MCP_REPOSITORY, serving

MCP = "weather-mcp"
FLOW_RUN_LABEL = "buildkit-pipeline/flow-run"


@pytest.fixture(scope="module")
def served(prefect_server, example_app_in, tmp_path_factory):
    """The example app's deployments, served by one process for this module's two served runs: one cancels a
    build that deploys nothing, the other a first install of the release."""
    with serving(example_app_in(tmp_path_factory.mktemp("served"))) as app:
        yield app


def run_objects(sandbox, namespace: str, flow_run_id: str) -> list[str]:
    """The Jobs and Secrets in the emulator labelled with this flow run."""
    return [f"{kind}/{o['metadata']['name']}" for kind in ("jobs", "secrets") for o in sandbox.kube.list(kind, namespace)
            if (o["metadata"].get("labels") or {}).get(FLOW_RUN_LABEL) == flow_run_id]


def settle(condition, timeout: float) -> None:
    """Give the runner's work after the final state (hooks, log shipping) up to `timeout` to show."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.5)


def start_run(client, app, **parameters):
    """A run of the served `on-demand` deployment for this app: its pipeline file and target given explicitly,
    since an earlier test's serve process may have registered the deployment with its own."""
    deployment = client.read_deployment_by_name("build-and-deploy/on-demand")
    return client.create_flow_run_from_deployment(deployment.id, parameters={
        "config": str(app.pipeline_file), "target": f"sandbox-{app.config.build.namespace}", **parameters})


def cancel(client, flow_run_id) -> None:
    """What Cancel in the UI and `prefect flow-run cancel` do: propose Cancelling; the runner serving the
    deployment does the rest."""
    client.set_flow_run_state(flow_run_id, State(type=StateType.CANCELLING))


def final_state(client, flow_run_id, timeout: float = 120):
    return wait_until(lambda: (s := client.read_flow_run(flow_run_id).state) and s.is_final() and s, timeout,
                      "the flow run to end", interval=0.2)


def run_log(client, flow_run_id) -> str:
    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    return "\n".join(log.message for log in logs)


def test_a_served_run_cancelled_through_the_api_deletes_its_build_job_and_secrets(served, sandbox, monkeypatch):
    """The flow process deletes its Job and Secrets when it is stopped, but here the API fails those deletes
    (503, once each): what is left is the cancellation hook's to delete, which the runner serving the
    deployment calls once the flow process has ended."""
    namespace = served.config.build.namespace
    monkeypatch.setitem(sandbox.buildkit.build_seconds, MCP_REPOSITORY, 120)
    with get_client(sync_client=True) as client:
        run = start_run(client, served, components=[MCP], deploy=False, skip_unchanged=False)
        created = wait_until(lambda: (objects := run_objects(sandbox, namespace, str(run.id)))
                             and any(o.startswith("jobs/") for o in objects) and objects, 120, "the build Job",
                             interval=0.2)
        assert any(o.startswith("secrets/") for o in created)
        for kind_and_name in created:
            kind, name = kind_and_name.split("/")
            prefix = "/apis/batch/v1" if kind == "jobs" else "/api/v1"
            sandbox.kube.inject_fault("DELETE", rf"^{prefix}/namespaces/{namespace}/{kind}/{name}$", 503)
        try:
            cancel(client, run.id)
            state = final_state(client, run.id)
            settle(lambda: not run_objects(sandbox, namespace, str(run.id))
                   and "build objects of run" in run_log(client, run.id), 20)
            log = run_log(client, run.id)
        finally:
            sandbox.kube.clear_faults()
    assert state.is_cancelled(), f"{state.type}: {state.message}\n{log}"
    assert run_objects(sandbox, namespace, str(run.id)) == [], log
    assert f"deleted {len(created)} build objects of run" in log, log


def test_run_cleanup_outlasts_transient_api_errors(sandbox):
    """The cancellation hook may be the only one left to delete a run's objects (the runner kills the flow process
    at once when the hook ran first), so a 503 or 429 from the API server must not leave one behind."""
    namespace, run_id = "default", "5eed0000-0000-4000-8000-00000000c1ea"
    labels = {FLOW_RUN_LABEL: run_id}
    sandbox.kube.create("secrets", namespace, {"metadata": {"name": "cleanup-a", "labels": labels}, "data": {}})
    sandbox.kube.create("secrets", namespace, {"metadata": {"name": "cleanup-b", "labels": labels}, "data": {}})
    sandbox.kube.inject_fault("GET", rf"^/apis/batch/v1/namespaces/{namespace}/jobs$", 503)
    sandbox.kube.inject_fault("DELETE", rf"^/api/v1/namespaces/{namespace}/secrets/cleanup-a$", 503, times=2)
    sandbox.kube.inject_fault("DELETE", rf"^/api/v1/namespaces/{namespace}/secrets/cleanup-b$", 429, retry_after=1)
    try:
        deleted = asyncio.run(_delete_run_objects(sandbox.kubeconfig, namespace, run_id))
    finally:
        sandbox.kube.clear_faults()
    assert (deleted, run_objects(sandbox, namespace, run_id)) == (2, [])


async def _delete_run_objects(kubeconfig, namespace: str, run_id: str) -> int:
    async with kube_api(str(kubeconfig)) as api:
        return await delete_run_objects(api, namespace, run_id)


def release_revisions(sandbox, namespace: str, release: str) -> list[tuple[int, str]]:
    """(revision, status) of a helm release, from the storage Secrets helm keeps in the emulator."""
    return sorted((int(s["metadata"]["labels"]["version"]), s["metadata"]["labels"]["status"])
                  for s in sandbox.kube.list("secrets", namespace)
                  if s["metadata"].get("labels", {}).get("owner") == "helm"
                  and s["metadata"]["labels"].get("name") == release)


def pending(revisions: list[tuple[int, str]]) -> bool:
    return bool(revisions) and revisions[-1][1].startswith("pending-")


@pytest.fixture
def hanging_rollout(sandbox):
    """Pods in the given namespace never become ready, so a `helm upgrade --wait` there stays in progress."""
    def hang(namespace: str) -> None:
        sandbox.kube.on_pod(lambda pod: pod["metadata"]["namespace"] == namespace,
                            lambda handle: handle.waiting("ContainerCreating"))
    yield hang
    sandbox.install_builders()


def kill_helm_mid_operation(sandbox, app, component: str) -> list[tuple[int, str]]:
    """Start `helm upgrade --install` of the component's release, SIGKILL it once helm has stored the new revision
    as pending: the state a killed worker or pod leaves behind."""
    release = app.config.component(component).release
    helm = subprocess.Popen(
        [str(HELM), "upgrade", "--install", release.name, str(app.root / release.chart), "--namespace",
         release.namespace, "--set-string", f"image.repository={MCP_REPOSITORY}", "--set-string",
         "image.tag=never-ready", "--wait", "--timeout", "120s", "--kubeconfig", str(sandbox.kubeconfig)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: pending(release_revisions(sandbox, release.namespace, release.name)), 60,
                   "helm to store a pending revision", interval=0.2)
    finally:
        helm.kill()
        helm.wait(30)
    return release_revisions(sandbox, release.namespace, release.name)


def flow_run_log(state, expected: str) -> str:
    """The run's log, once `expected` has reached the server (logs are shipped in batches)."""
    with get_client(sync_client=True) as client:
        settle(lambda: expected in run_log(client, state.state_details.flow_run_id), 20)
        return run_log(client, state.state_details.flow_run_id)


def test_a_release_left_pending_upgrade_is_rolled_back_and_then_upgraded(prefect_server, sandbox, example_app,
                                                                       hanging_rollout):
    app, release = example_app, example_app.config.component(MCP).release
    app.run(components=[MCP]).result()
    hanging_rollout(release.namespace)
    assert kill_helm_mid_operation(sandbox, app, MCP) == [(1, "deployed"), (2, "pending-upgrade")]
    sandbox.install_builders()

    state = app.run(components=[MCP])

    log = flow_run_log(state, "then upgrading")
    assert state.is_completed(), f"{state.message}\n{log}"
    revisions = release_revisions(sandbox, release.namespace, release.name)
    assert revisions[-1] == (4, "deployed") and not any(s.startswith("pending-") for _, s in revisions[2:]), revisions
    assert (3, "superseded") in revisions, "revision 3 is the rollback to revision 1"
    assert f"release {release.namespace}/{release.name}: revision 2 is pending-upgrade" in log
    assert "rolling back to revision 1, then upgrading" in log
    image = sandbox.kube.get("deployments", release.namespace, release.name)["spec"]["template"]["spec"][
        "containers"][0]["image"]
    assert image.startswith(f"{MCP_REPOSITORY}:") and "never-ready" not in image


def test_a_release_left_pending_install_is_uninstalled_and_installed_again(prefect_server, sandbox, example_app,
                                                                          hanging_rollout):
    app, release = example_app, example_app.config.component(MCP).release
    hanging_rollout(release.namespace)
    assert kill_helm_mid_operation(sandbox, app, MCP) == [(1, "pending-install")]
    sandbox.install_builders()

    state = app.run(components=[MCP])

    log = flow_run_log(state, "install it afresh")
    assert state.is_completed(), f"{state.message}\n{log}"
    assert release_revisions(sandbox, release.namespace, release.name) == [(1, "deployed")]
    assert "revision 1 is pending-install" in log and "uninstalling it to install it afresh" in log


def test_a_served_run_cancelled_during_helm_leaves_no_pending_release(served, sandbox, hanging_rollout):
    """The runner stops the flow process; the flow stops its helm with SIGTERM, on which helm fails the install and
    rolls it back, instead of dying with the release `pending-install`."""
    release = served.config.component(MCP).release
    hanging_rollout(release.namespace)
    with get_client(sync_client=True) as client:
        run = start_run(client, served, components=[MCP], skip_unchanged=False)
        wait_until(lambda: pending(release_revisions(sandbox, release.namespace, release.name)), 180,
                   "helm to store a pending revision", interval=0.2)
        cancel(client, run.id)
        state = final_state(client, run.id)
        settle(lambda: not pending(release_revisions(sandbox, release.namespace, release.name)), 30)
        log = run_log(client, run.id)
    revisions = release_revisions(sandbox, release.namespace, release.name)
    assert state.is_cancelled(), f"{state.type}: {state.message}\n{log}"
    assert not pending(revisions), revisions
    # A first install cancelled with --rollback-on-failure is uninstalled, history and all
    # (helm/helm pkg/action/install.go failRelease, v4.1.4).
    assert revisions == []
    assert "stopping `helm upgrade`: SIGTERM" in log, log
