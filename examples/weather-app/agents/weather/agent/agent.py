"""A tiny weather agent: asks the MCP server for a forecast and phrases the answer."""

import json
import os
import urllib.request

MCP_SERVER_URL = os.environ.get("MCP_SERVER_URL", "http://localhost:8080")


def answer(city: str) -> str:
    with urllib.request.urlopen(f"{MCP_SERVER_URL}/{city}", timeout=5) as response:
        forecast = json.load(response)["forecast"]
    return f"Expect {forecast} in {city.title()} today."


if __name__ == "__main__":
    print(answer(os.environ.get("CITY", "seattle")))
