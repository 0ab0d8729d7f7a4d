"""One ECR token per build, scoped to its component's repositories; a `ctx-` image reused only when its label says so.

The sandbox's ECR authorizes a token's requests against the principal that minted it, with the session policy of an
STS session (sandbox/ecr_auth.py); its GetDownloadUrlForLayer serves the image config the builders stored.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from flows.build_run import reuse_refusal
from flows.plan import CONTEXT_SHA256_LABEL
from flows.registry_auth import (
    PUSH_AND_PULL_ACTIONS,
    build_session_policy,
    check_role_arn,
    mint_build_token,
    session_name,
)
from sandbox import ecr_auth
from sandbox.aws import BUILD_ROLE_ARN, AwsSandbox
from sandbox.builders import OCI, image_manifest, push_manifest
from tests.conftest import by_name, jobs, run_logs

MCP, AGENT = "weather-mcp", "weather-agent"
REGISTRY = "123456789012.dkr.ecr.us-west-2.amazonaws.com"
MCP_REPOSITORY, AGENT_REPOSITORY = f"{REGISTRY}/agents-on-eks/weather-mcp", f"{REGISTRY}/agents-on-eks/weather-agent"


# ---------------------------------------------------------------- the pure parts


def test_the_session_policy_allows_a_token_and_push_and_pull_on_exactly_the_given_repositories():
    policy = build_session_policy(REGISTRY, [MCP_REPOSITORY, f"{REGISTRY}/cache/mcp", MCP_REPOSITORY])
    assert policy == {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "ecr:GetAuthorizationToken", "Resource": "*"},
        {"Effect": "Allow", "Action": list(PUSH_AND_PULL_ACTIONS), "Resource": [
            "arn:aws:ecr:us-west-2:123456789012:repository/agents-on-eks/weather-mcp",
            "arn:aws:ecr:us-west-2:123456789012:repository/cache/mcp"]}]}
    assert {"ecr:PutImage", "ecr:InitiateLayerUpload", "ecr:BatchGetImage"} <= set(PUSH_AND_PULL_ACTIONS)
    china = build_session_policy("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn", ["a"])
    assert china["Statement"][1]["Resource"] == ["arn:aws-cn:ecr:cn-north-1:123456789012:repository/a"]


def test_a_session_name_is_what_sts_accepts():
    name = session_name("weather mcp/ü" + "x" * 80, "0f1e2d3c-aaaa")
    assert name.startswith("build-weather-mcp--") and len(name) == 64
    assert all(c.isalnum() or c in "_+=,.@-" for c in name)


def test_a_build_role_that_is_no_role_arn_is_refused_naming_the_setting():
    assert check_role_arn(BUILD_ROLE_ARN) == BUILD_ROLE_ARN
    with pytest.raises(ValueError, match=r"^build_role_arn: 'arn:aws:iam::123456789012:user/ci' is not an IAM role"):
        check_role_arn("arn:aws:iam::123456789012:user/ci")


def test_reuse_needs_every_config_to_name_exactly_this_archive():
    archive = "a" * 64
    assert reuse_refusal([archive, archive], archive) is None
    assert "is " + "b" * 64 in reuse_refusal([archive, "b" * 64], archive)
    assert "has no dev.buildkit-pipeline.context-sha256 label" in reuse_refusal([None], archive)
    assert reuse_refusal([], archive) == "it has no image config"


# ---------------------------------------------------------------- the sandbox's ECR


def tags(sandbox, repository: str) -> dict[str, str]:
    ecr = sandbox.aws.client("ecr", "us-west-2")
    images = ecr.describe_images(repositoryName=repository.removeprefix(f"{REGISTRY}/"))["imageDetails"]
    return {tag: image["imageDigest"] for image in images for tag in image.get("imageTags", [])}


def seed(sandbox, name: str, labels: dict[str, str]) -> str:
    """An image pushed under `name` by someone else, with these config labels; its digest."""
    manifest, digest = image_manifest([], labels, "", OCI)
    assert push_manifest(sandbox.aws, "us-west-2", name, manifest, digest)
    return digest


def test_a_builds_token_cannot_push_over_another_components_image_or_cache(prefect_server, sandbox, example_app,
                                                                          monkeypatch):
    """A compromised weather-mcp build pushes over weather-agent's `ctx-` tag and `buildcache` with its own token:
    ECR refuses it, because the token's session may only touch weather-mcp's repositories."""
    victims = [f"{AGENT_REPOSITORY}:ctx-0123456789ab", f"{AGENT_REPOSITORY}:buildcache"]
    for victim in victims:
        seed(sandbox, victim, {CONTEXT_SHA256_LABEL: "0123456789ab" + "0" * 52})
    before = tags(sandbox, AGENT_REPOSITORY)
    monkeypatch.setitem(sandbox.buildkit.hijacks, MCP_REPOSITORY, victims)

    state = example_app.run(components=[MCP], deploy=False)

    assert tags(sandbox, AGENT_REPOSITORY) == before, "the compromised build moved weather-agent's tags"
    assert by_name(state.result())[MCP].outcome == "built", "its own push is allowed"
    logs = run_logs(state.state_details.flow_run_id)
    refused = [line for line in logs if "unexpected status from HEAD request to https://" + REGISTRY +
               "/v2/agents-on-eks/weather-agent/blobs/sha256:" in line and "403 Forbidden" in line]
    assert len(refused) == 2, "the build log shows both pushes refused"
    session = f"assumed-role/buildkit-pipeline-build/{session_name(MCP, str(state.state_details.flow_run_id))}"
    assert not any("build_role_arn is not set" in line for line in logs)
    assert any(role.arn.endswith(session) for role in _build_sessions()), "the token came from the build role"


def _build_sessions():
    from moto.sts.models import sts_backends

    return [role for account in list(sts_backends) for partition in list(sts_backends[account])
            for role in sts_backends[account][partition].assumed_roles if role.role_arn == BUILD_ROLE_ARN]


def test_a_scoped_token_is_refused_with_ecrs_text_on_another_repository(sandbox, example_app):
    """The registry answers a push of another repository as ECR does: the session policy allows it nothing there."""
    credentials = example_app.flow_kwargs["aws_credentials"]
    token = mint_build_token(credentials, REGISTRY, role_arn=BUILD_ROLE_ARN, repositories=[MCP_REPOSITORY],
                             session="scope-test", lasting_seconds=900)
    holder = ecr_auth.token_holder(sandbox.aws, token.token.get_secret_value())
    arn = "arn:aws:ecr:us-west-2:123456789012:repository/agents-on-eks/weather-agent"

    assert ecr_auth.refusal(holder, "ecr:PutImage", arn.replace("weather-agent", "weather-mcp")) is None
    assert ecr_auth.refusal(holder, "ecr:InitiateLayerUpload", arn) == (
        "User: arn:aws:sts::123456789012:assumed-role/buildkit-pipeline-build/scope-test is not authorized to "
        f"perform: ecr:InitiateLayerUpload on resource: {arn} because no session policy allows the "
        "ecr:InitiateLayerUpload action")
    assert ecr_auth.token_holder(sandbox.aws, "QVdTOm5ldmVyLWlzc3VlZA==") is None, "a token ECR never issued: 401"
    with sandbox.aws.later(3600):
        assert ecr_auth.token_holder(sandbox.aws, token.token.get_secret_value()) is None, "expired with its session"


def test_get_download_url_for_layer_serves_a_referenced_config_for_a_limited_time(sandbox, example_app):
    config_labels = {CONTEXT_SHA256_LABEL: "c" * 64}
    digest = seed(sandbox, f"{MCP_REPOSITORY}:download-test", config_labels)
    ecr = sandbox.aws.client("ecr", "us-west-2")
    [image] = ecr.batch_get_image(repositoryName="agents-on-eks/weather-mcp",
                                  imageIds=[{"imageDigest": digest}])["images"]
    config_digest = json.loads(image["imageManifest"])["config"]["digest"]

    url = ecr.get_download_url_for_layer(repositoryName="agents-on-eks/weather-mcp",
                                         layerDigest=config_digest)["downloadUrl"]
    with urllib.request.urlopen(url, timeout=10) as response:
        assert json.loads(response.read())["config"]["Labels"] == config_labels
    with sandbox.aws.later(ecr_auth.LAYER_URL_SECONDS + 1), pytest.raises(urllib.error.HTTPError, match="403"):
        urllib.request.urlopen(url, timeout=10)
    with pytest.raises(ecr.exceptions.LayersNotFoundException, match="does not exist within the repository"):
        ecr.get_download_url_for_layer(repositoryName="agents-on-eks/weather-agent", layerDigest=config_digest)



def test_download_urls_keep_working_after_another_sandbox_in_this_process_stopped(sandbox, example_app):
    """moto's backends and the ECR patch are process-wide; a second sandbox (a restart test starts one) must not
    leave the session sandbox's download URLs pointing at its closed port."""
    digest = seed(sandbox, f"{MCP_REPOSITORY}:second-sandbox-test", {CONTEXT_SHA256_LABEL: "d" * 64})
    ecr = sandbox.aws.client("ecr", "us-west-2")
    [image] = ecr.batch_get_image(repositoryName="agents-on-eks/weather-mcp",
                                  imageIds=[{"imageDigest": digest}])["images"]
    config_digest = json.loads(image["imageManifest"])["config"]["digest"]
    other = AwsSandbox()
    other.start()
    other.stop()

    url = ecr.get_download_url_for_layer(repositoryName="agents-on-eks/weather-mcp",
                                         layerDigest=config_digest)["downloadUrl"]
    assert url.startswith(sandbox.aws.url)
    with urllib.request.urlopen(url, timeout=10) as response:
        assert json.loads(response.read())["config"]["Labels"] == {CONTEXT_SHA256_LABEL: "d" * 64}


# ---------------------------------------------------------------- reuse


def test_a_ctx_tag_whose_label_does_not_match_is_built_not_reused(prefect_server, sandbox, example_app):
    first = by_name(example_app.run(components=[MCP], deploy=False).result())[MCP]
    context_tag = f"{MCP_REPOSITORY}:ctx-{first.archive_sha256[:12]}"
    poisoned = seed(sandbox, context_tag, {CONTEXT_SHA256_LABEL: "f" * 64})
    assert tags(sandbox, MCP_REPOSITORY)[context_tag.rpartition(":")[2]] == poisoned
    jobs_before = len(jobs(sandbox, example_app, MCP))

    state = example_app.run(components=[MCP], deploy=False, skip_unchanged=True)

    second = by_name(state.result())[MCP]
    assert second.outcome == "built" and second.image.digest != poisoned
    assert len(jobs(sandbox, example_app, MCP)) == jobs_before + 1
    why = [line for line in run_logs(state.state_details.flow_run_id) if line.startswith("not reusing")]
    assert why and f"label is {'f' * 64}, not this context's {first.archive_sha256}" in why[0]


def test_without_a_build_role_the_run_warns_that_builds_carry_the_flows_rights(prefect_server, sandbox,
                                                                               example_app):
    example_app.flow_kwargs["build_role_arn"] = None
    state = example_app.run(components=[MCP], deploy=False)
    assert state.is_completed()
    assert any(line.startswith("build_role_arn is not set: every build's ECR token carries all the ECR rights")
               for line in run_logs(state.state_details.flow_run_id))


def test_a_build_role_with_a_registry_that_is_not_ecr_is_refused_before_anything_remote():
    from flows.config import ConfigError, load_config
    from flows.pipeline import check_scopable
    from sandbox.example import EXAMPLE, PIPELINE_FILE

    config = load_config(EXAMPLE / PIPELINE_FILE)
    check_scopable(config, BUILD_ROLE_ARN)
    other = config.model_copy(update={"registry": "registry.example.com:5000"})
    check_scopable(other, None)
    with pytest.raises(ConfigError, match=r"^registry: 'registry.example.com:5000' is not an ECR registry .* "
                                          "so build_role_arn cannot scope its tokens"):
        check_scopable(other, BUILD_ROLE_ARN)
