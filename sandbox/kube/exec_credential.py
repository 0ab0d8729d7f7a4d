"""The sandbox's `aws eks get-token`: an exec credential plugin, and the emulator's check of its tokens.

Run by a kubeconfig's `users[].user.exec` (`KubeEmulator.write_exec_kubeconfig`), it prints an ExecCredential
with a bearer token for an IAM principal and the time the client must ask again, as `aws eks get-token` does:

- aws/aws-cli awscli/customizations/eks/get_token.py (v2): the token is `k8s-aws-v1.` plus a presigned STS
  GetCallerIdentity URL, base64url without padding; `status.expirationTimestamp` is 14 minutes from now,
  `%Y-%m-%dT%H:%M:%SZ` (whole seconds), one minute before the token stops working; the ExecCredential's
  `apiVersion` is the one in `KUBERNETES_EXEC_INFO` (v1 or v1beta1; without it, v1beta1).
- kubernetes-sigs/aws-iam-authenticator pkg/token/token.go (master): the server accepts the token for 15 minutes
  after its `X-Amz-Date`, by its own clock, whatever the client was told.
- kubernetes/client-go pkg/apis/clientauthentication/v1/types.go (v0.35.2): `status.token`,
  `status.expirationTimestamp`.

Here the token is signed with a key the emulator holds (the key file plays the AWS credentials the real plugin signs
with), and it names its own lifetime so that a test can choose seconds where EKS has 15 minutes; the
expirationTimestamp keeps the real ratio (14/15 of the lifetime, whole seconds). Standard library only: helm and
kubectl run this file with any python3.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import hmac
import json
import os
import sys
import time

PREFIX = "k8s-sandbox-v1."
V1, V1BETA1 = "client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1"
REPORTED_FRACTION = 14 / 15  # aws-cli TOKEN_EXPIRATION_MINS = 14 of STS's 15 minutes


class InvalidToken(Exception):
    pass


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint(key: bytes, principal: str, lifetime_seconds: float, now: float | None = None) -> str:
    payload = _b64(json.dumps({"principal": principal, "issued": time.time() if now is None else now,
                               "seconds": lifetime_seconds}, sort_keys=True).encode())
    return PREFIX + payload + "." + _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())


def verify(key: bytes, token: str) -> tuple[str, float, float]:
    """(principal, issued, expires) of a token this key signed; InvalidToken otherwise. Expiry is the caller's."""
    if not token.startswith(PREFIX):
        raise InvalidToken(f"token is missing expected {PREFIX!r} prefix")
    payload, _, signature = token[len(PREFIX):].partition(".")
    try:
        expected = hmac.new(key, payload.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(signature)):
            raise InvalidToken("signature does not match")
        claims = json.loads(_unb64(payload))
        return claims["principal"], float(claims["issued"]), float(claims["issued"]) + float(claims["seconds"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidToken(f"malformed token: {exc}") from None


def reported_expiry(issued: float, lifetime_seconds: float) -> str:
    """What the plugin tells the client: 14/15 of the lifetime, in whole seconds (rounded down, as strftime)."""
    moment = datetime.datetime.fromtimestamp(issued + lifetime_seconds * REPORTED_FRACTION, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def api_version(exec_info: str | None) -> str:
    """aws-cli `discover_api_version`: the version the client asked for, v1beta1 when it asked for none."""
    try:
        asked = json.loads(exec_info or "{}").get("apiVersion")
    except ValueError:
        asked = None
    return asked if asked in (V1, V1BETA1) else V1BETA1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="exec_credential", description=__doc__.splitlines()[0])
    parser.add_argument("--principal", required=True, help="the IAM principal ARN the token is for")
    parser.add_argument("--lifetime-seconds", type=float, required=True)
    parser.add_argument("--key-file", required=True)
    args = parser.parse_args(argv)
    with open(args.key_file, "rb") as handle:
        key = handle.read()
    issued = time.time()
    credential = {"kind": "ExecCredential", "apiVersion": api_version(os.environ.get("KUBERNETES_EXEC_INFO")),
                  "spec": {}, "status": {"expirationTimestamp": reported_expiry(issued, args.lifetime_seconds),
                                         "token": mint(key, args.principal, args.lifetime_seconds, issued)}}
    sys.stdout.write(json.dumps(credential) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
