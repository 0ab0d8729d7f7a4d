import agent


def test_server_url_from_environment():
    assert agent.MCP_SERVER_URL.startswith("http")
