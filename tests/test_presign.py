"""A presigned context URL lives no longer than the credentials that signed it.

The sandbox's front refuses what S3 refuses (sandbox/presign.py): a URL past X-Amz-Date + X-Amz-Expires, and one
signed with session credentials after they expired. The flow signs with credentials that outlast the URL, fetching
them again when needed, and fails before anything is uploaded or built when even fresh ones expire too soon.
Temporary credentials come from moto's STS (AssumeRole) through a `credential_process` profile, so botocore holds
them as RefreshableCredentials with their real expiry, as it does for a role on EKS.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import boto3
import pytest
from botocore.config import Config
from prefect_aws import AwsClientParameters, AwsCredentials

from flows.aws import CredentialsExpireTooSoon
from flows.upload import StoredContext, presign, url_expiry
from sandbox.aws import SANDBOX_KEY
from sandbox.example import commit_all
from tests.conftest import jobs
from tests.test_security import context_url, url_query

MCP = "weather-mcp"
REGION = "us-west-2"
ROLE = "arn:aws:iam::123456789012:role/buildkit-pipeline"

CREDENTIAL_PROCESS = '''
import json, sys
from pathlib import Path
import boto3
state = Path(sys.argv[1])
calls = state / "keys"
done = calls.read_text().splitlines() if calls.exists() else []
durations = json.loads((state / "durations").read_text())
sts = boto3.client("sts", region_name="us-west-2", endpoint_url=(state / "endpoint").read_text(),
                   aws_access_key_id="sandbox-access-key", aws_secret_access_key="sandbox-secret-key")
issued = sts.assume_role(RoleArn=sys.argv[2], RoleSessionName=f"pipeline-{len(done)}",
                         DurationSeconds=durations[min(len(done), len(durations) - 1)])["Credentials"]
calls.write_text("".join(line + "\\n" for line in done + [issued["AccessKeyId"]]))
print(json.dumps({"Version": 1, "AccessKeyId": issued["AccessKeyId"], "SecretAccessKey": issued["SecretAccessKey"],
                  "SessionToken": issued["SessionToken"], "Expiration": issued["Expiration"].isoformat()}))
'''


@dataclass
class RoleProfile:
    """An AWS profile whose credentials are a role session from the sandbox's STS, lasting `durations[i]` s on the
    i-th fetch (the last one thereafter), as `credential_process` hands them to botocore."""

    credentials: AwsCredentials
    state: Path

    @property
    def keys(self) -> list[str]:
        """The access key ids issued so far, in order."""
        path = self.state / "keys"
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def role_profile(tmp_path, sandbox, monkeypatch):
    def make(*durations: int) -> RoleProfile:
        state = tmp_path / "role"
        state.mkdir()
        (state / "durations").write_text(json.dumps(list(durations)))
        (state / "endpoint").write_text(sandbox.aws.url)
        script = tmp_path / "credential_process.py"
        script.write_text(CREDENTIAL_PROCESS)
        name = f"role-{tmp_path.name}"  # a profile per test: flows.aws keeps a session per credentials
        config = tmp_path / "aws-config"
        config.write_text(f"[profile {name}]\ncredential_process = {sys.executable} {script} {state} {ROLE}\n"
                          f"region = {REGION}\n")
        monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
        credentials = AwsCredentials(profile_name=name, region_name=REGION,
                                     aws_client_parameters=AwsClientParameters(endpoint_url=sandbox.aws.url))
        return RoleProfile(credentials, state)
    return make


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read()


def s3_client(sandbox, **credentials):
    keys = credentials or {"aws_access_key_id": SANDBOX_KEY, "aws_secret_access_key": "sandbox-secret-key"}
    return boto3.client("s3", region_name=REGION, endpoint_url=sandbox.aws.url,
                        config=Config(signature_version="s3v4"), **keys)


@pytest.fixture
def stored(sandbox, tmp_path) -> StoredContext:
    bucket = f"presign-{tmp_path.name.lower().replace('_', '-')}"[:63].rstrip("-")
    s3 = s3_client(sandbox)
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    s3.put_object(Bucket=bucket, Key="build/ctx.tar.gz", Body=b"context")
    return StoredContext(bucket=bucket, key="build/ctx.tar.gz", uploaded=True)


# ---------------------------------------------------------------- the stand-in: S3's refusals


def test_s3_refuses_a_presigned_url_past_its_x_amz_expires(sandbox, stored):
    url = s3_client(sandbox).generate_presigned_url(
        "get_object", Params={"Bucket": stored.bucket, "Key": stored.key}, ExpiresIn=60)
    assert get(url) == (200, b"context")
    # X-Amz-Date is in whole seconds and a loaded machine takes a second or two between signing and asking: 50 s
    # on, the URL still works; 61 s on, it has expired whatever the delay
    with sandbox.aws.later(50):
        assert get(url) == (200, b"context")
    with sandbox.aws.later(61):
        status, body = get(url)
    assert status == 403
    assert b"<Code>AccessDenied</Code><Message>Request has expired</Message><X-Amz-Expires>60</X-Amz-Expires>" in body
    assert f"<Expires>{url_expiry(url):%Y-%m-%dT%H:%M:%SZ}</Expires>".encode() in body


def test_s3_refuses_a_url_signed_with_session_credentials_once_they_expire(sandbox, stored):
    """An hour-long URL signed with a 15-minute role session works for 15 minutes (moto would serve it an hour)."""
    sts = boto3.client("sts", region_name=REGION, endpoint_url=sandbox.aws.url, aws_access_key_id=SANDBOX_KEY,
                       aws_secret_access_key="sandbox-secret-key")
    issued = sts.assume_role(RoleArn=ROLE, RoleSessionName="presign-test", DurationSeconds=900)["Credentials"]
    role = s3_client(sandbox, aws_access_key_id=issued["AccessKeyId"], aws_secret_access_key=issued["SecretAccessKey"],
                     aws_session_token=issued["SessionToken"])
    params = {"Bucket": stored.bucket, "Key": stored.key}
    url = role.generate_presigned_url("get_object", Params=params, ExpiresIn=3600)
    by_user = s3_client(sandbox).generate_presigned_url("get_object", Params=params, ExpiresIn=3600)
    assert get(url) == (200, b"context")
    left = (issued["Expiration"] - datetime.now(timezone.utc)).total_seconds()
    with sandbox.aws.later(left - 30):
        assert get(url) == (200, b"context")
    with sandbox.aws.later(left + 1):
        status, body = get(url)
        assert get(by_user) == (200, b"context"), "an IAM user's URL lives its X-Amz-Expires"
        with pytest.raises(role.exceptions.ClientError, match="ExpiredToken"):
            role.get_object(**params)
    assert status == 400
    assert b"<Code>ExpiredToken</Code><Message>The provided token has expired.</Message>" in body
    assert issued["SessionToken"].encode() not in body

    parts = urlsplit(url)
    query = parse_qs(parts.query)
    query["X-Amz-Security-Token"] = ["A" * 20 + query["X-Amz-Security-Token"][0][20:]]
    forged = urlunsplit(parts._replace(query=urlencode(query, doseq=True)))
    assert forged != url
    assert get(forged)[0] == 400 and b"<Code>InvalidToken</Code>" in get(forged)[1]


# ---------------------------------------------------------------- the flow: sign with credentials that last


def test_presign_fetches_credentials_again_when_they_would_expire_before_the_url(sandbox, stored, role_profile):
    """20 minutes left is outside botocore's own refresh windows (15 and 10 minutes), so only the flow refetches."""
    profile = role_profile(1200, 3600)

    uploaded = presign(profile.credentials, stored, 1800)

    url = uploaded.url.get_secret_value()
    first, second = profile.keys
    assert url_query(url)["X-Amz-Credential"].startswith(f"{second}/"), "signed with the refetched credentials"
    assert uploaded.expires_at == url_expiry(url), "the URL expires first: its expiry is the real one"
    assert url_expiry(url) - datetime.strptime(url_query(url)["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
        tzinfo=timezone.utc) == timedelta(seconds=1800)
    with sandbox.aws.later(1800 - 30):
        assert get(url) == (200, b"context")

    again = presign(profile.credentials, stored, 1800)
    assert profile.keys == [first, second], "credentials that still last are not fetched again"
    assert url_query(again.url.get_secret_value())["X-Amz-Credential"].startswith(f"{second}/")


def test_presign_refuses_credentials_that_expire_before_the_url_even_fetched_again(sandbox, stored, role_profile):
    profile = role_profile(900)

    with pytest.raises(CredentialsExpireTooSoon) as refused:
        presign(profile.credentials, stored, 1800)

    message = str(refused.value)
    assert "before aws.presign_ttl_seconds (1800) have passed" in message
    assert "Fix: use credentials that last longer than 1800 s" in message
    assert re.search(r"lower aws.presign_ttl_seconds to at most 8\d\d$", message)  # 900 s, less what it took
    assert len(profile.keys) >= 2, "fetched again before giving up"
    shorter = presign(profile.credentials, stored, 600)
    assert shorter.expires_at == url_expiry(shorter.url.get_secret_value()), "a 10-minute URL they do outlast"


def test_a_run_whose_credentials_cannot_outlast_the_url_fails_before_uploading(
    prefect_server, sandbox, example_app, role_profile
):
    app, profile = example_app, role_profile(900)
    app.pipeline_file.write_text(app.pipeline_file.read_text().replace(
        "prefix: build/}", "prefix: build/, presign_ttl_seconds: 1800}"))
    commit_all(app.root, "A half-hour context URL")

    app.flow_kwargs["aws_credentials"] = profile.credentials
    state = app.run(components=[MCP], deploy=False)

    assert state.is_failed()
    assert isinstance(state.result(raise_on_failure=False), CredentialsExpireTooSoon)
    assert "aws.presign_ttl_seconds (1800)" in state.message
    s3 = s3_client(sandbox)
    assert s3.list_objects_v2(Bucket=app.config.aws.bucket).get("KeyCount") == 0
    assert jobs(sandbox, app) == []


def test_a_run_signs_with_refetched_credentials_and_the_build_pod_downloads_through_s3_s_checks(
    prefect_server, sandbox, example_app, role_profile
):
    app, profile = example_app, role_profile(1200, 3600)
    app.pipeline_file.write_text(app.pipeline_file.read_text().replace(
        "prefix: build/}", "prefix: build/, presign_ttl_seconds: 1800}"))
    commit_all(app.root, "A half-hour context URL")
    served_before = len(sandbox.aws.front.log)

    app.flow_kwargs["aws_credentials"] = profile.credentials
    state = app.run(components=[MCP], deploy=False)

    [mcp] = state.result().components
    [job] = jobs(sandbox, app, MCP)
    url = context_url(sandbox, job)
    first, second = profile.keys
    assert url_query(url)["X-Amz-Credential"].startswith(f"{second}/"), "not the 20-minute credentials"
    assert "X-Amz-Security-Token" in url_query(url)
    key = f"/{app.config.aws.bucket}/build/{MCP}/{mcp.archive_sha256}.tar.gz"
    assert ("GET", key, 200) in [tuple(s) for s in sandbox.aws.front.log[served_before:]], \
        "the build pod's download went through the front that checks expiry"
