"""A Kubernetes API emulator for the local sandbox: real kubectl, helm and
kubernetes_asyncio talk to it over HTTP on 127.0.0.1."""

from .emulator import KubeEmulator
from .errors import ApiError
from .pods import PodHandle
from .server import RequestRecord

__all__ = ["ApiError", "KubeEmulator", "PodHandle", "RequestRecord"]
