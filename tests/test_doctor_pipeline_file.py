"""doctor's pipeline-file checks against the example app: pinned builder images, charts that render, values files."""

from __future__ import annotations

import asyncio

import pytest

from flows.config import ConfigError
from flows.doctor.flow import check_target
from sandbox.example import commit_all


def doctor(app, **kwargs) -> dict:
    findings = asyncio.run(check_target(app.pipeline_file, **app.flow_kwargs, **kwargs))
    return {f.check: f for f in findings if f.check.startswith("pipeline.")}


def edit(app, old: str, new: str) -> None:
    text = app.pipeline_file.read_text()
    assert old in text
    app.pipeline_file.write_text(text.replace(old, new))


def test_the_example_app_passes_every_pipeline_check(prefect_server, example_app):
    found = doctor(example_app)
    assert [f.status for f in found.values()] == ["pass", "pass", "pass"], found
    assert "moby/buildkit:v0.31.2 (release tag)" in found["pipeline.images-pinned"].found
    assert "1 values file(s)" in found["pipeline.values"].found
    assert "2 chart(s) render" in found["pipeline.charts"].found


def test_a_moving_builder_tag_fails_with_the_release_to_pin(prefect_server, example_app):
    edit(example_app, "image: moby/buildkit:v0.31.2", "image: moby/buildkit:master")
    finding = doctor(example_app)["pipeline.images-pinned"]
    assert finding.status == "fail"
    assert "build.image moby/buildkit:master has a tag its publisher moves" in finding.found
    assert "build.image: moby/buildkit:v0.31.2" in finding.fix


def test_a_tag_that_is_no_release_version_warns_and_a_digest_passes(prefect_server, example_app):
    edit(example_app, "image: moby/buildkit:v0.31.2", "image: mirror.example.com/buildkit:ours")
    finding = doctor(example_app)["pipeline.images-pinned"]
    assert (finding.status, finding.fix.splitlines()[1]) == (
        "warn", "build.image: moby/buildkit:v0.31.2   # or moby/buildkit:v0.31.2@sha256:<digest>")
    digest = "sha256:" + "ab" * 32
    edit(example_app, "image: mirror.example.com/buildkit:ours", f"image: moby/buildkit:v0.31.2@{digest}")
    finding = doctor(example_app)["pipeline.images-pinned"]
    assert finding.status == "pass" and "(digest)" in finding.found


def test_latest_is_refused_as_bad_input_before_any_check(prefect_server, example_app):
    edit(example_app, "image: moby/buildkit:v0.31.2", "image: moby/buildkit:latest")
    with pytest.raises(ConfigError, match=r"build\.image: 'moby/buildkit:latest' must be pinned"):
        doctor(example_app)


def test_a_values_file_helm_cannot_read_fails_naming_its_key(prefect_server, example_app):
    values = example_app.root / "manifests/helm/values/weather-agent.yaml"
    values.write_text("- mcpServerUrl\n- http://x\n")
    commit_all(example_app.root, "values as a list")
    found = doctor(example_app)
    assert found["pipeline.values"].status == "fail"
    assert found["pipeline.values"].found.startswith("components[1].release.values[0]: "
                                                     "manifests/helm/values/weather-agent.yaml: helm reads")
    assert "components[1].release.values[0]" in found["pipeline.values"].fix
    # helm refuses it too, and the chart check says which release
    assert found["pipeline.charts"].status == "fail"
    assert "components[1].release (weather-agent" in found["pipeline.charts"].found
    values.write_text("mcpServerUrl: [unclosed\n")
    commit_all(example_app.root, "values not YAML")
    assert "not valid YAML" in doctor(example_app)["pipeline.values"].found


def test_a_missing_values_file_is_bad_input_naming_its_key(prefect_server, example_app):
    (example_app.root / "manifests/helm/values/weather-agent.yaml").unlink()
    commit_all(example_app.root, "no values")
    with pytest.raises(ConfigError, match=r"components\[1\]\.release\.values\[0\]: no such file"):
        doctor(example_app)


def test_a_chart_that_does_not_render_fails_with_helms_error_and_renders_with_set_and_secret_placeholders(
        prefect_server, example_app):
    required = example_app.root / "manifests/helm/agent/templates/required.yaml"
    required.write_text('# {{ required "apiKey is required" .Values.apiKey }}\n')
    commit_all(example_app.root, "a value the chart requires")
    finding = doctor(example_app)["pipeline.charts"]
    assert finding.status == "fail"
    assert "components[1].release (weather-agent, chart manifests/helm/agent) does not render" in finding.found
    assert "apiKey is required" in finding.found
    assert "helm template weather-agent manifests/helm/agent --namespace agents" in finding.fix
    assert "--values manifests/helm/values/weather-agent.yaml" in finding.fix

    edit(example_app, "      after: [weather-mcp]", "      after: [weather-mcp]\n      set: {apiKey: x}")
    assert doctor(example_app)["pipeline.charts"].status == "pass"
    # a secret value renders with a placeholder: the Prefect Secret block it names is never read (none exists)
    edit(example_app, "set: {apiKey: x}", "set_secret: {apiKey: no-such-secret-block}")
    assert doctor(example_app)["pipeline.charts"].status == "pass"
