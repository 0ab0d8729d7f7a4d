"""Cluster DNS for pod processes: an HTTP forward proxy on 127.0.0.1 (one port per namespace, handed to the
namespace's pod processes as HTTP_PROXY) that resolves a Service name as the pod's resolv.conf search path would
(sandbox/kube/services.py resolve_host) and passes the request to a ready endpoint's process, streaming the
answer back unbuffered.

What a pod would see on a cluster, answered as a proxy answers an upstream it cannot reach: a name that does not
resolve is 502 (`dial tcp: lookup <host>: no such host`, Go's resolver text), a Service with no ready endpoint is
503 (kube-proxy rejects the connection: `connection refused`), a port the Service does not have is 504 (nothing
answers: the connection times out). CONNECT (https through the proxy) is 405: the sandbox's pods serve http only.
"""

from __future__ import annotations

import asyncio
import threading

import aiohttp
from aiohttp import web

from sandbox.kube import KubeEmulator, forward, services


class ClusterDnsProxy:
    def __init__(self, emulator: KubeEmulator) -> None:
        self.emulator = emulator
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runners: dict[str, web.AppRunner] = {}
        self._ports: dict[str, int] = {}
        self._lock = threading.Lock()

    def start(self) -> ClusterDnsProxy:
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            ready.set()
            self._loop.run_forever()
        self._thread = threading.Thread(target=serve, name="cluster-dns-proxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        async def cleanup() -> None:
            for runner in self._runners.values():
                await runner.cleanup()
        asyncio.run_coroutine_threadsafe(cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    def url(self, namespace: str) -> str | None:
        """The proxy for pods of `namespace`, started on first use."""
        if self._loop is None:
            return None
        with self._lock:
            if namespace not in self._ports:
                future = asyncio.run_coroutine_threadsafe(self._listen(namespace), self._loop)
                self._ports[namespace] = future.result(10)
            return f"http://127.0.0.1:{self._ports[namespace]}"

    async def _listen(self, namespace: str) -> int:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._handle(request, namespace)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runners[namespace] = runner
        return runner.addresses[0][1]

    async def _handle(self, request: web.Request, namespace: str) -> web.StreamResponse:
        if request.method == "CONNECT":
            return web.Response(status=405, text="the sandbox's pods serve http only\n")
        host, _, port_text = request.headers.get("Host", "").partition(":")
        port = int(port_text) if port_text.isdigit() else 80
        service = services.resolve_host(self.emulator, namespace, host)
        if service is None:
            return web.Response(status=502, text=f"dial tcp: lookup {host}: no such host\n")
        endpoint = services.service_endpoint(self.emulator, service, port)
        if endpoint is None:
            return web.Response(status=504, text=f"dial tcp {host}:{port}: i/o timeout\n")
        if endpoint == "" or endpoint.host_port is None:
            return web.Response(status=503, text=f"dial tcp {host}:{port}: connect: connection refused\n")
        try:
            return await forward.forward(request, endpoint.host_port, request.rel_url.path_qs,
                                         drop=frozenset({"proxy-connection"}))
        except aiohttp.ClientConnectionError:
            return web.Response(status=503, text=f"dial tcp {host}:{port}: connect: connection refused\n")
