"""boto3 clients for the flow: one session per set of credentials, each client made once.

prefect-aws's `AwsCredentials.get_client` starts a new boto3 session for each
client, and every session loads botocore's endpoint and service models from
disk again, a few hundred milliseconds of CPU per client (measured with py-spy
in bench/pipeline_bench.py); components that start together made the same
client at once. Sessions are not thread-safe, so clients are made under a lock;
the clients themselves are. A session is kept at most SESSION_SECONDS, so the
temporary credentials of an assumed role are renewed in a long-lived worker.

S3 clients sign with SigV4: botocore still presigns with SigV2 in the regions
that once accepted it; AWS has deprecated SigV2 for S3, and SigV4 URLs state
their signing time and lifetime (`X-Amz-Date`, `X-Amz-Expires`).

A URL signed with temporary credentials stops working when they expire, whatever
its own lifetime ("the URL expires when the token expires", AWS S3 User Guide,
using-presigned-url.html). `credentials_lasting` finds credentials that last long
enough: botocore refreshes RefreshableCredentials only inside their advisory
window (15 min before expiry) or mandatory one (10 min), and providers such as
AssumeRole hand back what they cached until 15 min before it expires
(botocore/credentials.py v1.43: RefreshableCredentials._refresh,
CachedCredentialFetcher), so credentials with 20 min left are not refreshed for a
30-minute URL; resolving them in a new session asks the provider again.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import boto3
from botocore.config import Config
from botocore.credentials import ReadOnlyCredentials, RefreshableCredentials
from prefect_aws import AwsCredentials

SESSION_SECONDS = 15 * 60
_LOCK = threading.Lock()


class CredentialsExpireTooSoon(RuntimeError):
    """The AWS credentials, refreshed, still expire before a URL signed with them would."""


@dataclass(frozen=True)
class SigningCredentials:
    """Credentials to sign with, fixed, and when they expire (None: they do not, e.g. an IAM user's keys)."""

    frozen: ReadOnlyCredentials
    expires_at: datetime | None
    method: str

    def last(self, seconds: float) -> bool:
        return self.expires_at is None or self.expires_at >= datetime.now(timezone.utc) + timedelta(seconds=seconds)


_fresh: dict[AwsCredentials, SigningCredentials] = {}


def aws_client(credentials: AwsCredentials, service: str):
    with _LOCK:
        return _client(credentials, service, int(time.time() // SESSION_SECONDS))


@functools.lru_cache(maxsize=32)
def _client(credentials: AwsCredentials, service: str, period: int):
    params = credentials.aws_client_parameters.get_params_override()
    if service == "s3":
        sigv4 = Config(signature_version="s3v4")
        params["config"] = params["config"].merge(sigv4) if "config" in params else sigv4
    return _session(credentials, period).client(service, **params)


@functools.lru_cache(maxsize=8)
def _session(credentials: AwsCredentials, period: int) -> boto3.Session:
    return credentials.get_boto3_session()


def _signing(session: boto3.Session) -> SigningCredentials:
    held = session.get_credentials()
    if held is None:
        raise CredentialsExpireTooSoon("no AWS credentials were found (boto3's credential chain found none)")
    frozen = held.get_frozen_credentials()
    expiry = held._expiry_time if isinstance(held, RefreshableCredentials) else None  # no public accessor
    if expiry is not None and expiry.tzinfo is None:
        expiry = expiry.replace(tzinfo=timezone.utc)
    return SigningCredentials(frozen, expiry, getattr(held, "method", "unknown"))


def credentials_lasting(credentials: AwsCredentials, seconds: int) -> SigningCredentials:
    """Credentials that stay valid at least `seconds` from now, refreshed (resolved anew) when needed.

    Raises CredentialsExpireTooSoon, saying what to do, when even fresh ones expire sooner."""
    with _LOCK:
        signing = _signing(_session(credentials, int(time.time() // SESSION_SECONDS)))
        if signing.last(seconds):
            return signing
        if (kept := _fresh.get(credentials)) and kept.last(seconds):
            return kept
        signing = _signing(credentials.get_boto3_session())
        if signing.last(seconds):
            _fresh[credentials] = signing
            return signing
    left = int((signing.expires_at - datetime.now(timezone.utc)).total_seconds())
    shorter = f" or lower aws.presign_ttl_seconds to at most {left}" if left >= 60 else ""
    raise CredentialsExpireTooSoon(
        f"the AWS credentials ({signing.method}) expire at {signing.expires_at:%Y-%m-%d %H:%M:%S}Z, {max(left, 0)} s "
        f"from now even when fetched again, and a context URL signed with them stops working then, before "
        f"aws.presign_ttl_seconds ({seconds}) have passed. Fix: use credentials that last longer than {seconds} s (a "
        f"longer session duration for the role){shorter}"
    )


def signing_client(credentials: AwsCredentials, signing: SigningCredentials):
    """An S3 client that signs with exactly these credentials: what it signs expires when they do, not later."""
    if signing.expires_at is None:
        return aws_client(credentials, "s3")
    with _LOCK:
        return _fixed_client(credentials, signing.frozen, int(time.time() // SESSION_SECONDS))


@functools.lru_cache(maxsize=8)
def _fixed_client(credentials: AwsCredentials, frozen: ReadOnlyCredentials, period: int):
    params = credentials.aws_client_parameters.get_params_override()
    sigv4 = Config(signature_version="s3v4")
    params["config"] = params["config"].merge(sigv4) if "config" in params else sigv4
    return _session(credentials, period).client(
        "s3", aws_access_key_id=frozen.access_key, aws_secret_access_key=frozen.secret_key,
        aws_session_token=frozen.token, **params)


def client_with(credentials: AwsCredentials, service: str, access_key: str, secret_key: str, token: str):
    """A client of `service` for other credentials (e.g. a session of another role), at the same endpoint."""
    params = credentials.aws_client_parameters.get_params_override()
    with _LOCK:
        session = _session(credentials, int(time.time() // SESSION_SECONDS))
        return session.client(service, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                              aws_session_token=token, **params)
