"""Session-wide stand-ins: one Prefect test server and one sandbox (moto + Kubernetes emulator) for all tests."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="buildkit-pipeline-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect")
os.environ["BUILDKIT_PIPELINE_CACHE"] = str(_SESSION_DIR / "cache")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")

import pytest  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId  # noqa: E402
from prefect.client.schemas.objects import State  # noqa: E402
from prefect.events.worker import EventsWorker  # noqa: E402
from prefect.logging.handlers import APILogWorker  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.config import PipelineConfig, load_config  # noqa: E402
from flows.pipeline import build_and_deploy, connected_locally  # noqa: E402
from sandbox.example import commit_all, create_example_repo  # noqa: E402
from sandbox.stack import Sandbox  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
HELM = REPO_ROOT / ".tools" / "bin" / "helm"


@pytest.fixture(scope="session")
def prefect_server():
    # the test server migrates a new database each session: as slow as a first start (see flows/cli.py), and
    # slower still on a loaded machine (over 120 s was seen with other test sessions running)
    with prefect_test_harness(server_startup_timeout=300):
        yield


@pytest.fixture(scope="session")
def sandbox():
    with Sandbox(_SESSION_DIR / "sandbox") as running:
        yield running


@dataclass
class ExampleApp:
    pipeline_file: Path
    config: PipelineConfig
    flow_kwargs: dict
    """The sandbox's `aws_credentials` and `kubeconfig`: not flow parameters, see `connected`."""

    @property
    def root(self) -> Path:
        return self.pipeline_file.parent

    def connected(self):
        """Runs started inside this block build and deploy on the sandbox (flows.pipeline.connected_locally)."""
        return connected_locally(**self.flow_kwargs)

    def run(self, **params) -> State:
        """One run of the real flow against the sandbox; the final state, failed or not."""
        with self.connected():
            return asyncio.run(build_and_deploy(config=str(self.pipeline_file), **params, return_state=True))


_apps = itertools.count(1)


@pytest.fixture
def example_app(tmp_path, sandbox) -> ExampleApp:
    """A fresh git repository of the example app, with namespaces and a bucket of its own, provisioned."""
    return new_example_app(tmp_path, sandbox)


@pytest.fixture(scope="session")
def example_app_in(sandbox):
    """`example_app` for fixtures of a wider scope: call it with a directory. A fixture rather than an import, since
    `tests.conftest` imported by name is a second copy of this module, whose app counter would give names taken."""
    return lambda directory: new_example_app(directory, sandbox)


def new_example_app(directory: Path, sandbox) -> ExampleApp:
    pipeline_file = create_example_repo(directory / "weather-app")
    suffix = f"-t{next(_apps)}"
    text = pipeline_file.read_text()
    for namespace in ("build", "mcp-servers", "agents"):
        text = text.replace(f"namespace: {namespace}", f"namespace: {namespace}{suffix}")
    text = text.replace("bucket: weather-build-contexts", f"bucket: weather-build-contexts{suffix}")
    pipeline_file.write_text(text)
    # the agent reaches the MCP server by its Service's DNS name, which names the namespace
    values = pipeline_file.parent / "manifests/helm/values/weather-agent.yaml"
    values.write_text(values.read_text().replace(".mcp-servers.svc.", f".mcp-servers{suffix}.svc."))
    commit_all(pipeline_file.parent, "Namespaces for this test")
    config = load_config(pipeline_file)
    return ExampleApp(pipeline_file, config, sandbox.prepare(config))


def wait_until(condition, timeout: float = 30.0, what: str | None = None, interval: float = 0.05):
    """Poll `condition` until it returns something truthy and return that, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or condition.__name__}")


def by_name(result) -> dict:
    return {c.name: c for c in result.components}


def jobs(sandbox, app: ExampleApp, component: str | None = None) -> list[dict]:
    """The build Jobs in the app's build namespace, of one component or all."""
    return [j for j in sandbox.kube.list("jobs", app.config.build.namespace)
            if component is None or j["metadata"]["labels"].get("buildkit-pipeline/component") == component]


def fixture_log(path: Path) -> str:
    """A saved build log without its `# ` header lines (where the text comes from)."""
    lines = path.read_text().splitlines()
    while lines and lines[0].startswith("# "):
        lines.pop(0)
    return "\n".join(lines) + "\n"


def fixture_status(path: Path) -> dict:
    """A saved Pod, Job and events, as `diagnose` takes them."""
    data = json.loads(path.read_text())
    return {"pod": data.get("pod"), "job": data.get("job"), "events": data.get("events")}


def every_key(value) -> set[str]:
    """Every mapping key anywhere in a manifest."""
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in every_key(v)}
    if isinstance(value, list):
        return {k for v in value for k in every_key(v)}
    return set()


def run_events(flow_run_id, prefix: str, count: int, timeout: float = 30) -> list[dict]:
    """The run's events whose names start with `prefix`, oldest first, once the server holds `count` of them.

    Events go to the server through Prefect's events worker (which attaches the flow run as a related resource),
    and the server stores them in batches (its event persister's flush interval), so they are polled for.
    """
    EventsWorker.drain_all(timeout=5)
    body = {"filter": {"event": {"prefix": [prefix]}, "related": {"id": [f"prefect.flow-run.{flow_run_id}"]},
                       "order": "ASC"}, "limit": 50}

    def stored() -> list[dict] | None:
        with get_client(sync_client=True) as client:
            events = client.request("POST", "/events/filter", json=body).json()["events"]
        return events if len(events) >= count else None
    return wait_until(stored, timeout, f"{count} {prefix}* events of run {flow_run_id}")


def run_logs(flow_run_id) -> list[str]:
    """Every log message of a run, all pages of them.

    A run in this process hands its records to Prefect's log worker, which sends them in batches
    (PREFECT_LOGGING_TO_API_BATCH_INTERVAL): the run's last lines may still be queued when it returns.
    """
    APILogWorker.drain_all(timeout=5)
    with get_client(sync_client=True) as client:
        messages, offset = [], 0
        while page := client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                       offset=offset, limit=200):
            messages += [log.message for log in page]
            offset += len(page)
    return messages
