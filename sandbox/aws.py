"""S3, ECR and STS for the sandbox: moto in server mode on 127.0.0.1, spoken to over real HTTP.

Everyone reaches moto through a front, a FaultProxy whose `refuse` is sandbox/presign.py: the flow, the tests and
the simulated build pods, which download the context from the presigned URL the flow signed against `url`. The
front refuses what S3 refuses and moto serves: an expired presigned URL, and a request signed with session
credentials (from moto's STS, AssumeRole) after they expired. `clock_offset` moves the front's clock, so a test
can see an hour-long URL or credential expire without waiting.

Source: the AWS S3 User Guide, using-presigned-url.html (docs.aws.amazon.com), for what the front refuses;
moto 5.2.5 moto/sts/models.py (AssumedRole.expiration) for when session credentials expire.

moto 5.2.5 does not implement IAM SimulatePrincipalPolicy (moto/core/responses.py call_action raises
NotImplementedError, an HTTP 500); `_install_policy_simulation` answers it, see there.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import boto3
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from prefect_aws import AwsClientParameters, AwsCredentials

from flows.config import PipelineConfig
from flows.doctor.aws import add_lifecycle_rule
from flows.registry_auth import PUSH_AND_PULL_ACTIONS
from sandbox import ecr_auth
from sandbox.faultproxy import FaultProxy
from sandbox.presign import refusal

SANDBOX_KEY = "sandbox-access-key"
BUILD_ROLE_ARN = f"arn:aws:iam::{ecr_auth.SANDBOX_ACCOUNT}:role/buildkit-pipeline-build"


class AwsSandbox:
    def __init__(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.front: FaultProxy | None = None
        self.clock_offset = timedelta(0)
        self.url = ""

    def start(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        _ecr_image_sizes_from_layers()
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.front = FaultProxy(f"http://{host}:{port}", refuse=self._refusal).start()
        self.url = self.front.url
        ecr_auth.install(self.url)
        _install_policy_simulation()

    def stop(self) -> None:
        if self.front is not None:
            self.front.stop()
        self._server.stop()

    def now(self) -> datetime:
        """The front's clock: the real time, moved by `clock_offset`."""
        return datetime.now(timezone.utc) + self.clock_offset

    @contextlib.contextmanager
    def later(self, seconds: float) -> Iterator[None]:
        """The front's clock `seconds` ahead, for what S3 checks against its own clock."""
        self.clock_offset += timedelta(seconds=seconds)
        try:
            yield
        finally:
            self.clock_offset -= timedelta(seconds=seconds)

    def _refusal(self, target: str, headers):
        return refusal(target, headers, self.now(), session_expiry)

    def credentials(self, region: str) -> AwsCredentials:
        return sandbox_credentials(self.url, region)

    def client(self, service: str, region: str):
        return boto3.client(
            service,
            region_name=region,
            endpoint_url=self.url,
            aws_access_key_id=SANDBOX_KEY,
            aws_secret_access_key="sandbox-secret-key",
        )

    def provision(self, config: PipelineConfig) -> None:
        """Create what a real account would already have: the context bucket and the ECR repositories."""
        s3 = self.client("s3", config.aws.region)
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        if config.aws.bucket not in existing:
            location = {} if config.aws.region == "us-east-1" else {
                "CreateBucketConfiguration": {"LocationConstraint": config.aws.region}
            }
            s3.create_bucket(Bucket=config.aws.bucket, **location)
        # README "Pointing it at a real EKS cluster", step 5: the contexts expire (the rule `doctor --fix` adds)
        add_lifecycle_rule(s3, config.aws.bucket, config.aws.prefix)
        self.provision_build_role()
        ecr = self.client("ecr", config.aws.region)
        repositories = {r["repositoryName"] for r in ecr.describe_repositories().get("repositories", [])}
        for component in config.components:
            if component.image not in repositories:
                ecr.create_repository(repositoryName=component.image)
                repositories.add(component.image)


    def provision_build_role(self) -> None:
        """The role builds' tokens are minted from (README, Security): trusted by the account, allowed to push and
        pull every repository of the account; each build's session policy narrows it to its own."""
        iam = self.client("iam", "us-east-1")
        name = BUILD_ROLE_ARN.rpartition("/")[2]
        try:
            iam.get_role(RoleName=name)
            return
        except iam.exceptions.NoSuchEntityException:
            pass
        trust = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": "sts:AssumeRole",
            "Principal": {"AWS": f"arn:aws:iam::{ecr_auth.SANDBOX_ACCOUNT}:root"}}]}
        iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))
        iam.put_role_policy(RoleName=name, PolicyName="ecr-push-pull", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "ecr:GetAuthorizationToken", "Resource": "*"},
                {"Effect": "Allow", "Action": list(PUSH_AND_PULL_ACTIONS),
                 "Resource": f"arn:aws:ecr:*:{ecr_auth.SANDBOX_ACCOUNT}:repository/*"}]}))


def sandbox_credentials(url: str, region: str) -> AwsCredentials:
    """Credentials for a sandbox's moto server, also from another process that only knows its URL."""
    return AwsCredentials(
        aws_access_key_id=SANDBOX_KEY,
        aws_secret_access_key="sandbox-secret-key",
        region_name=region,
        aws_client_parameters=AwsClientParameters(endpoint_url=url),
    )


def session_expiry(token: str) -> datetime | None:
    """When the temporary credentials with this session token expire, as moto's STS issued them (AssumeRole)."""
    from moto.sts.models import sts_backends

    for account in list(sts_backends):
        for partition in list(sts_backends[account]):
            for role in sts_backends[account][partition].assumed_roles:
                if role.session_token == token:
                    return role.expiration.replace(tzinfo=timezone.utc)
    return None


def _layers_total(image) -> int | None:
    manifest = json.loads(image.image_manifest)
    return sum(layer["size"] for layer in manifest["layers"]) if "layers" in manifest else None


def _ecr_image_sizes_from_layers() -> None:
    """Make moto's `imageSizeInBytes` ECR's: the sum of the pushed compressed layers (the DescribeImages docs).

    moto 5 answers with the manifest's `config.size` instead, which would make the size a few hundred bytes. The
    moto server runs in this process (ThreadedMotoServer), so patching its model is enough.
    """
    from moto.ecr.models import Image

    Image.get_image_size_in_bytes = _layers_total


def _install_policy_simulation() -> None:
    """IAM SimulatePrincipalPolicy for moto's IAM (process-wide, as ecr_auth.install).

    Source: IAM API Reference, SimulatePrincipalPolicy (botocore 1.43.117 data/iam/2010-05-08/service-2.json):
    the entity is a user (its inline, managed and groups' policies) or a role (inline and managed); its answer is
    one EvaluationResult per action and resource, EvalDecision `allowed`, `explicitDeny` or `implicitDeny`; an
    entity that does not exist is NoSuchEntity. The caller needs iam:SimulatePrincipalPolicy: an assumed-role
    session without it is refused (AccessDenied, 403) as ECR's stand-in refuses (sandbox/ecr_auth.py refusal), so
    a flow's role that may not simulate falls back to what it may do. Not modelled: permissions boundaries,
    SCPs, condition context keys (no `ContextEntries`), resource policies.
    """
    from moto.iam.responses import IamResponse

    IamResponse.simulate_principal_policy = _simulate_principal_policy


def _entity_policies(backend, arn: str) -> list[str]:
    from moto.iam.exceptions import NotFoundException

    kind, _, name = arn.split(":", 5)[5].partition("/")
    name = name.rpartition("/")[2]
    if kind == "role":
        role = backend.get_role_by_arn(arn)
        return ecr_auth.role_policies(role)
    if kind == "user":
        user = backend.get_user(name)
        owners = [user, *backend.get_groups_for_user(name)]
        return [document for owner in owners for document in ecr_auth.role_policies(owner)]
    raise NotFoundException(f"The entity {arn} cannot be found.")


def _decision(policies: list[str], action: str, resource: str) -> str:
    from moto.iam.access_control import IAMPolicy, PermissionResult

    answers = [IAMPolicy(p).is_action_permitted(action, resource) for p in policies]
    if PermissionResult.DENIED in answers:
        return "explicitDeny"
    return "allowed" if PermissionResult.PERMITTED in answers else "implicitDeny"


def _simulate_principal_policy(self):
    from moto.core.exceptions import ServiceException
    from moto.core.responses import ActionResult

    source = self._get_param("PolicySourceArn")
    caller = ecr_auth.caller(self.get_access_key())
    if caller is not None and (refused := ecr_auth.refusal(caller, "iam:SimulatePrincipalPolicy", source)):
        error = type("AccessDenied", (ServiceException,), {"code": "AccessDenied", "__module__": "moto.iam.exceptions"})
        raise error(refused)
    policies = _entity_policies(self.backend, source)
    actions = self._get_param("ActionNames", [])
    resources = self._get_param("ResourceArns", []) or ["*"]
    results = [{"EvalActionName": action, "EvalResourceName": resource,
                "EvalDecision": _decision(policies, action, resource), "MatchedStatements": [],
                "MissingContextValues": []}
               for action in actions for resource in resources]
    return ActionResult({"EvaluationResults": results, "IsTruncated": False})
