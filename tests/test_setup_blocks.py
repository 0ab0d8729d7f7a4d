"""deployments/setup_blocks.py stores what a worker can use, and nothing it should not: one kubeconfig context,
no temporary AWS credentials, no profile of the operator's machine."""

from __future__ import annotations

import base64

import pytest
import yaml
from prefect_aws import AwsCredentials
from prefect_kubernetes.credentials import KubernetesCredentials

from blocks.target import BuildKitPipelineTarget
from deployments.setup_blocks import main as setup_blocks

CA = b"-----BEGIN CERTIFICATE-----\nstaging-ca\n-----END CERTIFICATE-----\n"


def two_cluster_kubeconfig(folder, sandbox_url: str) -> dict:
    """Production (the sandbox, an exec user as `aws eks update-kubeconfig` writes it) and staging, whose user holds
    a static token, current."""
    (folder / "staging-ca.crt").write_bytes(CA)
    return {
        "apiVersion": "v1", "kind": "Config", "preferences": {}, "current-context": "staging",
        "clusters": [{"name": "prod", "cluster": {"server": sandbox_url}},
                     {"name": "staging", "cluster": {"server": "https://127.0.0.1:1",
                                                     "certificate-authority": "staging-ca.crt"}}],
        "users": [{"name": "prod-user", "user": {"exec": {
                      "apiVersion": "client.authentication.k8s.io/v1beta1", "command": "aws",
                      "args": ["eks", "get-token", "--cluster-name", "prod", "--region", "us-west-2"]}}},
                  {"name": "staging-admin", "user": {"token": "staging-admin-static-token"}}],
        "contexts": [{"name": "prod", "context": {"cluster": "prod", "user": "prod-user", "namespace": "build"}},
                     {"name": "staging", "context": {"cluster": "staging", "user": "staging-admin"}}],
    }


@pytest.fixture
def environment(prefect_server, sandbox, monkeypatch, tmp_path):
    """Long-term sandbox keys and a kubeconfig with two clusters, contexts and users."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "BUILDKIT_PIPELINE_BUCKET", "BUILDKIT_PIPELINE_ROLE_ARN",
                 "BUILDKIT_PIPELINE_BUILD_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sandbox-secret-key")
    monkeypatch.setenv("AWS_ENDPOINT_URL", sandbox.aws.url)
    kubeconfig = tmp_path / "config"
    document = two_cluster_kubeconfig(tmp_path, sandbox.kube.url)
    kubeconfig.write_text(yaml.safe_dump(document))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    return document


def saved(name: str) -> bool:
    try:
        BuildKitPipelineTarget.load(name)
        return True
    except ValueError:
        return False


def test_only_the_chosen_context_its_cluster_and_user_are_stored(environment, monkeypatch):
    monkeypatch.setenv("KUBE_CONTEXT", "prod")

    setup_blocks(["--name", "one-context"])

    stored = KubernetesCredentials.load("one-context-cluster").cluster_config
    assert stored.context_name == "prod"
    assert stored.config["current-context"] == "prod"
    assert stored.config["contexts"] == [environment["contexts"][0]]
    assert stored.config["clusters"] == [environment["clusters"][0]]
    assert stored.config["users"] == [environment["users"][0]]
    assert "staging-admin-static-token" not in yaml.safe_dump(stored.config)
    assert BuildKitPipelineTarget.load("one-context").kubernetes.cluster_config.config == stored.config


def test_a_certificate_file_is_inlined_and_a_static_token_is_refused(environment, monkeypatch, capsys, tmp_path):
    """The staging context: its CA file becomes certificate-authority-data (kubectl's --flatten); its user's token
    would sit in a plain block field, so nothing is saved."""
    with pytest.raises(SystemExit) as exited:
        setup_blocks(["--name", "static-token"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "users[staging-admin] authenticates with token" in error and "nothing was saved" in error
    assert "staging-admin-static-token" not in error
    assert not saved("static-token")

    environment["users"][1]["user"] = {"exec": environment["users"][0]["user"]["exec"]}
    (tmp_path / "config").write_text(yaml.safe_dump(environment))
    setup_blocks(["--name", "flattened"])
    [cluster] = KubernetesCredentials.load("flattened-cluster").cluster_config.config["clusters"]
    assert cluster == {"name": "staging", "cluster": {"server": "https://127.0.0.1:1",
                                                      "certificate-authority-data": base64.b64encode(CA).decode()}}


@pytest.mark.parametrize("variables", [
    {"AWS_SESSION_TOKEN": "FwoGZXIvYXdzEXAMPLESESSIONTOKEN"},
    {"AWS_ACCESS_KEY_ID": "ASIAIOSFODNN7EXAMPLE"},
], ids=["session-token", "asia-key"])
def test_temporary_aws_credentials_are_refused(environment, monkeypatch, capsys, variables):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KUBE_CONTEXT", "prod")

    with pytest.raises(SystemExit) as exited:
        setup_blocks(["--name", "temporary"])

    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "temporary credentials" in error and "BUILDKIT_PIPELINE_ROLE_ARN" in error
    assert "EXAMPLESESSIONTOKEN" not in error
    assert not saved("temporary")
    with pytest.raises(ValueError):
        AwsCredentials.load("temporary-aws")


def test_a_profile_of_this_machine_is_refused_and_no_keys_means_the_worker_identity(environment, monkeypatch,
                                                                                   capsys):
    monkeypatch.setenv("KUBE_CONTEXT", "prod")
    monkeypatch.setenv("AWS_PROFILE", "operator-sso")
    with pytest.raises(SystemExit):
        setup_blocks(["--name", "profile"])
    assert "AWS_PROFILE=operator-sso" in capsys.readouterr().err and not saved("profile")

    monkeypatch.delenv("AWS_PROFILE")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("BUILDKIT_PIPELINE_ROLE_ARN", "arn:aws:iam::123456789012:role/buildkit-pipeline")
    setup_blocks(["--name", "worker-identity"])
    stored = AwsCredentials.load("worker-identity-aws")
    assert (stored.aws_access_key_id, stored.aws_secret_access_key, stored.aws_session_token,
            stored.profile_name) == (None, None, None, None)
    assert stored.assume_role_arn == "arn:aws:iam::123456789012:role/buildkit-pipeline"


def test_the_build_role_is_stored_on_the_target_and_a_malformed_one_saves_nothing(environment, monkeypatch, capsys):
    monkeypatch.setenv("KUBE_CONTEXT", "prod")
    monkeypatch.setenv("BUILDKIT_PIPELINE_BUILD_ROLE_ARN", "arn:aws:iam::123456789012:role/buildkit-pipeline-build")
    setup_blocks(["--name", "scoped-builds"])
    assert BuildKitPipelineTarget.load("scoped-builds").build_role_arn == \
        "arn:aws:iam::123456789012:role/buildkit-pipeline-build"

    monkeypatch.setenv("BUILDKIT_PIPELINE_BUILD_ROLE_ARN", "buildkit-pipeline-build")
    with pytest.raises(SystemExit) as exit_:
        setup_blocks(["--name", "bad-build-role"])
    assert exit_.value.code == 2
    assert ("error: BUILDKIT_PIPELINE_BUILD_ROLE_ARN: 'buildkit-pipeline-build' is not an IAM role ARN"
            in capsys.readouterr().err)
    assert not saved("bad-build-role")
