"""`compare-builders`: one commit built by BuildKit and by Kaniko, tabulated, nothing deployed."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

from flows.cli import main
from flows.compare import compare_builders
from sandbox.example import commit_all
from tests.conftest import jobs
from tests.test_task_names import task_run_names


def comparison_artifact(flow_run_id) -> list[dict]:
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["builder-comparison"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        )
    return json.loads(artifact.data)


def test_every_component_is_built_by_both_builders_one_after_the_other_and_compared(
        prefect_server, sandbox, example_app, monkeypatch):
    app = example_app
    names = [c.name for c in app.config.components]
    repositories = {c.name: app.config.image_repository(c) for c in app.config.components}
    for repository in repositories.values():
        monkeypatch.setitem(sandbox.buildkit.build_seconds, repository, 2.0)
        monkeypatch.setitem(sandbox.kaniko.build_seconds, repository, 4.0)

    # Without the registry cache, which earlier tests may have filled: every build takes its simulated time.
    with app.connected():
        state = asyncio.run(compare_builders(config=str(app.pipeline_file), no_cache=True, return_state=True))
    comparison = state.result()

    rows = comparison_artifact(state.state_details.flow_run_id)
    assert [(r["component"], r["builder"]) for r in rows] == [(n, b) for n in names for b in ("buildkit", "kaniko")]
    commit12 = comparison.commit[:12]
    ecr = sandbox.aws.client("ecr", app.config.aws.region)
    for row in rows:
        repository = repositories[row["component"]].split("/", 1)[1]
        [pushed] = ecr.describe_images(repositoryName=repository,
                                       imageIds=[{"imageTag": f"{commit12}-{row['builder']}"}])["imageDetails"]
        assert row["digest"] == pushed["imageDigest"]
        assert row["size_mb"] == round(pushed["imageSizeInBytes"] / 1e6, 1) and row["size_mb"] > 0
        manifest = json.loads(ecr.batch_get_image(repositoryName=repository, imageIds=[{"imageDigest": row["digest"]}])
                              ["images"][0]["imageManifest"])
        assert row["layers"] == len(manifest["layers"]) > 0
        assert row["build_s"] > (2.0 if row["builder"] == "buildkit" else 4.0)
        assert row["error"] == ""
    for name in names:
        buildkit, kaniko = (r for r in rows if r["component"] == name)
        assert buildkit["digest"] != kaniko["digest"]
        assert buildkit["buildkit_vs_kaniko"] == kaniko["buildkit_vs_kaniko"] == round(
            buildkit["build_s"] / kaniko["build_s"], 2)
        # 2 s against 4 s of simulated build, plus the same Job and log overhead on both: under 1, whatever the load
        assert 0 < buildkit["buildkit_vs_kaniko"] < 1
        with pytest.raises(ecr.exceptions.ImageNotFoundException):
            ecr.describe_images(repositoryName=repositories[name].split("/", 1)[1], imageIds=[{"imageTag": commit12}])

    built = {job["metadata"]["name"][:3] + job["metadata"]["labels"]["buildkit-pipeline/component"]: job
             for job in jobs(sandbox, app)}
    assert sorted(built) == sorted(f"{prefix}{n}" for n in names for prefix in ("bk-", "kn-"))
    for name in names:
        kaniko_pod = built[f"kn-{name}"]["spec"]["template"]["spec"]
        assert "privileged" not in json.dumps(kaniko_pod)
        buildkit_run = next(b for b in sandbox.buildkit.builds if b["pod"].startswith(built[f"bk-{name}"]["metadata"]["name"]))
        kaniko_run = next(b for b in sandbox.kaniko.builds if b["pod"].startswith(built[f"kn-{name}"]["metadata"]["name"]))
        assert kaniko_run["started"] >= buildkit_run["ended"], f"{name}: the two builders ran at the same time"

    for release in (c.release for c in app.config.components if c.release):
        assert sandbox.kube.get("deployments", release.namespace, release.name) is None
    assert not sandbox.kube.list("secrets", app.config.build.namespace)

    expected = Counter(["source (the pipeline file's ref)"] + [f"package {n}" for n in names] + [
        name for n in names for b in ("buildkit", "kaniko")
        for name in (f"upload {n}", f"registry-auth {n}", f"build {n} ({b})", f"image-facts {n} ({b})")])
    assert task_run_names(state.state_details.flow_run_id, sum(expected.values())) == expected


def test_a_component_kaniko_cannot_build_is_refused_before_a_flow_run(example_app, sandbox, capsys):
    app = example_app
    text = app.pipeline_file.read_text()
    app.pipeline_file.write_text(text.replace(
        "  - name: weather-agent\n",
        "  - name: weather-agent\n    secrets: [{id: pip, kubernetes: {name: pip, key: token}}]\n"))
    commit_all(app.root, "A build secret")
    assert main(["compare", "--config", str(app.pipeline_file), "--components", "weather-agent"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: components[1].secrets: Kaniko cannot mount build secrets (RUN --mount=type=secret); "
        "build this component with buildkit"]
    assert jobs(sandbox, app) == []


def test_a_component_built_by_kaniko_is_deployed_pinned_to_the_digest_kaniko_pushed(prefect_server, sandbox,
                                                                                     example_app):
    app = example_app
    app.pipeline_file.write_text(app.pipeline_file.read_text().replace(
        "    image: agents-on-eks/weather-mcp\n", "    image: agents-on-eks/weather-mcp\n    builder: kaniko\n"))
    commit_all(app.root, "The MCP server built by Kaniko")

    result = app.run().result()

    mcp, agent = (next(c for c in result.components if c.name == name) for name in ("weather-mcp", "weather-agent"))
    assert (mcp.builder, agent.builder) == ("kaniko", "buildkit")
    [kaniko_build] = [b for b in sandbox.kaniko.builds if b["pod"].startswith(mcp.image.job)]
    assert mcp.image.job.startswith("kn-") and kaniko_build["digest"] == mcp.image.digest
    release = app.config.component("weather-mcp").release
    deployment = sandbox.kube.get("deployments", release.namespace, release.name)
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == (
        f"{app.config.image_repository(app.config.component('weather-mcp'))}:{result.commit[:12]}@{mcp.image.digest}")
    assert [step["step"] for step in mcp.steps] == [
        "WORKDIR /app", "COPY requirements.txt .", "RUN pip install --no-cache-dir -r requirements.txt", "COPY . .",
        "EXPOSE 8080", "USER 1000", 'CMD ["python", "server.py"]']
    assert mcp.cache_hits == (0, 1)
