"""ECR's side of registry authorization, which moto does not model: who a token speaks for, and what they may do.

moto 5.2.5 (moto/ecr/responses.py get_authorization_token) hands every caller the same token,
`AWS:<account>-auth-token`, that expired in 2015, and answers GetDownloadUrlForLayer with NotImplementedError. ECR's token "represents your IAM
authentication credentials and can be used to access any Amazon ECR registry that your IAM principal has access to.
The authorization token is valid for 12 hours" (ECR API Reference, GetAuthorizationToken), so here:

- GetAuthorizationToken issues a new random password per call and remembers the access key that asked, valid 12 h
  and, for an STS session, no longer than the session (ECR does not document this; the shorter life is the
  stricter stand-in, and the flow never relies on more).
- A registry request with a token is authorized as ECR does it, against the principal that minted it: for an
  assumed role, the role's identity-based policies (moto's IAM) intersected with the session policy given to
  AssumeRole ("The resulting session's permissions are the intersection of the role's identity-based policy and the
  session policies", IAM User Guide, id_credentials_temp_control-access_assumerole.html); a role missing from IAM
  has no policy, so nothing is allowed. The sandbox's own access key stands for the account's administrator.
  A refusal reads as ECR's: `User: <arn> is not authorized to perform: <action> on resource: <repository arn>
  because no session policy allows the <action> action` (the form of aws-actions/amazon-ecr-login#232 and
  ministryofjustice/cloud-platform#7245; the policy types of the IAM User Guide, troubleshoot_access-denied.html).
- Each registry request of a push is the ECR action the push permissions name (ECR User Guide, image-push-iam.html):
  HEAD of a blob is BatchCheckLayerAvailability, POST `blobs/uploads/` InitiateLayerUpload, PATCH UploadLayerPart,
  PUT CompleteLayerUpload, PUT of a manifest PutImage; a pull's GET of a manifest BatchGetImage, of a blob
  GetDownloadUrlForLayer.
- GetDownloadUrlForLayer answers for a digest referenced by an image of the repository (its config or a layer,
  "You can only get URLs for image layers that are referenced in an image", ECR API Reference), else
  LayersNotFoundException; the URL is an S3 presigned GET of the sandbox's layer bucket, through the front, so it
  expires (the front refuses it afterwards). ECR does not document the URL's lifetime; the stand-in's is short.
  The builders store only config blobs (`store_blob`); a layer's URL answers 404.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import boto3

SANDBOX_ACCOUNT = "123456789012"
TOKEN_LIFETIME = timedelta(hours=12)
LAYER_URL_SECONDS = 300
LAYER_BUCKET = "sandbox-ecr-layers"
ADMIN_ARN = f"arn:aws:iam::{SANDBOX_ACCOUNT}:root"

PUSH = (("HEAD", "blobs/{digest}", "ecr:BatchCheckLayerAvailability"),
        ("POST", "blobs/uploads/", "ecr:InitiateLayerUpload"),
        ("PATCH", "blobs/uploads/{upload}", "ecr:UploadLayerPart"),
        ("PUT", "blobs/uploads/{upload}?digest={digest}", "ecr:CompleteLayerUpload"),
        ("PUT", "manifests/{tag}", "ecr:PutImage"))
PULL = (("GET", "manifests/{tag}", "ecr:BatchGetImage"),
        ("GET", "blobs/{digest}", "ecr:GetDownloadUrlForLayer"))


@dataclass(frozen=True)
class Issued:
    access_key_id: str
    expires_at: datetime


@dataclass(frozen=True)
class Refused:
    """A registry request ECR answered 403: which one, and the message of its `DENIED` error."""

    method: str
    url: str
    message: str


_issued: dict[str, Issued] = {}
_lock = threading.Lock()


def install(front_url: str) -> None:
    """Patch moto's ECR responses in this process (the moto server is a ThreadedMotoServer here). The patch is
    process-wide and so are moto's backends: a second sandbox in this process shares them."""
    from moto.ecr.responses import ECRResponse

    ECRResponse.get_authorization_token = _get_authorization_token
    ECRResponse.get_download_url_for_layer = _get_download_url_for_layer
    boto3.client("s3", region_name="us-east-1", endpoint_url=front_url, aws_access_key_id="sandbox-access-key",
                 aws_secret_access_key="sandbox-secret-key").create_bucket(Bucket=LAYER_BUCKET)


def issued_tokens() -> list[str]:
    """Every token issued so far, oldest first, as GetAuthorizationToken answered them (for tests to find them)."""
    with _lock:
        return [base64.b64encode(f"AWS:{password}".encode()).decode() for password in _issued]


def _session(access_key_id: str):
    from moto.sts.models import sts_backends

    for account in list(sts_backends):
        for partition in list(sts_backends[account]):
            if role := sts_backends[account][partition].get_assumed_role_from_access_key(access_key_id):
                return role
    return None


def _get_authorization_token(self):
    from moto.core.responses import ActionResult

    access_key = self.get_access_key()
    expires = datetime.now(timezone.utc) + TOKEN_LIFETIME
    if session := _session(access_key):
        expires = min(expires, session.expiration.replace(tzinfo=timezone.utc))
    data = []
    for registry_id in self._get_param("registryIds") or [self.current_account]:
        password = secrets.token_urlsafe(32)
        with _lock:
            _issued[password] = Issued(access_key, expires)
        data.append({"authorizationToken": base64.b64encode(f"AWS:{password}".encode()).decode(),
                     "expiresAt": expires,
                     "proxyEndpoint": f"https://{registry_id}.dkr.ecr.{self.region}.amazonaws.com"})
    return ActionResult({"authorizationData": data})


def _referenced(repository, digest: str) -> bool:
    for image in repository.images:
        manifest = json.loads(image.image_manifest)
        blobs = [manifest.get("config", {}).get("digest")] + [layer["digest"] for layer in manifest.get("layers", [])]
        if digest in blobs:
            return True
    return False


def _get_download_url_for_layer(self):
    from moto.core.exceptions import ServiceException
    from moto.core.responses import ActionResult

    name, digest = self._get_param("repositoryName"), self._get_param("layerDigest")
    registry_id = self._get_param("registryId") or self.current_account
    repository = self.ecr_backend._get_repository(name, registry_id)  # RepositoryNotFoundException as ECR
    if not _referenced(repository, digest):
        # the text as ECR answers it (monken/aws-ecr-public#11); moto finds the error's service by its module
        error = type("LayersNotFoundException", (ServiceException,),
                     {"code": "LayersNotFoundException", "__module__": "moto.ecr.exceptions"})
        raise error(f"The layer with digest {digest} does not exist within the repository with name '{name}' in "
                    f"the registry with id '{registry_id}'")
    # ECR answers with a presigned S3 URL on the registry's own layer bucket (source: AWS ECR API Reference,
    # GetDownloadUrlForLayer, `downloadUrl`); here it is the S3 front the request came through (sandbox/faultproxy.py
    # forwards Host unchanged), so another sandbox in this process, started and stopped since, cannot leave this
    # one's URLs at a closed port. Its lifetime is LAYER_URL_SECONDS, enforced by that front as S3 would.
    front_url = f"http://{self.headers['Host']}"
    url = boto3.client("s3", region_name="us-east-1", endpoint_url=front_url,
                       aws_access_key_id="sandbox-access-key", aws_secret_access_key="sandbox-secret-key",
                       ).generate_presigned_url("get_object", ExpiresIn=LAYER_URL_SECONDS,
                                                Params={"Bucket": LAYER_BUCKET, "Key": blob_key(registry_id, digest)})
    return ActionResult({"downloadUrl": url, "layerDigest": digest})


def blob_key(account: str, digest: str) -> str:
    return f"{account}/{digest}"


def store_blob(aws, account: str, digest: str, data: bytes) -> None:
    """Keep a pushed blob (an image config) where GetDownloadUrlForLayer's URL serves it."""
    aws.client("s3", "us-east-1").put_object(Bucket=LAYER_BUCKET, Key=blob_key(account, digest), Body=data)


# ------------------------------------------------------------------ who a token speaks for, and what they may do

@dataclass(frozen=True)
class Principal:
    arn: str
    identity_policies: list[str] | None  # None: the account's administrator
    session_policy: str | None


def token_holder(aws, auth: str | None) -> Principal | None:
    """The principal a docker config `auth` (base64 `AWS:<password>`) speaks for; None when ECR would answer 401
    (a password it never issued, or one past its expiry)."""
    try:
        user, _, password = base64.b64decode(auth or "").decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    with _lock:
        issued = _issued.get(password) if user == "AWS" else None
    if issued is None or aws.now() >= issued.expires_at:
        return None
    session = _session(issued.access_key_id)
    if session is None:
        return Principal(ADMIN_ARN, None, None)
    return Principal(session.arn, _role_policies(session.account_id, session.role_arn), session.policy)


def _role_policies(account: str, role_arn: str) -> list[str]:
    from moto.iam.models import iam_backends

    backend = iam_backends[account]["aws"]
    try:
        role = backend.get_role_by_arn(role_arn)
    except Exception:  # noqa: BLE001 - moto's NotFoundException: a role IAM does not have allows nothing
        return []
    return role_policies(role)


def role_policies(owner) -> list[str]:
    """The inline and attached managed policy documents of a moto IAM role, user or group: the identity-based
    policies IAM evaluates for it (source: AWS IAM User Guide, reference_policies_evaluation-logic.html; moto 5.2.5
    iam/models.py Role/User/Group `policies` and `managed_policies`)."""
    return list(owner.policies.values()) + [
        next(v.document for v in policy.versions if v.is_default) for policy in owner.managed_policies.values()]


def caller(access_key_id: str) -> Principal | None:
    """The principal behind an access key: an assumed-role session, which may do what both its role's policies
    and its session policy allow (source: AWS IAM User Guide, id_credentials_temp_control-access_assumerole.html);
    None for the sandbox's own key, the account's administrator."""
    session = _session(access_key_id)
    if session is None:
        return None
    return Principal(session.arn, _role_policies(session.account_id, session.role_arn), session.policy)


def refusal(principal: Principal, action: str, resource: str) -> str | None:
    """ECR's message when `principal` may not do `action` on `resource`, else None (IAM policy evaluation:
    an explicit deny wins, then each policy type must allow)."""
    from moto.iam.access_control import IAMPolicy, PermissionResult

    if principal.identity_policies is None:
        return None
    prefix = f"User: {principal.arn} is not authorized to perform: {action} on resource: {resource}"
    kinds = [("identity-based", principal.identity_policies)]
    if principal.session_policy:
        kinds.append(("session", [principal.session_policy]))
    results = {kind: [IAMPolicy(p).is_action_permitted(action, resource) for p in policies]
               for kind, policies in kinds}
    for kind, answers in results.items():
        if PermissionResult.DENIED in answers:
            return f"{prefix} with an explicit deny in a {kind} policy"
    for kind, answers in results.items():
        if PermissionResult.PERMITTED not in answers:
            return f"{prefix} because no {kind} policy allows the {action} action"
    return None


def repository_arn(region: str, account: str, repository: str) -> str:
    return f"arn:aws:ecr:{region}:{account}:repository/{repository}"


def first_refusal(principal: Principal, requests, registry: str, repository: str, region: str,
                  **names: str) -> Refused | None:
    """The first request of a push (PUSH) or pull (PULL) to `repository` that ECR refuses `principal`."""
    account = registry.split(".", 1)[0]
    for method, path, action in requests:
        message = refusal(principal, action, repository_arn(region, account, repository))
        if message:
            filled = path.format(**{"digest": "", "tag": "", "upload": "", **names})
            return Refused(method, f"https://{registry}/v2/{repository}/{filled}", message)
    return None


def buildkit_text(refused: Refused) -> str:
    """How BuildKit v0.31.2 reports a 403 (containerd remotes/docker/errcode.go unexpectedResponseErr joins
    remotes/errors ErrUnexpectedStatus with the registry's `DENIED` error, `denied: <message>`; a HEAD answer has
    no body, so only the status)."""
    status = f"unexpected status from {refused.method} request to {refused.url}: 403 Forbidden"
    return status if refused.method == "HEAD" else f"{status}\ndenied: {refused.message}"


def kaniko_text(refused: Refused) -> str:
    """How Kaniko's go-containerregistry reports it (pkg/v1/remote/transport/error.go in osscontainertools/kaniko
    v1.28.3's vendor: `<METHOD> <url>: DENIED: <message>`, a HEAD without a body as `unexpected status code ...`)."""
    if refused.method == "HEAD":
        return (f"{refused.method} {refused.url}: unexpected status code 403 Forbidden (HEAD responses have no body, "
                "use GET for details)")
    return f"{refused.method} {refused.url}: DENIED: {refused.message}"
