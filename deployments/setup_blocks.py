"""Create the blocks a deployment uses from environment variables.

    AWS_REGION=us-west-2 [AWS_PROFILE=... | AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...] \
    KUBECONFIG=~/.kube/eks-config [KUBE_CONTEXT=...] [BUILDKIT_PIPELINE_BUCKET=my-build-bucket] \
    python -m deployments.setup_blocks --name production

Saves `<name>-aws` (AwsCredentials), `<name>-cluster` (KubernetesCredentials, from the
kubeconfig file; omitted with --in-cluster), `<name>-contexts` (S3Bucket, the bucket for
build contexts; only with BUILDKIT_PIPELINE_BUCKET, else the pipeline file's `aws.bucket`
is used) and `<name>` (BuildKit Pipeline Target, naming the others).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml
from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket
from prefect_kubernetes.credentials import KubernetesClusterConfig, KubernetesCredentials
from pydantic import SecretStr

from blocks.target import BuildKitPipelineTarget


def aws_credentials_from_environment() -> AwsCredentials:
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    return AwsCredentials(
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=SecretStr(secret) if secret else None,
        aws_session_token=os.environ.get("AWS_SESSION_TOKEN"),
        profile_name=os.environ.get("AWS_PROFILE"),
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        assume_role_arn=os.environ.get("BUILDKIT_PIPELINE_ROLE_ARN"),
        aws_client_parameters=AwsClientParameters(endpoint_url=os.environ.get("AWS_ENDPOINT_URL")),
    )


def cluster_from_kubeconfig(path: Path, context: str | None) -> KubernetesCredentials:
    document = yaml.safe_load(path.read_text())
    return KubernetesCredentials(cluster_config=KubernetesClusterConfig(
        config=document, context_name=context or document["current-context"]))


def save_target(name: str, aws: AwsCredentials, cluster: KubernetesCredentials | None,
                bucket: str | None = None) -> BuildKitPipelineTarget:
    aws.save(f"{name}-aws", overwrite=True)
    if cluster is not None:
        cluster.save(f"{name}-cluster", overwrite=True)
    contexts = S3Bucket(bucket_name=bucket, credentials=aws) if bucket else None
    if contexts is not None:
        contexts.save(f"{name}-contexts", overwrite=True)
    target = BuildKitPipelineTarget(aws_credentials=aws, kubernetes=cluster, context_bucket=contexts)
    target.save(name, overwrite=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="production", help="the target block's name")
    parser.add_argument("--in-cluster", action="store_true", help="the worker runs in the cluster: no kubeconfig")
    args = parser.parse_args(argv)
    cluster = None
    if not args.in_cluster:
        kubeconfig = Path(os.environ.get("KUBECONFIG", "~/.kube/config")).expanduser()
        cluster = cluster_from_kubeconfig(kubeconfig, os.environ.get("KUBE_CONTEXT"))
    bucket = os.environ.get("BUILDKIT_PIPELINE_BUCKET")
    save_target(args.name, aws_credentials_from_environment(), cluster, bucket)
    saved = [f"{args.name}-aws", *([] if args.in_cluster else [f"{args.name}-cluster"]),
             *([f"{args.name}-contexts"] if bucket else [])]
    print(f"saved blocks {', '.join(saved)} and target {args.name}")


if __name__ == "__main__":
    main()
