"""The weather agent: an HTTP service on port 8080 (or $PORT) that answers `GET /forecast?city=...` with a short
sentence, from the `get_forecast` tool of the MCP server at $MCP_SERVER_URL (its streamable HTTP endpoint, e.g.
`http://weather-mcp.mcp-servers.svc.cluster.local/mcp`), called through the official `mcp` SDK's client.

The SDK's HTTP client is httpx2's with its defaults (mcp 2.3 `mcp.shared._httpx_utils.create_mcp_http_client`), so
`trust_env` is on and HTTP_PROXY/NO_PROXY are honoured for the MCP call.
"""

from __future__ import annotations

import os

import anyio
import uvicorn
from mcp import Client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

TOOL = "get_forecast"


class McpFailure(Exception):
    """The MCP server could not be reached, or its tool did not answer with a forecast."""


def phrase(forecast: dict) -> str:
    """`Seattle: rain on Tuesday, showers on Wednesday, cloudy on Thursday.`"""
    days = ", ".join(f"{day['conditions']} on {day['day']}" for day in forecast["days"])
    return f"{forecast['city']}: {days}."


def reason(error: BaseException) -> str:
    """One line naming what went wrong: the first leaf of an exception group (anyio task groups raise those)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


async def fetch_forecast(server_url: str, city: str, timeout: float) -> dict:
    """The tool's structured forecast for `city`; McpFailure with the reason otherwise."""
    try:
        with anyio.fail_after(timeout):
            async with Client(server_url) as client:
                result = await client.call_tool(TOOL, {"city": city})
    except TimeoutError:
        raise McpFailure(f"no answer from the MCP server within {timeout:g} s") from None
    except Exception as error:  # noqa: BLE001 - any transport or protocol error is the MCP server's failure
        raise McpFailure(f"MCP server unreachable or failing: {reason(error)}") from None
    if result.is_error:
        text = " ".join(getattr(block, "text", "") for block in result.content).strip()
        raise McpFailure(f"{TOOL} failed: {text or 'no detail'}")
    if not isinstance(result.structured_content, dict) or "days" not in result.structured_content:
        raise McpFailure(f"{TOOL} answered without a forecast")
    return result.structured_content


async def health(_: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def forecast(request: Request) -> PlainTextResponse:
    city = request.query_params.get("city", "").strip()
    if not city:
        return PlainTextResponse("missing query parameter 'city', e.g. /forecast?city=seattle\n", status_code=400)
    try:
        answer = await fetch_forecast(request.app.state.mcp_server_url, city, request.app.state.mcp_timeout)
    except McpFailure as failure:
        return PlainTextResponse(f"{failure}\n", status_code=502)
    return PlainTextResponse(f"{phrase(answer)}\n")


def create_app(mcp_server_url: str, mcp_timeout: float = 10.0) -> Starlette:
    app = Starlette(routes=[Route("/health", health), Route("/forecast", forecast)])
    app.state.mcp_server_url = mcp_server_url
    app.state.mcp_timeout = mcp_timeout
    return app


def main() -> None:
    server_url = os.environ.get("MCP_SERVER_URL", "").strip()
    if not server_url:
        raise SystemExit("MCP_SERVER_URL is not set: the MCP server's streamable HTTP endpoint, e.g. "
                         "http://weather-mcp.mcp-servers.svc.cluster.local/mcp")
    app = create_app(server_url, float(os.environ.get("MCP_TIMEOUT_SECONDS", "10")))
    uvicorn.run(app, host=os.environ.get("HOST", "0.0.0.0"), port=int(os.environ.get("PORT", "8080")))


if __name__ == "__main__":
    main()
