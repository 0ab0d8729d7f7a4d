"""Upload stage: the context archive into S3 under a content-addressed key, and a short-lived URL to it.

Storing and signing are separate steps: the flow stores the archive while it
waits for a build slot and signs the URL once it has one, so the URL's lifetime
starts when the build does.

The key is `<prefix><component>/<sha256>.tar.gz`, so the same context is stored
once however often it is built, and an object that already exists with the same
size is not uploaded again. When S3 refuses, the error names the object, S3's
answer and what to do about it.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import ClientError
from prefect_aws import AwsCredentials
from pydantic import BaseModel, ConfigDict, SecretStr

from flows.aws import aws_client, credentials_lasting, signing_client
from flows.package import PackagedContext
from flows.secrecy import carrying_secrets


class StoredContext(BaseModel):
    model_config = ConfigDict(frozen=True)

    bucket: str
    key: str
    uploaded: bool

    def describe(self) -> str:
        """Where the context lives, without a URL's signature."""
        return f"s3://{self.bucket}/{self.key}"


class UploadedContext(StoredContext):
    url: SecretStr
    expires_at: datetime
    """When S3 stops serving the URL: its own expiry, or its credentials' when they expire first."""


class ContextUploadFailed(RuntimeError):
    """S3 refused a request of the upload stage; `status` is its HTTP status, None when it sent none."""

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def transient(self) -> bool:
        return self.status is not None and (self.status >= 500 or self.status == 429)


def context_key(prefix: str, component: str, sha256: str) -> str:
    return f"{prefix}{component}/{sha256}.tar.gz"


def _s3_answer(refusal: ClientError) -> str:
    """`HTTP 503 SlowDown (Please reduce your request rate.)`; a HEAD's answer has no code or text of its own."""
    status = refusal.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    error = refusal.response.get("Error", {})
    code, message = error.get("Code", ""), error.get("Message", "")
    answer = f"HTTP {status}" + (f" {code}" if code and code != str(status) else "")
    return f"{answer} ({message})" if message else answer


def _what_to_do(status: int | None, bucket: str, prefix: str) -> str:
    if status == 403:
        return (f"the flow's AWS identity needs s3:PutObject and s3:GetObject on arn:aws:s3:::{bucket}/{prefix}* "
                f"and s3:ListBucket on arn:aws:s3:::{bucket}")
    if status == 404:
        return f"there is no bucket {bucket}: check aws.bucket, or the target block's context bucket"
    if status == 301:
        return f"set aws.region to the region of the bucket {bucket}"
    if status is not None and (status >= 500 or status == 429):
        return ("S3 failed or throttled through every retry; rerun later, and if it persists "
                "check S3 on the AWS Health Dashboard")
    return f"see S3's error code; the request went to the bucket {bucket}"


@contextmanager
def _explained(doing: str, bucket: str, prefix: str) -> Iterator[None]:
    """Raise S3's refusal as ContextUploadFailed.

    boto3 wraps an upload's refusal in S3UploadFailedError, whose text drops the
    status and which no retry policy would recognise as transient."""
    try:
        yield
    except (ClientError, S3UploadFailedError) as exc:
        refusal = exc if isinstance(exc, ClientError) else exc.__context__
        if not isinstance(refusal, ClientError):
            raise ContextUploadFailed(f"S3 refused {doing}: {exc}", None) from exc
        status = refusal.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        raise ContextUploadFailed(
            f"S3 answered {_s3_answer(refusal)} to {doing}. Fix: {_what_to_do(status, bucket, prefix)}", status
        ) from exc


def _existing_size(s3, bucket: str, key: str) -> int | None:
    try:
        return s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def store_context(
    archive: PackagedContext, *, credentials: AwsCredentials, bucket: str, prefix: str, component: str
) -> StoredContext:
    """Put the archive under its content-addressed key, unless an object of the same size is there already."""
    s3 = aws_client(credentials, "s3")
    key = context_key(prefix, component, archive.sha256)
    with _explained(f"the check whether s3://{bucket}/{key} exists", bucket, prefix):
        uploaded = _existing_size(s3, bucket, key) != archive.bytes
    if uploaded:
        with _explained(f"the upload of the build context to s3://{bucket}/{key}", bucket, prefix):
            s3.upload_file(str(archive.path), bucket, key,
                           ExtraArgs={"ChecksumAlgorithm": "SHA256", "ContentType": "application/gzip"})
    return StoredContext(bucket=bucket, key=key, uploaded=uploaded)


def url_expiry(url: str) -> datetime:
    """When a SigV4 presigned URL expires, as it states: X-Amz-Date plus X-Amz-Expires seconds."""
    query = {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}
    signed = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    return signed + timedelta(seconds=int(query["X-Amz-Expires"]))


def presign(credentials: AwsCredentials, stored: StoredContext, ttl_seconds: int) -> UploadedContext:
    """A GET URL for the stored archive that S3 serves for `ttl_seconds`; signing is local, no request to S3.

    Signed with credentials that outlast the URL, refreshed first when needed (CredentialsExpireTooSoon when
    none do), since S3 refuses a URL once the credentials that signed it expire."""
    signing = credentials_lasting(credentials, ttl_seconds)
    with carrying_secrets():
        url = signing_client(credentials, signing).generate_presigned_url(
            "get_object", Params={"Bucket": stored.bucket, "Key": stored.key}, ExpiresIn=ttl_seconds
        )
        expires_at = min(filter(None, (url_expiry(url), signing.expires_at)))
    return UploadedContext(**stored.model_dump(), url=SecretStr(url), expires_at=expires_at)

