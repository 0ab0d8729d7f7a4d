"""Every Job manifest the project can produce is one Kubernetes accepts, with the flags BuildKit and ECR need."""

from __future__ import annotations

import kubernetes_validate
import pytest

from flows.build import BuildRequest, SecretFile, build_job_manifest, image_ref
from flows.config import BuildSpec, ResourcesSpec
from flows.package import PackagedContext

ARCHIVE = PackagedContext(path="/tmp/x.tar.gz", sha256="ab" * 32, bytes=10, files=1)
REPOSITORY = "123456789012.dkr.ecr.us-west-2.amazonaws.com/agents/weather-mcp"

VARIANTS = {
    "privileged": {},
    "rootless": {"settings": BuildSpec(mode="rootless")},
    "pvc-cache": {"settings": BuildSpec(state_volume_claim="buildkit-cache")},
    "multi-platform": {"platforms": ["linux/amd64", "linux/arm64"]},
    "secrets": {"secrets": [SecretFile(id="pip-token", secret_name="pip", key="token"),
                            SecretFile(id="npmrc", secret_name="bk-x-secrets", key="npmrc")]},
    "scheduling": {"settings": BuildSpec(node_selector={"kubernetes.io/arch": "arm64"},
                                         tolerations=[{"key": "builds", "operator": "Exists", "effect": "NoSchedule"}],
                                         resources=ResourcesSpec(requests={"cpu": "2"}, limits={"memory": "4Gi"}))},
    "no-cache": {"cache_repository": None},
    "target-and-args": {"target": "runtime", "build_args": {"PYTHON_VERSION": "3.12"}},
}


def request(**overrides) -> BuildRequest:
    fields = dict(
        name="bk-weather-mcp-abababab-12345678",
        settings=BuildSpec(),
        context_url="https://bucket.s3.amazonaws.com/build/x.tar.gz?X-Amz-Signature=abc",
        archive=ARCHIVE,
        image=image_ref(REPOSITORY, "c" * 40, ARCHIVE.sha256),
        registry_secret="bk-weather-mcp-abababab-12345678-registry",
        cache_repository=REPOSITORY,
        labels={"buildkit-pipeline/component": "weather-mcp"},
        image_labels={"org.opencontainers.image.revision": "c" * 40},
    )
    return BuildRequest(**{**fields, **overrides})


def container(job: dict) -> dict:
    [only] = job["spec"]["template"]["spec"]["containers"]
    return only


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_job_validates_against_the_kubernetes_schema(variant):
    job = build_job_manifest(request(**VARIANTS[variant]))
    kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)
    assert "initContainers" not in job["spec"]["template"]["spec"]
    assert job["spec"]["activeDeadlineSeconds"] > 0
    # one retry, only after a disruption: a failing build container fails the Job at once
    assert job["spec"]["backoffLimit"] == 1
    assert job["spec"]["podFailurePolicy"]["rules"] == [
        {"action": "Count", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": "buildkit", "operator": "NotIn", "values": [0]}}]
    assert job["spec"]["template"]["metadata"]["annotations"] == {"karpenter.sh/do-not-disrupt": "true"}


def test_an_invalid_manifest_is_caught_by_the_validation():
    job = build_job_manifest(request())
    container(job)["securityContext"]["privileged"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)


def test_privileged_mode_runs_the_pinned_root_image_privileged():
    spec = container(build_job_manifest(request()))
    assert spec["image"] == "moby/buildkit:v0.31.2"
    assert spec["securityContext"] == {"privileged": True}


def test_rootless_mode_runs_as_uid_1000_unconfined_without_process_sandbox():
    job = build_job_manifest(request(settings=BuildSpec(mode="rootless")))
    spec = container(job)
    assert spec["image"] == "moby/buildkit:v0.31.2-rootless"
    assert "privileged" not in spec["securityContext"]
    assert spec["securityContext"]["runAsUser"] == 1000
    assert spec["securityContext"]["seccompProfile"] == {"type": "Unconfined"}
    assert spec["securityContext"]["appArmorProfile"] == {"type": "Unconfined"}
    assert {"name": "BUILDKITD_FLAGS", "value": "--oci-worker-no-process-sandbox"} in spec["env"]


def test_registry_cache_flags_are_the_ones_ecr_accepts():
    args = container(build_job_manifest(request()))["args"]
    export = args[args.index("--export-cache") + 1]
    assert export == f"type=registry,ref={REPOSITORY}:buildcache,mode=max,image-manifest=true,oci-mediatypes=true,ignore-error=true"
    assert args[args.index("--import-cache") + 1] == f"type=registry,ref={REPOSITORY}:buildcache"


def test_no_cache_skips_the_import_but_refreshes_the_cache():
    args = container(build_job_manifest(request(no_cache=True)))["args"]
    assert "--no-cache" in args and "--import-cache" not in args and "--export-cache" in args


def test_platforms_target_args_and_secrets_reach_buildctl():
    args = container(build_job_manifest(request(
        platforms=["linux/amd64", "linux/arm64"], target="runtime", build_args={"A": "1"},
        secrets=[SecretFile(id="pip-token", secret_name="pip", key="token")],
    )))["args"]
    pairs = list(zip(args, args[1:]))
    assert ("--opt", "platform=linux/amd64,linux/arm64") in pairs
    assert ("--opt", "target=runtime") in pairs
    assert ("--opt", "build-arg:A=1") in pairs
    assert ("--secret", "id=pip-token,src=/run/build-secrets/pip-token") in pairs
    assert "--progress=rawjson" in args


def test_tags_are_commit_and_context_and_latest_only_on_request():
    assert image_ref(REPOSITORY, "c" * 40, "d" * 64).tags == ["cccccccccccc", "ctx-dddddddddddd"]
    assert image_ref(REPOSITORY, "c" * 40, "d" * 64, latest=True).tags[-1] == "latest"
    assert image_ref(REPOSITORY, "c" * 40, "d" * 64, dirty=True).tags[0] == "cccccccccccc-dirty"


def test_the_job_and_its_pod_carry_component_run_and_commit_labels(tmp_path, capsys):
    import json

    from flows.cli import main
    from sandbox.example import create_example_repo

    pipeline_file = create_example_repo(tmp_path / "app")
    text = pipeline_file.read_text().replace("mode: privileged}", "mode: rootless, cache_repository: agents-on-eks/cache}")
    pipeline_file.write_text(text)
    assert main(["plan", "--config", str(pipeline_file), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    for component in plan["components"]:
        job = component["job"]
        labels = job["spec"]["template"]["metadata"]["labels"]
        assert labels["buildkit-pipeline/component"] == component["name"]
        assert labels["buildkit-pipeline/commit"] == plan["commit"]
        assert labels["buildkit-pipeline/flow-run"] == "plan"
        spec = container(job)
        assert spec["image"].endswith("-rootless")
        cache = "123456789012.dkr.ecr.us-west-2.amazonaws.com/agents-on-eks/cache:buildcache"
        assert f"type=registry,ref={cache}" in spec["args"]
        kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)


def test_diagnose_command_names_the_signature_on_its_first_line(capsys):
    from pathlib import Path

    from flows.cli import main

    fixtures = Path(__file__).parent / "fixtures" / "buildkit"
    assert main(["diagnose", str(fixtures / "rootless-userns.log")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "rootless-userns"
    assert main(["diagnose", str(fixtures / "success.log")]) == 1
    assert capsys.readouterr().out.splitlines()[0] == "no known signature"
