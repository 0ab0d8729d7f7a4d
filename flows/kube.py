"""A Kubernetes API client for the flow, from a kubeconfig file or the in-cluster service account, and per-request
retries of transient API errors."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.dateutil import parse_rfc3339
from kubernetes_asyncio.config.exec_provider import ExecProvider

BEARER = "BearerToken"


@asynccontextmanager
async def kube_api(kubeconfig: str | None) -> AsyncIterator[client.ApiClient]:
    configuration = client.Configuration()
    loader = None
    if kubeconfig:
        loader = await config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            loader = await config.load_kube_config(client_configuration=configuration)
    async with client.ApiClient(configuration) as api:
        # kubernetes_asyncio's own refresh_token() reads the exec config from the loader's `_user` too
        user = loader._user if loader is not None else None
        if user is not None and "exec" in user and BEARER in configuration.api_key:
            ExecCredential(user["exec"], configuration, getattr(loader, "exec_plugin_expiry", None)).install(api)
        yield api


class ExecCredential:
    """The token of a kubeconfig's exec plugin (`aws eks get-token`), fetched again when it expires or is refused.

    kubernetes_asyncio 36.1.0 runs the plugin once, when the kubeconfig is loaded (config/kube_config.py
    `load_from_exec_plugin`); only its `refresh_token()` loop, which nothing starts for us, runs it again
    (tomplus/kubernetes_asyncio#257), so a run longer than an EKS token (15 minutes) got 401 on every request
    after it. client-go runs the plugin again once `status.expirationTimestamp` has passed and after a 401, unless
    the token was replaced meanwhile (kubernetes/client-go plugin/pkg/client/auth/exec/exec.go v0.35.2 `getCreds`,
    `maybeRefreshCreds`); this does the same, before every request (the configuration's `refresh_api_key_hook`)
    and on a 401, and sends the refused request once more with the new token, which client-go leaves to its
    caller. The request layer is where watches and log follows are opened too, so a watch opened again after its
    stream ended gets the current token. `aws eks get-token` reports the expiry a minute before the token stops
    working (aws/aws-cli awscli/customizations/eks/get_token.py), so the expiry needs no margin of its own.
    """

    def __init__(self, exec_config, configuration: client.Configuration,
                 expires: datetime.datetime | None) -> None:
        self._provider = ExecProvider(exec_config)
        self._configuration = configuration
        self._expires = expires
        self._lock = asyncio.Lock()

    def install(self, api: client.ApiClient) -> None:
        self._configuration.refresh_api_key_hook = self._before_request
        api.exec_credential = self
        send = api.rest_client.request

        async def request(method, url, query_params=None, headers=None, **kwargs):
            sent = (headers or {}).get("authorization")
            try:
                response = await send(method, url, query_params=query_params, headers=headers, **kwargs)
            except ApiException as exc:
                if exc.status != 401 or sent is None:
                    raise
            else:
                if response.status != 401 or sent is None:
                    return response
                response.release()  # a watch or log follow (not preloaded) answered 401
            headers["authorization"] = await self.renew(sent)
            return await send(method, url, query_params=query_params, headers=headers, **kwargs)

        api.rest_client.request = request

    def _expired(self) -> bool:
        return self._expires is not None and datetime.datetime.now(datetime.UTC) >= self._expires

    async def _before_request(self, configuration: client.Configuration) -> None:
        if self._expired():
            async with self._lock:
                if self._expired():
                    await self._run_plugin()

    async def renew(self, refused: str) -> str:
        """The header value to send instead of `refused`: a new token, unless another request already got one."""
        async with self._lock:
            if self._configuration.api_key.get(BEARER) == refused:
                await self._run_plugin()
            return self._configuration.api_key[BEARER]

    async def _run_plugin(self) -> None:
        status = await self._provider.run()
        if "token" not in status:
            raise config.ConfigException("exec: the plugin gave no token when it was run again")
        self._configuration.api_key[BEARER] = f"Bearer {status['token']}"
        expires = status.get("expirationTimestamp")
        self._expires = parse_rfc3339(expires) if expires else None


def tls_context(configuration: client.Configuration) -> ssl.SSLContext:
    """The TLS settings the API client uses (cluster CA, client certificate), for another HTTP client to the same
    server; built as kubernetes_asyncio 36.1.0 client/rest.py `RESTClientObject.__init__` builds its own."""
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, keyfile=configuration.key_file)
    if not configuration.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if configuration.disable_strict_ssl_verification:
        context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    return context


async def authorization(api: client.ApiClient) -> str | None:
    """The `Authorization` header the API client would send now: its bearer token, after the refresh hook (an
    expired exec-plugin token is fetched again, an in-cluster token re-read from its file); None without one."""
    return await api.configuration.get_api_key_with_prefix(BEARER)


async def authorization_after_refusal(api: client.ApiClient, refused: str) -> str | None:
    """The header to send instead of `refused` after a 401: the exec plugin's new token (`ExecCredential.renew`),
    else whatever the client holds now."""
    credential = getattr(api, "exec_credential", None)
    if credential is not None:
        return await credential.renew(refused)
    return await authorization(api)


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
