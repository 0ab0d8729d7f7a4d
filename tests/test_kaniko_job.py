"""The Kaniko Job: a manifest Kubernetes accepts, unprivileged, with the flags the executor needs to build our archive."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest

from flows.build import BuildRequest, SecretFile, image_ref, job_name
from flows.builders import job_manifest
from flows.config import BuildSpec, ConfigError, parse_config
from tests.conftest import every_key
from tests.test_build_job import ARCHIVE, REPOSITORY, container
from tests.test_build_job import request as buildkit_request

URL = buildkit_request().context_url


def request(**overrides) -> BuildRequest:
    """The BuildKit tests' request, for Kaniko: its Job name, and `latest` among the tags."""
    fields = dict(
        name="kn-weather-mcp-abababab-12345678",
        builder="kaniko",
        image=image_ref(REPOSITORY, "c" * 40, ARCHIVE.sha256, latest=True),
        registry_secret="kn-weather-mcp-abababab-12345678-registry",
    )
    return buildkit_request(**{**fields, **overrides})


VARIANTS = {
    "default": {},
    "no-cache": {"cache_repository": None},
    "one-platform-target-args": {"platforms": ["linux/arm64"], "target": "runtime", "build_args": {"A": "1"}},
    "scheduling": {"settings": BuildSpec(node_selector={"kubernetes.io/arch": "arm64"}, ttl_seconds_after_finished=600,
                                         tolerations=[{"key": "builds", "operator": "Exists"}])},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_kaniko_job_validates_and_carries_no_privileged_flag(variant):
    job = job_manifest(request(**VARIANTS[variant]))
    kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)
    assert "privileged" not in every_key(job)
    assert "securityContext" not in container(job) and "securityContext" not in job["spec"]["template"]["spec"]
    assert job["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert job["spec"]["backoffLimit"] == 1
    assert job["spec"]["podFailurePolicy"]["rules"][1]["onExitCodes"]["containerName"] == "kaniko"


def test_the_executor_reads_the_archive_layout_and_reports_the_digest_through_the_termination_message():
    spec = container(job_manifest(request()))
    assert spec["name"] == "kaniko" and "command" not in spec
    assert spec["image"] == "ghcr.io/osscontainertools/kaniko:v1.28.3"
    args = spec["args"]
    assert args[:3] == ["--context=$(CONTEXT_URL)", "--context-sub-path=context",
                        "--dockerfile=/kaniko/buildcontext/Dockerfile"]
    assert URL not in json.dumps(spec), "the presigned URL is in the registry Secret, not in the Job"
    assert {"name": "CONTEXT_URL", "valueFrom": {"secretKeyRef": {"name": request().registry_secret,
                                                                  "key": "context-url"}}} in spec["env"]
    assert [a for a in args if a.startswith("--destination=")] == [
        f"--destination={REPOSITORY}:cccccccccccc", f"--destination={REPOSITORY}:ctx-abababababab",
        f"--destination={REPOSITORY}:latest"]
    assert "--digest-file=/dev/termination-log" in args
    assert spec["terminationMessagePath"] == "/dev/termination-log"
    assert {"--cache=true", f"--cache-repo={REPOSITORY}", "--log-format=text"} <= set(args)
    assert "--label=org.opencontainers.image.revision=" + "c" * 40 in args


def test_the_registry_secret_is_mounted_where_kaniko_reads_it():
    job = job_manifest(request())
    spec = container(job)
    assert {"name": "DOCKER_CONFIG", "value": "/kaniko/.docker"} in spec["env"]
    assert spec["volumeMounts"] == [{"name": "docker-config", "mountPath": "/kaniko/.docker", "readOnly": True}]
    assert job["spec"]["template"]["spec"]["volumes"] == [{"name": "docker-config", "secret": {
        "secretName": "kn-weather-mcp-abababab-12345678-registry",
        "items": [{"key": ".dockerconfigjson", "path": "config.json"}]}}]


def test_no_cache_leaves_the_cache_out_and_options_reach_the_executor():
    args = container(job_manifest(request(no_cache=True)))["args"]
    assert not [a for a in args if a.startswith("--cache")]
    job = job_manifest(request(**VARIANTS["one-platform-target-args"]))
    assert {"--custom-platform=linux/arm64", "--target=runtime", "--build-arg=A=1"} <= set(container(job)["args"])
    assert job["spec"]["template"]["spec"]["nodeSelector"] == {"kubernetes.io/arch": "arm64"}
    assert "nodeSelector" not in job_manifest(request())["spec"]["template"]["spec"]


def test_what_kaniko_cannot_do_is_refused_before_a_job_exists():
    with pytest.raises(ValueError, match="Kaniko cannot mount build secrets"):
        job_manifest(request(secrets=[SecretFile(id="pip", secret_name="pip", key="token")]))
    with pytest.raises(ValueError, match="several platforms"):
        job_manifest(request(platforms=["linux/amd64", "linux/arm64"]))


def pipeline(**build) -> dict:
    return {
        "source": {"repo": "."},
        "registry": "123456789012.dkr.ecr.us-west-2.amazonaws.com",
        "aws": {"region": "us-west-2", "bucket": "contexts"},
        "build": build,
        "components": [
            {"name": "mcp", "context": "mcp", "image": "agents/mcp", "platforms": ["linux/amd64", "linux/arm64"]},
            {"name": "agent", "context": "agent", "image": "agents/agent", "builder": "kaniko",
             "secrets": [{"id": "pip", "kubernetes": {"name": "pip", "key": "token"}}]},
        ],
    }


def test_the_pipeline_file_chooses_the_builder_per_pipeline_and_per_component():
    with pytest.raises(ConfigError) as raised:
        parse_config(pipeline())
    assert raised.value.problems == [
        "components[1].secrets: Kaniko cannot mount build secrets (RUN --mount=type=secret); "
        "build this component with buildkit"]
    document = pipeline(builder="kaniko")
    document["components"][1]["builder"] = "buildkit"
    with pytest.raises(ConfigError) as raised:
        parse_config(document)
    assert raised.value.problems == [
        "components[0].platforms: Kaniko builds one platform per Job; build a multi-platform image with buildkit"]
    document["components"][0]["platforms"] = ["linux/arm64"]
    config = parse_config(document)
    assert [config.builder_of(c) for c in config.components] == ["kaniko", "buildkit"]
    with pytest.raises(ConfigError, match=r"build.kaniko_image: .*never latest"):
        parse_config(pipeline(kaniko_image="ghcr.io/osscontainertools/kaniko:latest"))


def test_a_component_built_by_both_builders_gets_two_jobs():
    assert job_name("weather-mcp", "ab" * 32, "1234-5678") == "bk-weather-mcp-abababab-12345678"
    assert job_name("weather-mcp", "ab" * 32, "1234-5678", "kaniko") == "kn-weather-mcp-abababab-12345678"
    assert len(job_name("x" * 80, "ab" * 32, "1234-5678", "kaniko")) == 63


def test_plan_json_shows_the_kaniko_job_when_that_builder_is_chosen(tmp_path, capsys):
    from flows.cli import main
    from sandbox.example import create_example_repo

    pipeline_file = create_example_repo(tmp_path / "app")
    pipeline_file.write_text(pipeline_file.read_text().replace("mode: privileged", "builder: kaniko"))
    assert main(["plan", "--config", str(pipeline_file), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    for component in plan["components"]:
        assert component["builder"] == "kaniko"
        job = component["job"]
        assert job["metadata"]["name"].startswith("kn-")
        assert container(job)["image"] == "ghcr.io/osscontainertools/kaniko:v1.28.3"
        assert "--context=$(CONTEXT_URL)" in container(job)["args"]
        assert "privileged" not in every_key(job)
        kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)
