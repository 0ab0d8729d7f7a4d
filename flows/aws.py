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
"""

from __future__ import annotations

import functools
import threading
import time

import boto3
from botocore.config import Config
from prefect_aws import AwsCredentials

SESSION_SECONDS = 15 * 60
_LOCK = threading.Lock()


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
