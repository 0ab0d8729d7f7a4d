"""Operating safely under Prefect: what a deployment's run form offers, and what a run from it can reach.

Whoever may press Run fills in the parameters but does not own the worker. The form explains every parameter
and offers no connection settings (those come from a target block); a `ref` cannot become a git option, a
`config` cannot name a file outside the deployment's folder, and a token in the repository URL stays out of
the build Job, the run's logs and its errors. Every run here goes the user's way: a served deployment, or the
flow against the sandbox.
"""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from flows.config import ConfigError, load_config
from flows.source import ref_problem
from sandbox.example import commit_all
from sandbox.githttp import GitHost
from tests.operating import serving
from tests.test_security import exception_chain_text, run_artifacts, run_jobs, run_logs, task_run_messages

DEPLOYMENTS = ("build-and-deploy/on-demand", "build-and-deploy/nightly", "compare-builders/compare")
MCP = "weather-mcp"


def run_served(name: str, **parameters):
    """A run of a served deployment, as the UI's Run button or `prefect deployment run` starts it; when it ended."""
    return run_deployment(name, parameters=parameters, timeout=240, poll_interval=1, as_subflow=False)


@pytest.fixture(scope="module")
def served(prefect_server, example_app_in, tmp_path_factory):
    """The example app's deployments, served by one process for this module: no test here changes what it serves
    (their runs fail before any build, or are dry runs)."""
    with serving(example_app_in(tmp_path_factory.mktemp("served"))) as app:
        yield app


def undescribed(schema: dict) -> list[str]:
    return [name for name, spec in schema["properties"].items() if not (spec.get("description") or "").strip()]


def test_the_run_form_explains_every_parameter_and_offers_no_connection_settings(served):
    with get_client(sync_client=True) as client:
        schemas = {name: client.read_deployment_by_name(name).parameter_openapi_schema for name in DEPLOYMENTS}

    for name, schema in schemas.items():
        assert not {"aws_credentials", "kubeconfig"} & set(schema["properties"]), name
        assert "AwsCredentials" not in json.dumps(schema), name
        assert undescribed(schema) == [], name
    assert set(schemas["build-and-deploy/on-demand"]["properties"]) == {
        "config", "components", "ref", "skip_unchanged", "no_cache", "deploy", "dry_run", "max_parallel_builds",
        "target"}


def test_a_ref_that_is_a_git_option_runs_nothing_on_the_worker(served, sandbox, tmp_path):
    marker = tmp_path / "upload-pack-ran"
    ref = f"--upload-pack=touch {marker}"

    run = run_served("build-and-deploy/on-demand", ref=ref)

    assert not marker.exists(), "git ran the ref as its upload-pack command"
    assert run.state.is_failed()
    assert f"ref {ref!r} is not a branch, tag or commit SHA: it starts with '-'" in run.state.message
    assert run_jobs(sandbox, served.config.build.namespace, run.id) == []


@pytest.mark.timeout(600)  # four runs of a served deployment, each a new process
def test_a_config_outside_the_deployments_folder_is_refused_without_reading_it(served, tmp_path):
    secret_file = tmp_path / "worker-secret.yaml"
    secret_file.write_text("password: hunter2-worker-secret\n  region: [\n")
    relative_escape = "../../x"
    folder = served.pipeline_file.parent.resolve()

    for config in ("/etc/passwd", str(secret_file), relative_escape):
        run = run_served("build-and-deploy/on-demand", config=config)

        assert run.state.is_failed(), config
        assert f"config: {config!r} is outside {folder}" in run.state.message
        told = run.state.message + "\n".join(run_logs(run.id))
        assert "hunter2-worker-secret" not in told
        assert "root:x:0:0" not in told

    inside = run_served("build-and-deploy/on-demand", config=served.pipeline_file.name, dry_run=True)
    assert inside.state.is_completed(), inside.state.message


@pytest.mark.parametrize("ref", [
    "main", "v1.4.0", "release/2025-06", "refs/heads/main", "HEAD", "+main", "ünïcode", "a.lock.x", "x" * 40,
    "@", "a..b", "a@{1}", "a b", "main~1", "main^", "a:b", "a?", "a*", "a[b", "a\\b", "/main", "main/", "a//b",
    ".hidden", "a/.b", "main.lock", "a/b.lock/c", "main.", "a\x01b", "a\x7fb",
])
def test_ref_names_are_checked_as_git_check_ref_format_does(ref):
    """git's own `check-ref-format --allow-onelevel` is the oracle for every name that is not an option."""
    accepted = subprocess.run(["git", "check-ref-format", "--allow-onelevel", ref], capture_output=True).returncode == 0
    assert (ref_problem(ref) is None) == accepted, ref_problem(ref)


@pytest.mark.parametrize("ref", ["-", "--upload-pack=touch /tmp/x", "--help", "-c"])
def test_a_ref_starting_with_a_dash_is_refused(ref):
    assert ref_problem(ref) == "starts with '-'"


def test_a_yaml_error_names_the_place_without_quoting_the_file(tmp_path):
    not_a_pipeline = tmp_path / "notes.yaml"
    not_a_pipeline.write_text("db_password: hunter2-in-a-file\n  oops: [\n")

    with pytest.raises(ConfigError) as refused:
        load_config(not_a_pipeline)

    [problem] = refused.value.problems
    assert problem == f"{not_a_pipeline}: not valid YAML: mapping values are not allowed here at line 2, column 7"
    assert "hunter2" not in problem


@pytest.fixture(scope="session")
def git_host(tmp_path_factory):
    """A git host serving repositories over HTTP on 127.0.0.1 (sandbox/githttp.py: git's own http-backend)."""
    with GitHost(tmp_path_factory.mktemp("git-host")) as host:
        yield host


def test_a_token_in_the_repository_url_stays_out_of_the_job_the_logs_and_the_errors(
    prefect_server, sandbox, example_app, git_host
):
    app, token = example_app, f"ghp_{uuid.uuid4().hex}"
    hosted = git_host.root / f"app-{uuid.uuid4().hex[:8]}.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(app.root), str(hosted)], check=True)
    git_host.export(hosted)
    url = git_host.url(hosted.name, userinfo=token)
    app.pipeline_file.write_text(app.pipeline_file.read_text().replace("repo: .", f"repo: '{url}'"))
    commit_all(app.root, "Fetch the source from the git host")
    public = git_host.url(hosted.name)

    built = app.run(components=[MCP], deploy=False)
    failed = app.run(components=[MCP], deploy=False, ref="no-such-branch")

    assert built.is_completed(), built.message
    [job] = run_jobs(sandbox, app.config.build.namespace, built.state_details.flow_run_id)
    assert f"org.opencontainers.image.source={public}" in json.dumps(job)
    assert token not in json.dumps(job)
    assert failed.is_failed()
    assert f"cannot fetch ref 'no-such-branch' from {public}" in failed.message
    error = failed.result(raise_on_failure=False)
    told = {
        "the Job": json.dumps(job),
        "the successful run's logs": "\n".join(run_logs(built.state_details.flow_run_id)),
        "its artifacts": "\n".join(run_artifacts(built.state_details.flow_run_id)),
        "the failed run's state message": failed.message,
        "its exception": exception_chain_text(error),
        "its task runs": "\n".join(task_run_messages(failed.state_details.flow_run_id)),
        "its logs": "\n".join(run_logs(failed.state_details.flow_run_id)),
    }
    assert [where for where, text in told.items() if token in text] == []
    assert any(request.path.startswith(f"/{hosted.name}/") for request in git_host.requests)
