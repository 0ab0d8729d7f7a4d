"""A Kubernetes API client for the flow, from a kubeconfig file or the in-cluster service account, and per-request
retries of transient API errors."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from kubernetes_asyncio import client, config, watch
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


class Watch(watch.Watch):
    """A watch that turns events into models with the caller's API client.

    kubernetes_asyncio's own `Watch()` builds a fresh ApiClient for that, with a
    TLS context loaded from the CA bundle, and closes it on exit: about 30 ms of
    CPU on the event loop for every watch the flow opens.
    """

    def __init__(self, api: client.ApiClient) -> None:
        self._raw_return_type = None
        self._stop = False
        self._api_client = api
        self.resource_version = None
        self.resp = None

    async def close(self) -> None:
        if self.resp is not None:
            self.resp.release()
            self.resp = None


def as_dict(api: client.ApiClient, obj) -> dict:
    """A client model as the plain JSON the API server sent."""
    return api.sanitize_for_serialization(obj)


def is_transient_api_error(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and (exc.status in (0, 429) or exc.status >= 500)


T = TypeVar("T")
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)
MAX_RETRY_AFTER = 30.0


def retry_after_seconds(exc: ApiException) -> float | None:
    """The wait an API server asked for in `Retry-After` (it sends one with 429 and some 5xx), at most 30 s."""
    try:
        return min(float((exc.headers or {})["Retry-After"]), MAX_RETRY_AFTER)
    except (KeyError, TypeError, ValueError):
        return None


async def with_retries(call: Callable[[], Awaitable[T]], delays: tuple[float, ...] = RETRY_DELAYS) -> T:
    """`call()`, made again after each transient API error (5xx, 429): after the server's `Retry-After`, else
    after the next of `delays`; when they run out the last error is raised.

    Retrying one request keeps what a build already created in place, where the
    build task's own retry starts over and deletes its Secrets first. A create
    repeated this way may meet the object its lost first answer created (409).
    """
    for delay in delays:
        try:
            return await call()
        except ApiException as exc:
            if not is_transient_api_error(exc):
                raise
            await asyncio.sleep(retry_after_seconds(exc) or delay)
    return await call()
