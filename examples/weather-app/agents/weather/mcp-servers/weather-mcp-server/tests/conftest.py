from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # agents/weather: the local_run helper

from local_run import MCP_SERVER, Component, running  # noqa: E402


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """Two replicas of the server, as two pods behind one Service."""
    logs = tmp_path_factory.mktemp("server")
    yield from running(*(Component(MCP_SERVER, logs / f"replica-{i}.log") for i in range(2)))
