"""The agent as its image runs it, against the real MCP server process."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
SEATTLE = re.compile(r"Seattle: rain on (\w+), showers on (\w+), cloudy on (\w+)\.\n")


def get(agent, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{agent.url}{path}", timeout=20) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def assert_seattle(text: str) -> None:
    days = SEATTLE.fullmatch(text)
    assert days, text
    first = WEEKDAYS.index(days[1])
    assert list(days.groups()) == [WEEKDAYS[(first + i) % 7] for i in range(3)]


def test_health_answers_ok(app):
    status, body = get(app["agent"], "/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})


def test_forecast_is_a_sentence_from_the_mcp_tool_reached_by_its_service_name_through_http_proxy(app):
    status, body = get(app["agent"], "/forecast?city=Seattle")
    assert status == 200
    assert_seattle(body)
    assert ("POST", "http://weather-mcp.mcp-servers.svc.cluster.local/mcp") in app["proxy"].forwarded


def test_missing_city_is_400(app):
    for path in ("/forecast", "/forecast?city=", "/forecast?city=%20"):
        status, body = get(app["agent"], path)
        assert (status, body) == (400, "missing query parameter 'city', e.g. /forecast?city=seattle\n"), path


def test_unknown_city_is_502_with_the_tool_error(app):
    status, body = get(app["agent"], "/forecast?city=atlantis")
    assert status == 502
    assert body.startswith("get_forecast failed: ") and "no forecast for 'atlantis'" in body


def test_unreachable_mcp_server_is_502_with_the_reason(app):
    status, body = get(app["server-down"], "/forecast?city=seattle")
    assert status == 502
    assert body.startswith("MCP server unreachable or failing: ConnectError"), body
