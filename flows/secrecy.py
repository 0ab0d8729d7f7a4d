"""Keeping secrets out of logs: `carrying_secrets` for the AWS and Kubernetes clients' DEBUG output of calls that
carry them, and `withhold_presigned_query` for build logs that print a presigned URL."""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

_CARRYING_SECRETS: ContextVar[bool] = ContextVar("carrying_secrets", default=False)
BODY_LOGGERS = ("botocore.auth", "botocore.endpoint", "botocore.parsers", "kubernetes_asyncio.client.rest")
WITHHELD = "(debug output withheld: the call carries a secret)"
QUERY_WITHHELD = "?<presigned query withheld>"
_PRESIGNED_QUERY = re.compile(r"(https?://[^\s\"?]+)\?[^\s\"]*X-Amz-Signature=[^\s\"]*")


def withhold_presigned_query(text: str) -> str:
    """A presigned URL's query (its signature) replaced: builders print the context URL when its download fails."""
    return _PRESIGNED_QUERY.sub(lambda found: found[1] + QUERY_WITHHELD, text)


class _WithholdSecretTraffic(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO and _CARRYING_SECRETS.get():
            record.msg, record.args = WITHHELD, ()
        return True


_WITHHOLD = _WithholdSecretTraffic()
for _name in BODY_LOGGERS:
    logging.getLogger(_name).addFilter(_WITHHOLD)


@contextmanager
def carrying_secrets() -> Iterator[None]:
    """Withhold the DEBUG records in which the AWS and Kubernetes clients print bodies and signatures.

    At DEBUG, botocore logs every response body (an ECR token, a Secrets Manager
    value) and every SigV4 signature (a presigned URL's), and kubernetes_asyncio
    logs every response body (a Secret's data, a Job's presigned URL), before the
    caller has seen the value, so nothing can be redacted by value. The switch is a
    ContextVar: it follows the calls into `asyncio.to_thread` and into tasks created
    inside, and leaves the records of concurrent calls outside alone.
    """
    token = _CARRYING_SECRETS.set(True)
    try:
        yield
    finally:
        _CARRYING_SECRETS.reset(token)
