"""Task runs named by stage and component, as the Prefect server holds them, so a node of the run graph says what
it is (`build weather-mcp (buildkit)`, not `build-7b8`); and no name carries a secret."""

from __future__ import annotations

from collections import Counter

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import TaskRun

from tests.conftest import wait_until
from tests.test_security import MCP, RunSecrets, add_run_secrets, secret_app  # noqa: F401 - secret_app: a fixture


def task_runs(flow_run_id) -> list[TaskRun]:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def task_run_names(flow_run_id, count: int) -> Counter:
    """The names of the run's `count` task runs, once the server has recorded each one's final state (it records
    them from events, after the flow run has returned)."""
    def recorded() -> list[TaskRun] | None:
        runs = task_runs(flow_run_id)
        return runs if len(runs) >= count and all(r.state and r.state.is_final() for r in runs) else None

    return Counter(r.name for r in wait_until(recorded, timeout=60, what=f"{count} final task runs"))


def per_component(component: str, builder: str = "buildkit") -> list[str]:
    return [f"package {component}", f"upload {component}", f"registry-auth {component}",
            f"build-secrets {component}", f"build {component} ({builder})", f"deploy {component}",
            f"verify {component}"]  # the example's releases have checks (its pipeline file's `verify:`)


def test_every_task_run_of_a_pipeline_run_names_its_stage_and_component_and_no_secret(prefect_server, sandbox,
                                                                                       secret_app):
    app, secrets = secret_app.app, secret_app.secrets
    since = sandbox.kube.store.resource_version

    state = app.run()
    state.result()

    expected = Counter(["source (the pipeline file's ref)", f"release-secrets {MCP}"]
                       + [name for c in app.config.components for name in per_component(c.name)])
    flow_run_id = state.state_details.flow_run_id
    names = task_run_names(flow_run_id, sum(expected.values()))
    assert names == expected
    add_run_secrets(secrets, sandbox, app, state, since)
    assert not secrets.found_in("the task run names", list(names))
    assert not [name for name in names if "://" in name or "X-Amz" in name]


def test_a_run_without_a_build_role_names_its_one_registry_token_for_all_components(prefect_server, sandbox,
                                                                                    example_app):
    example_app.flow_kwargs["build_role_arn"] = None
    state = example_app.run(deploy=False)
    state.result()

    expected = Counter(["source (the pipeline file's ref)", "registry-auth all components"]
                       + [f"{stage} {c.name}" for c in example_app.config.components for stage in ("package", "upload")]
                       + [f"build {c.name} (buildkit)" for c in example_app.config.components])
    assert task_run_names(state.state_details.flow_run_id, sum(expected.values())) == expected
