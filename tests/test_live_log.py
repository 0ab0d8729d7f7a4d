"""The live build log survives a very long line: the lines and steps after it still arrive."""

from __future__ import annotations

import json

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)

from sandbox.example import commit_all
from tests.conftest import run_logs

MCP = "weather-mcp"
MCP_REPOSITORY = "123456789012.dkr.ecr.us-west-2.amazonaws.com/agents-on-eks/weather-mcp"
MiB = 1024 * 1024


def steps_artifact(flow_run_id, component: str) -> list[dict]:
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"build-steps-{component}"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        )
    return json.loads(artifact.data)


@pytest.mark.parametrize("builder, size", [("buildkit", 1 * MiB), ("buildkit", 6 * MiB), ("kaniko", 6 * MiB)])
def test_the_lines_and_steps_after_a_very_long_line_reach_the_run_log_and_the_steps_artifact(
        prefect_server, sandbox, example_app, monkeypatch, builder, size):
    if builder == "kaniko":
        text = example_app.pipeline_file.read_text().replace("mode: privileged}", "mode: privileged, builder: kaniko}")
        example_app.pipeline_file.write_text(text)
        commit_all(example_app.root, "Kaniko")
    simulated = getattr(sandbox, builder)
    monkeypatch.setitem(simulated.run_output, MCP_REPOSITORY, "x" * size + "\nthe line after the long one\n")

    state = example_app.run(deploy=False, no_cache=True)

    assert state.is_completed()
    flow_run_id = state.state_details.flow_run_id
    messages = [m for m in run_logs(flow_run_id) if m.startswith(f"{MCP} | ")]
    assert any(m.endswith("the line after the long one") for m in messages)
    last_step = "exporting to image" if builder == "buildkit" else "CMD"
    assert any(last_step in m for m in messages[-5:] + messages), messages[-5:]
    steps = [row["step"] for row in steps_artifact(flow_run_id, MCP)]
    run = next(i for i, step in enumerate(steps) if "RUN" in step)
    assert any(last_step in step for step in steps[run + 1:]), steps


def test_a_log_still_streaming_when_the_build_ends_is_read_to_its_last_line(
        prefect_server, sandbox, example_app, monkeypatch):
    """The build ends while its log is still on the way (a busy node or API server): the run reads on while bytes
    keep coming, so the last lines, which say what the build did, are not cut off after a fixed grace."""
    monkeypatch.setattr(sandbox.kube, "log_bytes_per_second", 256 * 1024)
    monkeypatch.setitem(sandbox.buildkit.run_output, MCP_REPOSITORY, "x" * MiB + "\nthe line after the long one\n")

    state = example_app.run(deploy=False, no_cache=True)

    assert state.is_completed()
    messages = [m for m in run_logs(state.state_details.flow_run_id) if m.startswith(f"{MCP} | ")]
    assert any(m.endswith("the line after the long one") for m in messages)
    assert any("exporting to image" in m for m in messages)
