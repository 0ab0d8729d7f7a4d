"""What S3 checks about a request's time and session token, which moto does not check at all.

moto answers a SigV4 presigned URL after X-Amz-Date + X-Amz-Expires, and a request signed with session credentials
after they expired. S3 refuses both, so the sandbox's front (sandbox/aws.py) asks `refusal` before moto answers:

- A presigned URL past X-Amz-Date + X-Amz-Expires: 403 `AccessDenied`, `Request has expired`, with the elements
  `X-Amz-Expires`, `Expires` and `ServerTime` (S3's answer as aws/aws-sdk-js#3493 and versity/versitygw#2116 show it).
- A request signed with temporary credentials after they expired, presigned or not: 400 `ExpiredToken`, `The
  provided token has expired.` (botocore data/s3/2006-03-01/service-2.json, the Error shape's code list, v1.43.117).
  "If you created a presigned URL using a temporary token, then the URL expires when the token expires, even if the
  URL was created with a later expiration time" (AWS S3 User Guide, using-presigned-url.html, "Expiration time for
  presigned URLs"). S3 echoes the token in a `Token-0` element; the stand-in leaves it out, it being a secret.
- A session token S3 never issued: 400 `InvalidToken`, `The provided token is malformed or otherwise invalid.`
  (the same code list).

Only S3 requests are checked: those whose SigV4 credential scope names the `s3` service, and SigV2 presigned URLs
(`AWSAccessKeyId`, `Signature`, `Expires` in epoch seconds, the token in `x-amz-security-token`), which only S3 has.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, urlsplit

AMZ_DATE = "%Y%m%dT%H%M%SZ"
XML_TIME = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str
    details: dict[str, str] = field(default_factory=dict)

    def body(self, request_id: str) -> bytes:
        elements = "".join(f"<{name}>{value}</{name}>" for name, value in self.details.items())
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{self.code}</Code><Message>{self.message}'
                f"</Message>{elements}<RequestId>{request_id}</RequestId><HostId>{request_id}</HostId></Error>").encode()


def _s3_scope(credential: str) -> bool:
    """`AKID/20260101/us-west-2/s3/aws4_request`: the scope's service is the fourth part."""
    parts = credential.split("/")
    return len(parts) == 5 and parts[3] == "s3"


def _header_credential(authorization: str) -> str:
    for part in authorization.removeprefix("AWS4-HMAC-SHA256").split(","):
        name, _, value = part.strip().partition("=")
        if name == "Credential":
            return value
    return ""


def refusal(target: str, headers: Mapping[str, str], now: datetime,
            session_expiry: Callable[[str], datetime | None]) -> Refusal | None:
    """S3's refusal of a request (`target` is the request line's path and query), or None when S3 would serve it.

    `session_expiry(token)` is when the temporary credentials with that session token expire, None for a token
    that was never issued."""
    query = {name: values[0] for name, values in parse_qs(urlsplit(target).query).items()}
    if {"AWSAccessKeyId", "Signature", "Expires"} <= set(query):
        return _sigv2_refusal(query, now, session_expiry)
    presigned = query.get("X-Amz-Algorithm") == "AWS4-HMAC-SHA256"
    credential = query.get("X-Amz-Credential", "") if presigned else _header_credential(
        headers.get("Authorization", ""))
    if not _s3_scope(credential):
        return None
    if presigned:
        signed = datetime.strptime(query["X-Amz-Date"], AMZ_DATE).replace(tzinfo=timezone.utc)
        expires = signed + timedelta(seconds=int(query["X-Amz-Expires"]))
        if now > expires:
            return Refusal(403, "AccessDenied", "Request has expired", {
                "X-Amz-Expires": query["X-Amz-Expires"], "Expires": expires.strftime(XML_TIME),
                "ServerTime": now.strftime(XML_TIME)})
    return _token_refusal(query.get("X-Amz-Security-Token") if presigned else headers.get("X-Amz-Security-Token"),
                          now, session_expiry)


def _sigv2_refusal(query: dict[str, str], now: datetime, session_expiry) -> Refusal | None:
    expires = datetime.fromtimestamp(int(query["Expires"]), timezone.utc)
    if now > expires:
        return Refusal(403, "AccessDenied", "Request has expired",
                       {"Expires": expires.strftime(XML_TIME), "ServerTime": now.strftime(XML_TIME)})
    return _token_refusal(query.get("x-amz-security-token"), now, session_expiry)


def _token_refusal(token: str | None, now: datetime, session_expiry) -> Refusal | None:
    if not token:
        return None
    expiry = session_expiry(token)
    if expiry is None:
        return Refusal(400, "InvalidToken", "The provided token is malformed or otherwise invalid.")
    if now >= expiry:
        return Refusal(400, "ExpiredToken", "The provided token has expired.")
    return None
