"""A tiny MCP-style weather server: answers forecast requests over HTTP."""

import json
from http.server import BaseHTTPRequestHandler, HTTPServer

FORECASTS = {"seattle": "rain", "phoenix": "sun"}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        city = self.path.strip("/").lower()
        body = json.dumps({"city": city, "forecast": FORECASTS.get(city, "unknown")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    HTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
