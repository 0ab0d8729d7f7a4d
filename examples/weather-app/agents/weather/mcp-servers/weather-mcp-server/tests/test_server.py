"""The server as its image runs it, over HTTP, through the official MCP client."""

from __future__ import annotations

import asyncio
import datetime
import json
import urllib.request

from mcp import Client

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def call(server, mode: str, *steps):
    """Connect to `server` in `mode` and return the connected client's results for `steps`."""
    async def run():
        async with Client(f"{server.url}/mcp", mode=mode) as client:
            return client.server_info, [await step(client) for step in steps]
    return asyncio.run(run())


def test_health_answers_ok(servers):
    with urllib.request.urlopen(f"{servers[0].url}/health", timeout=5) as response:
        assert response.status == 200
        assert json.load(response) == {"status": "ok"}


def test_handshake_names_the_server_and_lists_the_forecast_tool(servers):
    # the initialize handshake (mode="legacy"), as the pipeline's verify stage does it
    info, [tools] = call(servers[0], "legacy", lambda client: client.list_tools())
    assert (info.name, info.version) == ("weather-mcp", "1.1.0")
    [tool] = tools.tools
    assert tool.name == "get_forecast"
    assert tool.input_schema["required"] == ["city"]


def test_forecast_of_a_known_city_is_three_days_from_today(servers):
    before = datetime.date.today()
    _, [result] = call(servers[0], "auto", lambda client: client.call_tool("get_forecast", {"city": " SEATTLE "}))
    assert not result.is_error
    forecast = result.structured_content
    assert forecast["city"] == "Seattle"
    assert [day["conditions"] for day in forecast["days"]] == ["rain", "showers", "cloudy"]
    first = datetime.date.fromisoformat(forecast["days"][0]["date"])
    assert first in (before, datetime.date.today())
    for offset, day in enumerate(forecast["days"]):
        date = first + datetime.timedelta(days=offset)
        assert (day["date"], day["day"]) == (date.isoformat(), WEEKDAYS[date.weekday()])
        assert day["low_c"] < day["high_c"]


def test_unknown_city_is_a_tool_error_naming_the_known_ones(servers):
    _, [result] = call(servers[0], "legacy", lambda client: client.call_tool("get_forecast", {"city": "Atlantis"}))
    assert result.is_error
    [content] = result.content
    assert "no forecast for 'Atlantis'; known cities: chicago, new york, phoenix, seattle" in content.text


def post(server, message: dict) -> tuple[dict, dict]:
    request = urllib.request.Request(
        f"{server.url}/mcp", data=json.dumps(message).encode(), method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                 "MCP-Protocol-Version": "2025-11-25"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return dict(response.headers), json.load(response)


def test_any_replica_answers_a_client_that_started_on_another(servers):
    """Behind a Service, one client's requests reach different replicas: the server keeps no session."""
    headers, reply = post(servers[0], {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}}})
    assert reply["result"]["serverInfo"]["name"] == "weather-mcp"
    assert "mcp-session-id" not in {name.lower() for name in headers}
    _, reply = post(servers[1], {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                 "params": {"name": "get_forecast", "arguments": {"city": "phoenix"}}})
    assert reply["result"]["structuredContent"]["city"] == "Phoenix"
