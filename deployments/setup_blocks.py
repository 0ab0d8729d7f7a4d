"""Create the blocks a deployment uses from environment variables.

    AWS_REGION=us-west-2 [AWS_ACCESS_KEY_ID=AKIA... AWS_SECRET_ACCESS_KEY=...] [BUILDKIT_PIPELINE_ROLE_ARN=arn:...] \
    KUBECONFIG=~/.kube/eks-config [KUBE_CONTEXT=...] [BUILDKIT_PIPELINE_BUCKET=my-build-bucket] \
    [BUILDKIT_PIPELINE_BUILD_ROLE_ARN=arn:...] \
    python -m deployments.setup_blocks --name production [--in-cluster] [--worker-profile NAME]

Saves `<name>-aws` (AwsCredentials), `<name>-cluster` (KubernetesCredentials, one context of the
kubeconfig file, minified and flattened; omitted with --in-cluster), `<name>-contexts` (S3Bucket,
the bucket for build contexts; only with BUILDKIT_PIPELINE_BUCKET, else the pipeline file's
`aws.bucket` is used) and `<name>` (BuildKit Pipeline Target, naming the others, with
BUILDKIT_PIPELINE_BUILD_ROLE_ARN as its `build_role_arn`: the role each build's ECR token is minted from).

What a block holds outlives the shell that saved it, and a worker reads it on another machine:
- no temporary AWS credentials (a session token, an `ASIA...` key): the nightly would outlive them.
  Without keys the block holds none, and a run uses the worker's own identity (instance profile,
  EKS Pod Identity, IRSA), assuming BUILDKIT_PIPELINE_ROLE_ARN when it is set;
- no profile of this machine (AWS_PROFILE): only `--worker-profile`, a profile the workers have;
- one kubeconfig context, and no static Kubernetes credential in it: prefect-kubernetes'
  KubernetesClusterConfig keeps the kubeconfig in `config`, a plain dict the UI shows.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from pathlib import Path

import yaml
from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket
from prefect_kubernetes.credentials import KubernetesClusterConfig, KubernetesCredentials
from pydantic import SecretStr

from blocks.target import BuildKitPipelineTarget
from flows.registry_auth import check_role_arn

# AWS STS GetAccessKeyInfo (API reference): "Access key IDs beginning with ASIA are temporary credentials".
TEMPORARY_KEY_PREFIX = "ASIA"
# Fields of a kubeconfig user that are a credential in themselves (client-go clientcmd/api/types.go AuthInfo).
STATIC_KUBE_CREDENTIALS = ("token", "password", "client-key-data", "client-key")
# FlattenConfig's path -> data pairs (client-go tools/clientcmd/api/helpers.go).
FLATTENED = {"clusters": {"certificate-authority": "certificate-authority-data"},
             "users": {"client-certificate": "client-certificate-data", "client-key": "client-key-data"}}


class SetupError(ValueError):
    """What the environment asks for cannot be stored safely; nothing was saved."""


def aws_credentials_from_environment(worker_profile: str | None = None) -> AwsCredentials:
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if os.environ.get("AWS_SESSION_TOKEN") or (key or "").startswith(TEMPORARY_KEY_PREFIX):
        raise SetupError(
            "AWS_SESSION_TOKEN / an ASIA... access key: these are temporary credentials (SSO, assume-role, MFA) that "
            "expire within hours, so the nightly would outlive them. Store no keys instead (unset AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN): a run then uses the worker's own identity (instance "
            "profile, EKS Pod Identity, IRSA), and with BUILDKIT_PIPELINE_ROLE_ARN=arn:aws:iam::<account>:role/<role> "
            "assumes that role; or store a long-term AKIA... key of a user for the pipeline only")
    if bool(key) != bool(secret):
        raise SetupError("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY: set both (a long-term key) or neither")
    if os.environ.get("AWS_PROFILE") and not worker_profile:
        raise SetupError(
            f"AWS_PROFILE={os.environ['AWS_PROFILE']}: a profile of this machine's ~/.aws/config, which a worker "
            "does not have. Unset it to store no keys (the worker's own identity, BUILDKIT_PIPELINE_ROLE_ARN to "
            "assume a role), or pass --worker-profile NAME for a profile every worker has")
    return AwsCredentials(
        aws_access_key_id=key,
        aws_secret_access_key=SecretStr(secret) if secret else None,
        profile_name=worker_profile,
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        assume_role_arn=os.environ.get("BUILDKIT_PIPELINE_ROLE_ARN"),
        aws_client_parameters=AwsClientParameters(endpoint_url=os.environ.get("AWS_ENDPOINT_URL")),
    )


def _named(document: dict, kind: str, name: str, path: Path) -> dict:
    found = [entry for entry in document.get(kind) or [] if entry.get("name") == name]
    if not found:
        raise SetupError(f"{path}: no {kind[:-1]} named {name!r} in {kind}")
    return found[0]


def _flatten(entry: dict, kind: str, base_dir: Path, path: Path) -> dict:
    """A cluster or user with its certificate and key files read in, as `kubectl config view --flatten` does."""
    body = dict(entry[kind[:-1]] or {})
    for file_field, data_field in FLATTENED[kind].items():
        if file_field in body:
            if body.get(data_field):
                raise SetupError(f"{path}: {kind}[{entry['name']}] has both {file_field} and {data_field}")
            file = Path(body.pop(file_field)).expanduser()
            body[data_field] = base64.b64encode((base_dir / file).read_bytes()).decode()
    return {"name": entry["name"], kind[:-1]: body}


def minified_kubeconfig(path: Path, context: str | None) -> dict:
    """One context of a kubeconfig with only its cluster and user, files inlined: what
    `kubectl config view --minify --flatten --context <context>` prints (MinifyConfig and FlattenConfig,
    kubernetes/kubernetes staging/src/k8s.io/client-go/tools/clientcmd/api/helpers.go)."""
    document = yaml.safe_load(path.read_text()) or {}
    name = context or document.get("current-context")
    if not name:
        raise SetupError(f"{path}: no current-context; name one with KUBE_CONTEXT")
    chosen = _named(document, "contexts", name, path)
    cluster = _named(document, "clusters", chosen["context"]["cluster"], path)
    user = _named(document, "users", chosen["context"]["user"], path) if chosen["context"].get("user") else None
    static = sorted(set(STATIC_KUBE_CREDENTIALS) & set((user or {}).get("user") or {}))
    if static:
        raise SetupError(
            f"{path}: users[{user['name']}] authenticates with {', '.join(static)}, which the cluster block would keep "
            "in plain text (KubernetesClusterConfig.config is no secret field; the UI shows it). Use an exec user "
            "(`aws eks update-kubeconfig` writes one running `aws eks get-token`) or --in-cluster")
    base_dir = path.resolve().parent
    return {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [_flatten(cluster, "clusters", base_dir, path)],
        "users": [_flatten(user, "users", base_dir, path)] if user else [],
        "contexts": [chosen],
        "current-context": name,
    }


def cluster_from_kubeconfig(path: Path, context: str | None) -> KubernetesCredentials:
    config = minified_kubeconfig(path, context)
    return KubernetesCredentials(cluster_config=KubernetesClusterConfig(
        config=config, context_name=config["current-context"]))


def save_target(name: str, aws: AwsCredentials, cluster: KubernetesCredentials | None,
                bucket: str | None = None, build_role_arn: str | None = None) -> BuildKitPipelineTarget:
    aws.save(f"{name}-aws", overwrite=True)
    if cluster is not None:
        cluster.save(f"{name}-cluster", overwrite=True)
    contexts = S3Bucket(bucket_name=bucket, credentials=aws) if bucket else None
    if contexts is not None:
        contexts.save(f"{name}-contexts", overwrite=True)
    target = BuildKitPipelineTarget(aws_credentials=aws, kubernetes=cluster, context_bucket=contexts,
                                    build_role_arn=build_role_arn)
    target.save(name, overwrite=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="production", help="the target block's name")
    parser.add_argument("--in-cluster", action="store_true", help="the worker runs in the cluster: no kubeconfig")
    parser.add_argument("--worker-profile", help="an AWS profile that exists on every worker (stored by name)")
    args = parser.parse_args(argv)
    try:
        build_role_arn = check_role_arn(os.environ.get("BUILDKIT_PIPELINE_BUILD_ROLE_ARN") or None,
                                        "BUILDKIT_PIPELINE_BUILD_ROLE_ARN")
        aws = aws_credentials_from_environment(args.worker_profile)
        cluster = None
        if not args.in_cluster:
            kubeconfig = os.environ.get("KUBECONFIG") or "~/.kube/config"
            if os.pathsep in kubeconfig:
                raise SetupError(f"KUBECONFIG={kubeconfig} lists several files; name the one with the context")
            kubeconfig = Path(kubeconfig).expanduser()
            cluster = cluster_from_kubeconfig(kubeconfig, os.environ.get("KUBE_CONTEXT"))
    except (SetupError, OSError, ValueError) as exc:
        print(f"error: {exc}; nothing was saved", file=sys.stderr)
        raise SystemExit(2) from None
    bucket = os.environ.get("BUILDKIT_PIPELINE_BUCKET")
    save_target(args.name, aws, cluster, bucket, build_role_arn)
    saved = [f"{args.name}-aws", *([] if args.in_cluster else [f"{args.name}-cluster"]),
             *([f"{args.name}-contexts"] if bucket else [])]
    print(f"saved blocks {', '.join(saved)} and target {args.name}")


if __name__ == "__main__":
    main()
