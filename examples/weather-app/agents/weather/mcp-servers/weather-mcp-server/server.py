"""weather-mcp: an MCP server with one tool, `get_forecast`, answering a three-day forecast from canned data.

Served over the streamable HTTP transport at `/mcp` (port 8080, or $PORT) with the official `mcp` SDK, plus a plain
`GET /health` for the kubelet's probes and the chart's helm test.

Stateless and JSON responses (`stateless_http=True, json_response=True`): the chart may run several replicas behind
one Service, which balances each connection to any of them. A stateful session lives in one process's memory, and a
follow-up request that reaches another replica gets 404 "Session not found"; a stateless server keeps nothing
between requests, so any replica answers any request (modelcontextprotocol/python-sdk docs/run/deploy.md, "Workers,
and who has to be sticky"; 2026-07-28 clients are sessionless either way). The price is the server-to-client
channel (sampling, elicitation), which this tool never uses. A JSON body instead of an SSE stream is one complete
response that any proxy on the way (the API server's service proxy, an HTTP proxy) passes as it is.
"""

from __future__ import annotations

import datetime
import os

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse

NAME = "weather-mcp"
VERSION = "1.1.0"

# (conditions, high °C, low °C) for today and the two days after
FORECASTS: dict[str, list[tuple[str, int, int]]] = {
    "seattle": [("rain", 12, 7), ("showers", 13, 8), ("cloudy", 15, 9)],
    "phoenix": [("sunny", 35, 22), ("sunny", 36, 23), ("partly cloudy", 34, 22)],
    "chicago": [("windy", 18, 10), ("thunderstorms", 21, 14), ("sunny", 23, 13)],
    "new york": [("partly cloudy", 22, 15), ("rain", 19, 14), ("sunny", 24, 16)],
}
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


class DayForecast(BaseModel):
    date: str
    day: str
    conditions: str
    high_c: int
    low_c: int


class Forecast(BaseModel):
    city: str
    days: list[DayForecast]


def forecast(city: str, today: datetime.date) -> Forecast:
    """The canned forecast of `city` (any case, surrounding blanks ignored) for `today` and the two days after."""
    key = " ".join(city.split()).lower()
    if key not in FORECASTS:
        raise ToolError(f"no forecast for {city.strip()!r}; known cities: {', '.join(sorted(FORECASTS))}")
    days = []
    for offset, (conditions, high, low) in enumerate(FORECASTS[key]):
        date = today + datetime.timedelta(days=offset)
        days.append(DayForecast(date=date.isoformat(), day=WEEKDAYS[date.weekday()], conditions=conditions,
                                high_c=high, low_c=low))
    return Forecast(city=key.title(), days=days)


mcp = MCPServer(NAME, version=VERSION, instructions="Call get_forecast with a city name for a three-day forecast.")


@mcp.tool()
def get_forecast(city: str) -> Forecast:
    """Three-day weather forecast for a city: conditions and high/low temperatures in °C for each day."""
    return forecast(city, datetime.date.today())


@mcp.custom_route("/health", methods=["GET"])
async def health(_: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def main() -> None:
    mcp.run(
        "streamable-http",
        host=os.environ.get("HOST", "0.0.0.0"),
        port=int(os.environ.get("PORT", "8080")),
        streamable_http_path="/mcp",
        stateless_http=True,
        json_response=True,
        # Reached by Service DNS names and through proxies, so the Host header is not one a fixed allowlist would
        # know; the SDK's own advice behind a proxy that controls Host (docs/run/deploy.md, "the Host allowlist").
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )


if __name__ == "__main__":
    main()
