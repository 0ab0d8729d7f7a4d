"""For the components' tests: run a component as a local process on 127.0.0.1, as its image runs it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
MCP_SERVER = HERE / "mcp-servers" / "weather-mcp-server" / "server.py"
AGENT = HERE / "agent" / "agent.py"
PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Component:
    """`script` run from its own directory with `env` and HOST/PORT on a free 127.0.0.1 port; none of the caller's
    proxy settings reach it unless `env` gives them."""

    def __init__(self, script: Path, log: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.log = log
        environment = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARIABLES}
        environment |= {"HOST": "127.0.0.1", "PORT": str(self.port), "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
        with log.open("wb") as out:
            self.process = subprocess.Popen([sys.executable, script.name], cwd=script.parent, env=environment,
                                            stdout=out, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 20.0) -> Component:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"no answer on /health after {timeout:.0f} s:\n{self.log.read_text()}")

    def wait_stopped(self) -> None:
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def running(*components: Component):
    """Wait until every component answers /health (they start side by side), yield them, then stop them all."""
    try:
        for component in components:
            component.wait_healthy()
        yield components
    finally:
        for component in components:
            component.process.terminate()
        for component in components:
            component.wait_stopped()
