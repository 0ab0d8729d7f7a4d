"""The build context end to end: which commit, which files, and that nothing remote happens for a bad one."""

from __future__ import annotations

import calendar
import json
import os
import time
from urllib.parse import parse_qs, urlsplit

import git
import pytest

from flows.cli import main
from flows.config import ConfigError
from sandbox.example import commit_all, create_example_repo
from tests.test_security import context_url

MCP_CONTEXT = "agents/weather/mcp-servers/weather-mcp-server"


def plan(pipeline_file, capsys, *extra) -> dict:
    assert main(["plan", "--config", str(pipeline_file), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def mcp(document: dict) -> dict:
    return next(c for c in document["components"] if c["name"] == "weather-mcp")


def build_args(component: dict) -> list[str]:
    return component["job"]["spec"]["template"]["spec"]["containers"][0]["args"]


def test_uncommitted_changes_are_built_and_marked_dirty(tmp_path, capsys):
    pipeline_file = create_example_repo(tmp_path / "app")
    clean = plan(pipeline_file, capsys, "--list-files")
    assert clean["source"]["dirty"] is False
    (pipeline_file.parent / MCP_CONTEXT / "extra.py").write_text("print('not committed yet')\n")

    dirty = plan(pipeline_file, capsys, "--list-files")

    assert dirty["source"]["dirty"] is True
    assert dirty["commit"] == clean["commit"]
    assert "context/extra.py" in mcp(dirty)["archive"]["paths"]
    assert "context/extra.py" not in mcp(clean)["archive"]["paths"]
    assert mcp(dirty)["image"]["tags"][0] == f"{clean['commit'][:12]}-dirty"
    assert "label:dev.buildkit-pipeline.dirty=true" in build_args(mcp(dirty))
    assert "label:dev.buildkit-pipeline.dirty=false" in build_args(mcp(clean))
    assert f"label:org.opencontainers.image.revision={clean['commit']}" in build_args(mcp(clean))
    assert mcp(dirty)["job"]["metadata"]["labels"]["buildkit-pipeline/dirty"] == "true"


def test_a_tag_or_an_older_commit_is_checked_out_exactly(tmp_path, capsys):
    pipeline_file = create_example_repo(tmp_path / "app")
    repo = git.Repo(pipeline_file.parent)
    first = repo.head.commit.hexsha
    repo.create_tag("v1.0")
    (pipeline_file.parent / MCP_CONTEXT / "server.py").write_text("print('v2')\n")
    second = commit_all(repo, "v2")

    assert plan(pipeline_file, capsys)["commit"] == second
    assert plan(pipeline_file, capsys, "--ref", "v1.0")["commit"] == first
    at_sha = plan(pipeline_file, capsys, "--ref", first, "--list-files")
    assert at_sha["commit"] == first and at_sha["source"]["dirty"] is False


def test_a_remote_repository_is_fetched_shallow_into_the_cache(tmp_path, capsys):
    app = create_example_repo(tmp_path / "app").parent
    for n in range(3):
        (app / "NOTES").write_text(f"note {n}\n")
        commit_all(app, f"note {n}")
    remote = tmp_path / "remote.git"
    git.Repo.clone_from(app, remote, bare=True)
    pipeline_file = tmp_path / "pipeline.yaml"
    pipeline_file.write_text((app / "buildkit-pipeline.yaml").read_text().replace(
        "repo: .", f"repo: {remote.as_uri()}"))
    document = plan(pipeline_file, capsys)

    assert document["commit"] == git.Repo(remote).head.commit.hexsha
    cache = os.environ["BUILDKIT_PIPELINE_CACHE"]
    clones = [d for d in (tmp_path.parent / cache).glob("sources/*/repo") if git.Repo(d).remotes.origin.url == remote.as_uri()]
    [clone] = clones
    assert len(list(git.Repo(clone).iter_commits(document["commit"]))) == 1, "the fetch was not shallow"


def test_an_unknown_ref_is_bad_input(tmp_path, capsys):
    pipeline_file = create_example_repo(tmp_path / "app")
    assert main(["plan", "--config", str(pipeline_file), "--ref", "no-such-branch"]) == 2
    assert "cannot fetch ref 'no-such-branch'" in capsys.readouterr().err


def _nothing_remote_happened(sandbox, app):
    s3 = sandbox.aws.client("s3", app.config.aws.region)
    assert s3.list_objects_v2(Bucket=app.config.aws.bucket).get("KeyCount", 0) == 0
    assert sandbox.kube.list("jobs", app.config.build.namespace) == []
    assert sandbox.kube.list("secrets", app.config.build.namespace) == []


def _run(app) -> Exception:
    state = app.run()
    with pytest.raises(ConfigError) as error:
        state.result()
    return error.value


def test_an_oversize_context_fails_naming_the_largest_paths_before_any_upload(prefect_server, sandbox, example_app):
    app = example_app
    (app.root / MCP_CONTEXT / "model.bin").write_bytes(os.urandom(300_000))
    text = app.pipeline_file.read_text().replace("mode: privileged}", "mode: privileged, max_context_bytes: 100000}")
    app.pipeline_file.write_text(text)
    commit_all(app.root, "A large file")

    error = _run(app)

    assert "components[0].context:" in str(error) and "model.bin" in str(error)
    _nothing_remote_happened(sandbox, app)


def test_a_symlink_out_of_the_context_fails_naming_it_before_any_upload(prefect_server, sandbox, example_app):
    app = example_app
    (app.root / MCP_CONTEXT / "secrets").symlink_to("/etc")
    commit_all(app.root, "A symlink out of the context")

    error = _run(app)

    assert "secrets" in str(error)
    _nothing_remote_happened(sandbox, app)


def test_the_context_is_stored_with_a_checksum_behind_a_short_lived_url(prefect_server, sandbox, example_app):
    app = example_app
    text = app.pipeline_file.read_text().replace("prefix: build/}", "prefix: build/, presign_ttl_seconds: 300}")
    app.pipeline_file.write_text(text)
    commit_all(app.root, "Five-minute URLs")
    started = time.time()
    state = app.run(deploy=False)
    result = state.result()

    component = next(c for c in result.components if c.name == "weather-mcp")
    s3 = sandbox.aws.client("s3", app.config.aws.region)
    key = f"build/weather-mcp/{component.archive_sha256}.tar.gz"
    head = s3.head_object(Bucket=app.config.aws.bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"]
    [job] = [j for j in sandbox.kube.list("jobs", app.config.build.namespace)
             if j["metadata"]["labels"]["buildkit-pipeline/component"] == "weather-mcp"]
    url = context_url(sandbox, job)
    query = {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}
    signed = calendar.timegm(time.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
    assert query["X-Amz-Expires"] == "300"
    assert int(started) <= signed <= time.time()


def test_plan_list_files_names_the_ignore_file_and_every_member(tmp_path, capsys):
    """`plan --list-files` shows what the archive holds; `Dockerfile.dockerignore` replaces `.dockerignore`."""
    pipeline_file = create_example_repo(tmp_path / "app")
    context = pipeline_file.parent / MCP_CONTEXT
    (context / "Dockerfile.dockerignore").write_text("requirements.txt\n")  # .dockerignore drops tests/

    document = plan(pipeline_file, capsys, "--list-files")
    assert main(["plan", "--config", str(pipeline_file), "--components", "weather-mcp", "--list-files"]) == 0
    text = capsys.readouterr().out

    archive = mcp(document)["archive"]
    assert archive["ignore_file"] == f"{MCP_CONTEXT}/Dockerfile.dockerignore"
    assert "context/requirements.txt" not in archive["paths"]
    assert "context/tests/test_server.py" in archive["paths"]
    assert f"ignore file {MCP_CONTEXT}/Dockerfile.dockerignore; archive members:" in text
    assert "    context/tests/test_server.py" in text and "    context/server.py" in text
