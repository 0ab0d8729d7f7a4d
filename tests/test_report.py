"""flows/report.py on hand-built results: timing rows, the CLI table, the critical path and the timeline."""

from __future__ import annotations

import json
import re

import pytest

from flows.build import BuiltImage
from flows.deploy import DeployedRelease
from flows.report import critical_path, format_timing, timeline_markdown, timing_rows
from flows.results import STAGES, ComponentResult, PipelineResult

COMMIT = "0123456789abcdef0123456789abcdef01234567"
AGENT_AFTER_MCP = {"weather-agent": ["weather-mcp"]}


def component(name: str, outcome: str, spans: dict[str, tuple[float, float]], *,
              cache_hits: tuple[int, int] | None = None, error: str | None = None) -> ComponentResult:
    """A result as the flow records it: seconds and spans for the stages that ran, image and release if reached."""
    image = (BuiltImage(repository=f"registry.example/{name}", tags=["abc"], digest=f"sha256:{name}", job=None)
             if outcome in ("built", "deployed") else None)
    release = DeployedRelease(name=name, namespace="apps", revision=4, image="x") if outcome == "deployed" else None
    return ComponentResult(
        name=name, outcome=outcome, spans=spans, image=image, release=release, error=error, cache_hits=cache_hits,
        seconds={stage: round(end - start, 3) for stage, (start, end) in spans.items()},
    )


def run(*components: ComponentResult, total: float) -> PipelineResult:
    return PipelineResult(commit=COMMIT, ref="main", components=list(components), seconds={"total": total})


def mcp_gates_agent() -> PipelineResult:
    """The MCP server builds longest; the agent builds quickly and then waits to deploy after it."""
    return run(
        component("weather-mcp", "deployed", {
            "package": (0.0, 1.0), "upload": (2.0, 3.0), "registry-auth": (3.0, 3.5),
            "build": (3.5, 20.0), "deploy": (20.2, 30.0),
        }, cache_hits=(3, 7)),
        component("weather-agent", "deployed", {
            # recorded out of order on purpose: rows and path must follow STAGES, not insertion order
            "deploy": (30.1, 35.0), "build": (3.0, 8.0), "package": (0.0, 1.5),
            "upload": (2.0, 2.5), "registry-auth": (2.5, 3.0), "queue": (1.6, 2.0),
        }, cache_hits=(9, 9)),
        component("web", "deployed", {
            "package": (0.0, 0.5), "upload": (1.6, 2.0), "registry-auth": (2.0, 2.4),
            "build": (2.4, 15.0), "deploy": (15.1, 18.0),
        }),
        total=35.3,
    )


def agent_build_longest() -> PipelineResult:
    """Same components, but the agent's own build outlasts the MCP server's deploy."""
    return run(
        component("weather-mcp", "deployed", {
            "package": (0.0, 1.0), "upload": (2.0, 3.0), "registry-auth": (3.0, 3.5),
            "build": (3.5, 20.0), "deploy": (20.2, 30.0),
        }),
        component("weather-agent", "deployed", {
            "package": (0.0, 0.8), "upload": (1.1, 2.5), "registry-auth": (2.5, 3.0),
            "build": (3.0, 40.0), "deploy": (40.1, 45.0),
        }),
        component("web", "deployed", {
            "package": (0.0, 1.1), "upload": (1.6, 2.0), "registry-auth": (2.0, 2.4),
            "build": (2.4, 15.0), "deploy": (15.1, 18.0),
        }),
        total=45.2,
    )


def mcp_build_fails() -> PipelineResult:
    """The MCP server's build fails; the agent, which deploys after it, is built but skipped."""
    return run(
        component("weather-mcp", "failed", {
            "package": (0.0, 1.0), "upload": (1.2, 2.0), "registry-auth": (2.0, 2.5), "build": (2.5, 25.0),
        }, error="BuildFailed: exit code 1"),
        component("weather-agent", "skipped", {
            "package": (0.0, 1.1), "upload": (1.2, 1.8), "registry-auth": (1.8, 2.2), "build": (2.2, 9.0),
        }, cache_hits=(1, 4), error="not deployed because weather-mcp did not deploy"),
        total=25.1,
    )


def path_stages(path) -> list[tuple[str, str]]:
    return [(name, stage) for name, stage, _, _ in path]


def chart_lines(markdown: str) -> list[str]:
    return re.search(r"```\n(.*?)\n```", markdown, re.S).group(1).splitlines()


def comparison(markdown: str) -> dict[tuple[str, str], list[str]]:
    """The change table as {(component, stage): [this run, previous, change]}."""
    section = markdown.split("## Change against the previous run", 1)[1]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")][2:]
    return {(cells[0].strip(), cells[1].strip()): [c.strip() for c in cells[2:]] for cells in rows}


# --- timing_rows --------------------------------------------------------------------------------


def test_rows_are_one_per_component_and_stage_that_ran_in_result_then_stage_order():
    rows = timing_rows(mcp_build_fails())

    assert [(r["component"], r["stage"]) for r in rows] == [
        ("weather-mcp", "package"), ("weather-mcp", "upload"), ("weather-mcp", "registry-auth"),
        ("weather-mcp", "build"),
        ("weather-agent", "package"), ("weather-agent", "upload"), ("weather-agent", "registry-auth"),
        ("weather-agent", "build"),
    ]
    assert {r["outcome"] for r in rows if r["component"] == "weather-agent"} == {"skipped"}


def test_rows_sort_stages_by_pipeline_order_not_recording_order():
    rows = [r for r in timing_rows(mcp_gates_agent()) if r["component"] == "weather-agent"]

    assert [r["stage"] for r in rows] == [s for s in STAGES if s != "verify"]  # the agent has no checks here


def test_rows_carry_span_cache_digest_and_revision_on_their_own_stage():
    rows = {(r["component"], r["stage"]): r for r in timing_rows(mcp_gates_agent())}

    build, deploy, upload = rows["weather-mcp", "build"], rows["weather-mcp", "deploy"], rows["weather-mcp", "upload"]
    assert (build["seconds"], build["started_s"], build["ended_s"]) == (16.5, 3.5, 20.0)
    assert (build["cache_hits"], build["digest"], build["revision"]) == ("3/7", "sha256:weather-mcp", "")
    assert (deploy["cache_hits"], deploy["digest"], deploy["revision"]) == ("", "", 4)
    assert (upload["cache_hits"], upload["digest"], upload["revision"]) == ("", "", "")
    assert rows["web", "build"]["cache_hits"] == ""  # no progress seen: no cache figure
    assert len({tuple(r) for r in rows.values()}) == 1, "a table artifact needs the same columns on every row"


def test_rows_of_a_failed_build_have_no_digest_but_keep_cache_hits():
    rows = {(r["component"], r["stage"]): r for r in timing_rows(mcp_build_fails())}

    assert rows["weather-mcp", "build"]["digest"] == ""
    assert rows["weather-agent", "build"]["cache_hits"] == "1/4"


# --- format_timing ------------------------------------------------------------------------------


def test_format_timing_has_a_line_per_component_dashes_for_stages_not_run_and_wall_time():
    lines = format_timing(mcp_build_fails()).splitlines()

    assert lines[0].split() == ["component", *STAGES, "outcome"]
    assert lines[1].split() == ["weather-mcp", "1.00", "-", "0.80", "0.50", "22.50", "-", "-", "failed"]
    assert lines[2].split() == ["weather-agent", "1.10", "-", "0.60", "0.40", "6.80", "-", "-", "skipped"]
    assert lines[3] == "wall time 25.10s"


def test_format_timing_right_aligns_seconds_under_their_stage():
    lines = format_timing(mcp_build_fails()).splitlines()
    build_end = lines[0].index("build") + len("build")

    assert lines[1][:build_end].endswith("22.50")
    assert lines[2][:build_end].endswith(" 6.80")


def test_format_timing_takes_the_stage_order_as_a_parameter():
    lines = format_timing(mcp_build_fails(), stages=("build", "package")).splitlines()

    assert lines[0].split() == ["component", "build", "package", "outcome"]
    assert lines[1].split() == ["weather-mcp", "22.50", "1.00", "failed"]


# --- critical_path ------------------------------------------------------------------------------


def test_critical_path_runs_through_the_mcp_build_and_deploy_to_the_agent_deploy():
    path = critical_path(mcp_gates_agent(), AGENT_AFTER_MCP)

    assert path_stages(path) == [
        ("weather-agent", "package"),  # the last package to finish released every upload
        ("weather-mcp", "upload"),
        ("weather-mcp", "registry-auth"),
        ("weather-mcp", "build"),
        ("weather-mcp", "deploy"),
        ("weather-agent", "deploy"),
    ]
    assert path[-1][2:] == (30.1, 35.0)
    assert path[3][2:] == (3.5, 20.0)


def test_critical_path_stays_in_the_agent_when_its_own_build_is_longest():
    path = critical_path(agent_build_longest(), AGENT_AFTER_MCP)

    assert path_stages(path) == [
        ("web", "package"),
        ("weather-agent", "upload"),
        ("weather-agent", "registry-auth"),
        ("weather-agent", "build"),
        ("weather-agent", "deploy"),
    ]


def test_critical_path_without_the_dependency_does_not_jump_to_another_component():
    path = critical_path(mcp_gates_agent(), after={})

    assert [name for name, *_ in path[1:]] == ["weather-agent"] * 5
    assert path_stages(path)[-2:] == [("weather-agent", "build"), ("weather-agent", "deploy")]


def test_critical_path_ignores_a_dependency_that_ended_after_the_deploy_started():
    result = run(
        component("a", "deployed", {"package": (0.0, 1.0), "build": (1.0, 5.0), "deploy": (5.0, 9.0)}),
        component("b", "deployed", {"package": (0.0, 1.0), "build": (1.0, 3.0), "deploy": (3.0, 10.0)}),
        total=10.0,
    )

    path = critical_path(result, {"b": ["a"]})

    assert path_stages(path) == [("b", "package"), ("b", "build"), ("b", "deploy")]


def test_critical_path_of_a_failed_run_ends_at_the_failed_stage():
    path = critical_path(mcp_build_fails(), AGENT_AFTER_MCP)

    assert path_stages(path) == [
        ("weather-agent", "package"),
        ("weather-mcp", "upload"),
        ("weather-mcp", "registry-auth"),
        ("weather-mcp", "build"),
    ]


def test_critical_path_skips_stages_a_component_did_not_run():
    result = run(
        component("web", "unchanged", {"package": (0.0, 1.0), "build": (1.0, 1.4)}),
        component("api", "failed", {"package": (0.0, 0.5), "upload": (1.0, 6.0)}, error="upload failed"),
        total=6.1,
    )

    assert path_stages(critical_path(result, {})) == [("web", "package"), ("api", "upload")]
    assert critical_path(run(component("web", "failed", {}), total=0.2), {}) == []


# --- timeline_markdown --------------------------------------------------------------------------


def test_timeline_heads_with_commit_and_wall_time():
    markdown = timeline_markdown(mcp_gates_agent(), AGENT_AFTER_MCP, None)

    heading = markdown.splitlines()[0]
    assert heading.startswith("# ")
    assert COMMIT[:12] in heading and "35.30s" in heading


def test_timeline_bars_follow_the_critical_path_and_are_proportional():
    lines = chart_lines(timeline_markdown(mcp_gates_agent(), AGENT_AFTER_MCP, None))
    bars = [re.search(r"\|( *)(█+)\|", line) for line in lines]
    offsets = [len(bar.group(1)) for bar in bars]
    lengths = [len(bar.group(2)) for bar in bars]
    seconds = [float(re.search(r"(\d+\.\d\d)s$", line).group(1)) for line in lines]

    assert [line.split()[:2] for line in lines][3] == ["weather-mcp", "build"]
    assert seconds == [1.5, 1.0, 0.5, 16.5, 9.8, 4.9]
    assert max(lengths) == lengths[3] == round(16.5 / 35.3 * 50)
    assert lengths[4] > lengths[5] > lengths[1], "a longer segment gets a longer bar"
    assert offsets == sorted(offsets) and offsets[-1] == round(30.1 / 35.3 * 50)
    assert all(offset + length <= 50 for offset, length in zip(offsets, lengths))
    assert len({line.index("|") for line in lines}) == 1, "names and stages are padded to one width"


def test_timeline_bars_when_the_agent_build_is_longest():
    lines = chart_lines(timeline_markdown(agent_build_longest(), AGENT_AFTER_MCP, None))
    lengths = {tuple(line.split()[:2]): line.count("█") for line in lines}

    assert max(lengths, key=lengths.get) == ("weather-agent", "build")
    assert ("weather-mcp", "deploy") not in lengths


def test_timeline_without_previous_run_says_so():
    for previous in (None, []):
        markdown = timeline_markdown(mcp_gates_agent(), AGENT_AFTER_MCP, previous)
        assert markdown.split("## Change against the previous run", 1)[1].strip() == "no previous run"


def test_timeline_compares_each_stage_with_the_previous_run():
    previous = mcp_gates_agent()
    previous.components = [c for c in previous.components if c.name != "web"]  # web is new in this run
    mcp = previous.components[0]
    mcp.seconds = {**mcp.seconds, "build": 14.5}
    del mcp.seconds["registry-auth"]  # a stage the previous run did not record
    previous.components.append(component("old-worker", "deployed", {"package": (0.0, 0.7)}))
    previous_rows = json.loads(json.dumps(timing_rows(previous)))

    table = comparison(timeline_markdown(mcp_gates_agent(), AGENT_AFTER_MCP, previous_rows))

    assert table["weather-mcp", "build"] == ["16.50s", "14.50s", "+2.00s"]
    assert table["weather-mcp", "deploy"] == ["9.80s", "9.80s", "+0.00s"]
    assert table["weather-mcp", "registry-auth"] == ["0.50s", "-", ""]
    assert table["web", "build"] == ["12.60s", "-", ""]
    assert table["old-worker", "package"] == ["-", "0.70s", ""]
    assert len(table) == 5 + 6 + 5 + 1  # mcp, agent (with a queue stage), web, and old-worker's one row


def test_timeline_shows_a_faster_stage_with_a_minus_sign():
    previous_rows = [{"component": "weather-agent", "stage": "build", "seconds": 7.25},
                     {"component": "weather-agent", "stage": "deploy", "seconds": "not a number"}]

    table = comparison(timeline_markdown(mcp_gates_agent(), AGENT_AFTER_MCP, previous_rows))

    assert table["weather-agent", "build"] == ["5.00s", "7.25s", "-2.25s"]
    assert table["weather-agent", "deploy"] == ["4.90s", "-", ""]


def test_timeline_of_a_failed_run_charts_only_stages_that_ran():
    markdown = timeline_markdown(mcp_build_fails(), AGENT_AFTER_MCP, None)

    lines = chart_lines(markdown)
    assert lines[-1].split()[:2] == ["weather-mcp", "build"]
    assert not any(" deploy " in line for line in lines)
    assert "24.90s working, 0.10s between stages" in markdown


@pytest.mark.parametrize("result", [mcp_gates_agent(), agent_build_longest(), mcp_build_fails()])
def test_timeline_chart_segments_match_the_critical_path(result):
    path = critical_path(result, AGENT_AFTER_MCP)

    lines = chart_lines(timeline_markdown(result, AGENT_AFTER_MCP, None))

    assert [tuple(line.split()[:2]) for line in lines] == path_stages(path)
