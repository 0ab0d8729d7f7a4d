"""Upload stage: the context archive into S3 under a content-addressed key, and a short-lived URL to it.

The key is `<prefix><component>/<sha256>.tar.gz`, so the same context is stored
once however often it is built, and an object that already exists with the same
size is not uploaded again.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from botocore.exceptions import ClientError
from prefect_aws import AwsCredentials, S3Bucket
from pydantic import BaseModel, ConfigDict, SecretStr

from flows.package import PackagedContext


class UploadedContext(BaseModel):
    model_config = ConfigDict(frozen=True)

    bucket: str
    key: str
    url: SecretStr
    expires_at: datetime
    uploaded: bool

    def describe(self) -> str:
        """Where the context lives, without the URL's signature."""
        return f"s3://{self.bucket}/{self.key}"


def context_key(prefix: str, component: str, sha256: str) -> str:
    return f"{prefix}{component}/{sha256}.tar.gz"


def _existing_size(s3, bucket: str, key: str) -> int | None:
    try:
        return s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def upload_context(
    archive: PackagedContext,
    *,
    credentials: AwsCredentials,
    bucket: str,
    prefix: str,
    component: str,
    ttl_seconds: int,
) -> UploadedContext:
    s3 = credentials.get_s3_client()
    key = context_key(prefix, component, archive.sha256)
    uploaded = _existing_size(s3, bucket, key) != archive.bytes
    if uploaded:
        S3Bucket(bucket_name=bucket, credentials=credentials).upload_from_path(
            archive.path, key, ExtraArgs={"ChecksumAlgorithm": "SHA256", "ContentType": "application/gzip"}, _sync=True
        )
    url = s3.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=ttl_seconds
    )
    return UploadedContext(
        bucket=bucket,
        key=key,
        url=SecretStr(url),
        expires_at=datetime.now(timezone.utc) + timedelta(seconds=ttl_seconds),
        uploaded=uploaded,
    )
