"""Helpers of the tests that operate the pipeline as operators do: served deployments, `prefect deploy`, scripts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from blocks.target import BuildKitPipelineTarget
from tests.conftest import REPO_ROOT

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

