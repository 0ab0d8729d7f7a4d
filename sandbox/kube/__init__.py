"""A Kubernetes API emulator for the local sandbox: real kubectl, helm and
kubernetes_asyncio talk to it over HTTP on 127.0.0.1.

It is written for this project rather than built on kmock 0.8, which could not
be extended far enough: kmock decodes every request body as text before any
hook runs (helm and kubectl send protobuf), cannot parse `/api/v1/namespaces`,
keeps no resourceVersions (so no watch resume and no 410 Gone), and patches
aiohttp's resolver process-wide while it runs, which would reach the Prefect
and Kubernetes clients in the same process.
"""

from .emulator import KubeEmulator
from .errors import ApiError
from .pods import PodHandle
from .server import RequestRecord

__all__ = ["ApiError", "KubeEmulator", "PodHandle", "RequestRecord"]
