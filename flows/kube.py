"""A Kubernetes API client for the flow, from a kubeconfig file or the in-cluster service account."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException


@asynccontextmanager
async def kube_api(kubeconfig: str | None) -> AsyncIterator[client.ApiClient]:
    configuration = client.Configuration()
    if kubeconfig:
        await config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            await config.load_kube_config(client_configuration=configuration)
    async with client.ApiClient(configuration) as api:
        yield api


def as_dict(api: client.ApiClient, obj) -> dict:
    """A client model as the plain JSON the API server sent."""
    return api.sanitize_for_serialization(obj)


def is_transient_api_error(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and (exc.status in (0, 429) or exc.status >= 500)
