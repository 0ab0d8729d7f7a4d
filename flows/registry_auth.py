"""Registry auth stage: an ECR token as a `kubernetes.io/dockerconfigjson` Secret for one build.

ECR's `authorizationToken` is base64 of `AWS:<password>`, which is already the
`auth` field of a docker config.json. The token carries every ECR right of the
principal that minted it, so the Secret lives only as long as its build Job.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime

from prefect_aws import AwsCredentials
from pydantic import BaseModel, ConfigDict, SecretStr

from flows.aws import aws_client
from flows.config import ECR_HOST
from flows.secrecy import carrying_secrets


class RegistryToken(BaseModel):
    model_config = ConfigDict(frozen=True)

    registry: str
    token: SecretStr
    expires_at: datetime


def mint_ecr_token(credentials: AwsCredentials, registry: str) -> RegistryToken:
    ecr = aws_client(credentials, "ecr")
    match = ECR_HOST.match(registry)
    with carrying_secrets():
        response = ecr.get_authorization_token(**({"registryIds": [match["account"]]} if match else {}))
    data = response["authorizationData"][0]
    return RegistryToken(registry=registry, token=SecretStr(data["authorizationToken"]), expires_at=data["expiresAt"])


def docker_config_json(token: RegistryToken) -> bytes:
    return json.dumps({"auths": {token.registry: {"auth": token.token.get_secret_value()}}}).encode()


def registry_secret_manifest(name: str, namespace: str, token: RegistryToken, labels: dict[str, str]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64.b64encode(docker_config_json(token)).decode()},
    }


def owned_by(job: dict) -> dict:
    """A metadata patch that lets Kubernetes delete the Secret together with its Job."""
    meta = job["metadata"]
    return {
        "metadata": {
            "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"], "uid": meta["uid"]}
            ]
        }
    }
