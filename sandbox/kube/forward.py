"""One HTTP request passed on to a pod process on 127.0.0.1 and its answer streamed back unbuffered (SSE and
chunked bodies arrive as they are written): what the API server's service proxy (k8s.io/apimachinery
pkg/util/proxy/upgradeaware.go, v0.35) and the sandbox's cluster-DNS proxy do with a request."""

from __future__ import annotations

import aiohttp
from aiohttp import web

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "host", "content-length"}


async def forward(request: web.Request, port: int, path_qs: str, drop: frozenset[str] = frozenset()) -> web.StreamResponse:
    """Send `request` to 127.0.0.1:`port` at `path_qs`; raises aiohttp.ClientConnectionError when nothing
    listens there."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP | drop}
    body = request.content if request.can_read_body else None
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
    try:
        upstream = await session.request(request.method, f"http://127.0.0.1:{port}{path_qs}", headers=headers,
                                         data=body, allow_redirects=False)
    except BaseException:
        await session.close()
        raise
    try:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in upstream.headers.items():
            if key.lower() not in HOP_BY_HOP:
                response.headers.add(key, value)
        if upstream.headers.get("Content-Length") is not None and "chunked" not in \
                upstream.headers.get("Transfer-Encoding", ""):
            response.content_length = int(upstream.headers["Content-Length"])
        await response.prepare(request)
        if request.method != "HEAD":
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        upstream.release()
        await session.close()
