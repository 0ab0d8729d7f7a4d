"""Registry auth stage: an ECR token as a `kubernetes.io/dockerconfigjson` Secret for one build.

ECR's `authorizationToken` is base64 of `AWS:<password>`, which is already the
`auth` field of a docker config.json. The token "can be used to access any Amazon
ECR registry that your IAM principal has access to" (ECR API Reference,
GetAuthorizationToken): ECR evaluates each registry request against the principal
that minted it. So each build's token is minted by its own STS session of the
build role (`build_role_arn`), whose session policy allows only that component's
image and cache repositories: "the resulting session's permissions are the
intersection of the role's identity-based policy and the session policies" (IAM
User Guide, id_credentials_temp_control-access_assumerole.html). A compromised
build cannot push over another component's tags. The Secret lives only as long as
its build Job.
"""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime, timezone

from prefect_aws import AwsCredentials
from pydantic import BaseModel, ConfigDict, SecretStr

from flows.aws import aws_client, client_with
from flows.config import ECR_HOST
from flows.secrecy import carrying_secrets

# What a push needs (ECR User Guide, image-push-iam.html) and what a pull needs besides BatchGetImage and
# BatchCheckLayerAvailability (GetDownloadUrlForLayer: the layer and config blobs; a registry cache import
# pulls like an image does).
PUSH_AND_PULL_ACTIONS = (
    "ecr:BatchCheckLayerAvailability", "ecr:InitiateLayerUpload", "ecr:UploadLayerPart", "ecr:CompleteLayerUpload",
    "ecr:PutImage", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer",
)
# AssumeRole's DurationSeconds ranges from 900 s to the role's MaxSessionDuration, 1 h unless raised (IAM API
# Reference, AssumeRole): a session asks for that hour, so a token minted while a build queues still lasts past its
# deadline when the slot comes, or for longer when the build's deadline needs it
BUILD_SESSION_SECONDS = 3600
SESSION_NAME = re.compile(r"[^\w+=,.@-]", re.ASCII)


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


ROLE_ARN = re.compile(r"^arn:aws(-cn|-us-gov)?:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")


def check_role_arn(value: str | None, key: str = "build_role_arn") -> str | None:
    """An IAM role ARN (`arn:aws:iam::<account>:role/<path/name>`), or a ValueError naming `key`."""
    if value is not None and not ROLE_ARN.match(value):
        raise ValueError(f"{key}: {value!r} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)")
    return value


def repository_arn(registry: str, repository: str) -> str:
    """`arn:aws:ecr:<region>:<account>:repository/<name>` of a repository under an ECR registry host."""
    match = ECR_HOST.match(registry)
    if not match:
        raise ValueError(f"registry: {registry!r} is not an ECR registry (<account>.dkr.ecr.<region>.amazonaws.com)")
    partition = "aws-cn" if registry.endswith(".cn") else "aws"
    return f"arn:{partition}:ecr:{match['region']}:{match['account']}:repository/{repository}"


def build_session_policy(registry: str, repositories: list[str]) -> dict:
    """The session policy of one build: a token, and push and pull on exactly these repositories (under `registry`).

    GetAuthorizationToken has no resource-level permissions, so its resource is `*` (Service Authorization
    Reference, Amazon Elastic Container Registry)."""
    names = list(dict.fromkeys(r.removeprefix(f"{registry}/") for r in repositories))
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "ecr:GetAuthorizationToken", "Resource": "*"},
            {"Effect": "Allow", "Action": list(PUSH_AND_PULL_ACTIONS),
             "Resource": [repository_arn(registry, name) for name in names]},
        ],
    }


def session_name(component: str, run_id: str) -> str:
    """RoleSessionName (2 to 64 of `[\\w+=,.@-]`), as CloudTrail shows it: the component and the run."""
    return SESSION_NAME.sub("-", f"build-{component}-{run_id[:8]}")[:64]


def mint_build_token(credentials: AwsCredentials, registry: str, *, role_arn: str, repositories: list[str],
                     session: str, lasting_seconds: int) -> RegistryToken:
    """A token minted by a new session of `role_arn` limited to `repositories`; it expires no later than the
    session (the earlier of the two is kept, so a token is never trusted past its credentials)."""
    sts = aws_client(credentials, "sts")
    with carrying_secrets():
        issued = sts.assume_role(RoleArn=role_arn, RoleSessionName=session,
                                 Policy=json.dumps(build_session_policy(registry, repositories)),
                                 DurationSeconds=max(BUILD_SESSION_SECONDS, lasting_seconds))["Credentials"]
        ecr = client_with(credentials, "ecr", issued["AccessKeyId"], issued["SecretAccessKey"],
                          issued["SessionToken"])
        match = ECR_HOST.match(registry)
        response = ecr.get_authorization_token(**({"registryIds": [match["account"]]} if match else {}))
    data = response["authorizationData"][0]
    expires = min(data["expiresAt"], issued["Expiration"].astimezone(timezone.utc))
    return RegistryToken(registry=registry, token=SecretStr(data["authorizationToken"]), expires_at=expires)


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
