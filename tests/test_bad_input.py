"""Bad input exits 2 with a message naming the problem, before anything exists: no object in the bucket, no
Job, Secret or namespace written in the cluster, no flow run started.

Every case goes through the CLI (`plan` and `run`, the way the console script calls `main`); a parameter the
CLI cannot express goes through the flow, whose run fails naming it, with nothing created either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterExpectedStartTime
from prefect.exceptions import ParameterTypeError

from flows.cli import main
from sandbox.example import PIPELINE_FILE, commit_all

EXIT_BAD_INPUT = 2
WRITES = {"create", "update", "patch", "delete", "deletecollection"}
OUTSIDE = "../" * 40 + "etc/passwd"


def replace(old: str, new: str) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        pipeline = root / PIPELINE_FILE
        text = pipeline.read_text()
        assert old in text, f"the example's pipeline file no longer has {old!r}"
        pipeline.write_text(text.replace(old, new))
    return change


def link_to_etc_as_agent_context(root: Path) -> None:
    """A committed symlink in the repository that points at the worker's /etc."""
    (root / "agents/weather/etc").symlink_to("/etc")
    replace("context: agents/weather/agent", "context: agents/weather/etc")(root)


def write_binary_file(root: Path) -> None:
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00 not text")


def write_lone_exclamation_in_the_mcp_ignore_file(root: Path) -> None:
    (root / MCP_CONTEXT.strip("'") / ".dockerignore").write_text("tests/\n!\n")


def unchanged(root: Path) -> None:
    pass


def the_pipeline_file(root: Path) -> Path:
    return root / PIPELINE_FILE


@dataclass(frozen=True)
class BadInput:
    expected: str
    """What follows `error: ` on stderr; `{file}` stands for the pipeline file as given."""
    change: Callable[[Path], None] = unchanged
    pipeline: Callable[[Path], Path] = the_pipeline_file
    argv: tuple[str, ...] = ()


def case(name: str, expected: str, **bad_input):
    return pytest.param(BadInput(expected, **bad_input), id=name)


MCP_CONTEXT = "'agents/weather/mcp-servers/weather-mcp-server'"
CASES = [
    case("yaml-syntax-error", "{file}: not valid YAML", change=replace("components:\n", "components:\n  - [\n")),
    case("pipeline-file-not-text", "{file}: not UTF-8 text", change=write_binary_file,
         pipeline=lambda root: root / "binary.yaml"),
    case("pipeline-file-a-list", "{file}: expected a mapping at the top level",
         change=lambda root: (root / PIPELINE_FILE).write_text("- weather-mcp\n")),
    case("pipeline-file-missing", "{file}: no such file", pipeline=lambda root: root / "pipeline.yaml"),
    case("pipeline-file-a-directory", "{file}: cannot read it: Is a directory",
         pipeline=lambda root: root / "manifests"),
    case("missing-required-key", "aws.region: Field required", change=replace("region: us-west-2, ", "")),
    case("unknown-key", "regsitry: unknown key",
         change=replace("registry: ", "regsitry: 123456789012.dkr.ecr.us-west-2.amazonaws.com\nregistry: ")),
    case("wrong-type", "aws.presign_ttl_seconds: Input should be a valid integer",
         change=replace("prefix: build/}", "prefix: build/, presign_ttl_seconds: 15 minutes}")),
    case("finished-job-deleted-at-once",
         "build.ttl_seconds_after_finished: 0 is too short: once the Job ends the flow still reads its Pod's "
         "termination message",
         change=replace("mode: privileged}", "mode: privileged, ttl_seconds_after_finished: 0}")),
    case("finished-job-deleted-too-soon", "build.ttl_seconds_after_finished: 299 is too short",
         change=replace("mode: privileged}", "mode: privileged, ttl_seconds_after_finished: 299}")),
    case("registry-host-with-a-space",
         "registry: 'my registry.dkr.ecr.us-west-2.amazonaws.com' must be a registry host",
         change=replace("registry: 123456789012.dkr", "registry: my registry.dkr")),
    case("registry-host-with-a-scheme",
         "registry: 'https://123456789012.dkr.ecr.us-west-2.amazonaws.com' must be a registry host",
         change=replace("registry: 123456789012.dkr", "registry: https://123456789012.dkr")),
    case("context-escaping-the-repo", "components[1].context: '../..' is outside the repository",
         change=replace("context: agents/weather/agent", "context: ../..")),
    case("context-symlink-escaping-the-repo", "components[1].context: 'agents/weather/etc' is outside the repository",
         change=link_to_etc_as_agent_context),
    case("dockerfile-escaping-the-repo", f"components[0].dockerfile: '{OUTSIDE}' is outside the repository",
         change=replace("dockerfile: Dockerfile", f"dockerfile: {OUTSIDE}")),
    case("missing-context-dir", "components[1].context: no such directory 'agents/weather/agnet'",
         change=replace("context: agents/weather/agent", "context: agents/weather/agnet")),
    case("dockerignore-lone-exclamation",
         f"components[0].context: {MCP_CONTEXT.strip(chr(39))}/.dockerignore: line 2: pattern '!': "
         'illegal exclusion pattern: "!"',
         change=write_lone_exclamation_in_the_mcp_ignore_file),
    case("missing-dockerfile", f"components[0].dockerfile: no such file 'Dockerfile.prod' in {MCP_CONTEXT}",
         change=replace("dockerfile: Dockerfile", "dockerfile: Dockerfile.prod")),
    case("duplicate-component-names", "components[1].name: 'weather-mcp' is already the name of components[0]",
         change=replace("- name: weather-agent", "- name: weather-mcp")),
    case("after-an-unknown-release", "components[1].release.after: no release named 'weather-db'",
         change=replace("after: [weather-mcp]", "after: [weather-db]")),
    case("after-cycle",
         "components[0].release.after: release order has a cycle: weather-mcp -> weather-agent -> weather-mcp",
         change=replace("namespace: mcp-servers", "after: [weather-agent], namespace: mcp-servers")),
    case("remote-chart-without-version",
         "components[0].release: chart 'oci://ghcr.io/example/charts/mcp' is not in the repository: "
         "pin it with `version`",
         change=replace("chart: manifests/helm/mcp,", "chart: oci://ghcr.io/example/charts/mcp,")),
    case("unknown-component", "components: no component named 'weather-db'",
         argv=("--components", "weather-mcp,weather-db")),
    case("unknown-ref", "cannot fetch ref 'v9.9.9'", argv=("--ref", "v9.9.9")),
    case("ref-is-a-git-option", "ref '--upload-pack=touch /tmp/x' is not a branch, tag or commit SHA: "
         "it starts with '-'", argv=("--ref=--upload-pack=touch /tmp/x",)),
    case("source-ref-not-a-ref-name", "source.ref: 'main..v2' is not a branch, tag or commit SHA: it contains '..'",
         change=replace("ref: main", "ref: main..v2")),
]


@pytest.fixture
def aws_is_the_sandbox(sandbox, monkeypatch):
    """`run` without --sandbox uses the default AWS chain: point it at moto, so anything uploaded would show."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", sandbox.aws.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "sandbox-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sandbox-secret-key")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def exit_code(argv: list[str]) -> int:
    """What the console script exits with: `main`'s return value, or argparse's own exit."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def cluster_writes(sandbox, app, first_request: int) -> list[str]:
    namespaces = {app.config.build.namespace, *(c.release.namespace for c in app.config.components if c.release)}
    return [f"{r.method} {r.path}" for r in sandbox.kube.requests[first_request:]
            if r.verb in WRITES and (r.namespace in namespaces or r.resource == "namespaces")]


def bucket_keys(sandbox, app) -> list[str]:
    s3 = sandbox.aws.client("s3", app.config.aws.region)
    return [o["Key"] for o in s3.list_objects_v2(Bucket=app.config.aws.bucket).get("Contents", [])]


def flow_runs_for(root: Path, since: datetime) -> list[str]:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            expected_start_time=FlowRunFilterExpectedStartTime(after_=since)))
    return [run.name for run in runs if str(run.parameters.get("config", "")).startswith(str(root))]


def command_argv(command: str, pipeline: Path, sandbox) -> list[str]:
    if command == "plan":
        return ["plan", "--config", str(pipeline), "--json"]
    return ["run", "--config", str(pipeline), "--kubeconfig", str(sandbox.kubeconfig)]


@pytest.mark.parametrize("command", ["plan", "run"])
@pytest.mark.parametrize("bad", CASES)
def test_bad_input_exits_2_naming_the_problem_and_creates_nothing(
    prefect_server, sandbox, example_app, aws_is_the_sandbox, capsys, command: str, bad: BadInput
):
    root = example_app.root
    bad.change(root)
    commit_all(root, "Bad input")
    pipeline = bad.pipeline(root)
    first_request, started = len(sandbox.kube.requests), datetime.now(timezone.utc)

    code = exit_code([*command_argv(command, pipeline, sandbox), *bad.argv])

    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert f"error: {bad.expected.format(file=pipeline)}" in err
    assert "Traceback" not in err
    assert bucket_keys(sandbox, example_app) == []
    assert cluster_writes(sandbox, example_app, first_request) == []
    assert flow_runs_for(root, started) == []


@pytest.mark.parametrize(("params", "error", "expected"), [
    pytest.param({"max_parallel_builds": 0}, ParameterTypeError,
                 "max_parallel_builds: Input should be greater than or equal to 1", id="max-parallel-builds-0"),
    pytest.param({"max_parallel_builds": "four"}, ParameterTypeError,
                 "max_parallel_builds: Input should be a valid integer", id="max-parallel-builds-not-a-number"),
    pytest.param({"components": ["weather-db"]}, ValueError, "components: no component named 'weather-db'",
                 id="unknown-component"),
])
def test_a_bad_flow_parameter_fails_the_run_naming_it_and_creates_nothing(
    prefect_server, sandbox, example_app, params, error, expected
):
    """What a deployment run from the UI or a script gets: the CLI has no flag for max_parallel_builds."""
    first_request = len(sandbox.kube.requests)

    state = example_app.run(**params)

    assert state.is_failed()
    assert expected in state.message
    assert isinstance(state.result(raise_on_failure=False), error)
    assert bucket_keys(sandbox, example_app) == []
    assert cluster_writes(sandbox, example_app, first_request) == []
