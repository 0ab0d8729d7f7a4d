"""Where a run builds and deploys: the AWS account and the Kubernetes cluster, as one Prefect block.

The credentials stay in the credential blocks of prefect-aws and
prefect-kubernetes; this block only names which ones a deployment uses, so the
nightly and the on-demand deployment share one setting.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import AsyncIterator

import yaml
from prefect.blocks.core import Block
from prefect_aws import AwsCredentials, S3Bucket
from prefect_kubernetes.credentials import KubernetesCredentials
from pydantic import Field, field_validator

from flows.registry_auth import check_role_arn


class BuildKitPipelineTarget(Block):
    """The AWS account (context bucket, ECR) and the EKS cluster (build Jobs, helm releases) of a pipeline."""

    _block_type_name = "BuildKit Pipeline Target"
    _block_type_slug = "buildkit-pipeline-target"
    _description = "The AWS credentials and Kubernetes cluster that buildkit-pipeline builds and deploys with."

    aws_credentials: AwsCredentials = Field(description="credentials for S3 (contexts) and ECR (tokens)")
    context_bucket: S3Bucket | None = Field(
        default=None, description="the S3 bucket for build contexts; the pipeline file's aws.bucket when empty"
    )
    kubernetes: KubernetesCredentials | None = Field(
        default=None, description="the cluster; empty means the in-cluster service account or ~/.kube/config"
    )
    kubeconfig_path: str | None = Field(default=None, description="a kubeconfig file on the worker, instead")
    build_role_arn: str | None = Field(
        default=None,
        description="IAM role each build's ECR token is minted from, one session per build limited to its "
                    "component's repositories; empty: builds carry the full ECR rights of aws_credentials",
    )

    _role = field_validator("build_role_arn")(check_role_arn)

    @contextlib.asynccontextmanager
    async def kubeconfig(self) -> AsyncIterator[str | None]:
        """A kubeconfig file for the Kubernetes client and helm, written with mode 0600 for the run only."""
        cluster = self.kubernetes.cluster_config if self.kubernetes else None
        if cluster is None:
            yield self.kubeconfig_path
            return
        with tempfile.TemporaryDirectory(prefix="buildkit-pipeline-kube-") as folder:
            path = Path(folder) / "config"
            document = dict(cluster.config, **{"current-context": cluster.context_name})
            path.touch(mode=0o600)
            path.write_text(yaml.safe_dump(document))
            os.chmod(path, 0o600)
            yield str(path)
