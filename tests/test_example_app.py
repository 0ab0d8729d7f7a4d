"""The example app works: its components pass their own tests as local processes, and its charts render what the
pipeline's verify stage and the sandbox's kubelet rely on (Services, named ports, probes, helm test hooks)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from sandbox.example import EXAMPLE
from tests.conftest import HELM

COMPONENTS = EXAMPLE / "agents" / "weather"
CHARTS = EXAMPLE / "manifests" / "helm"


def test_components_pass_their_own_tests():
    # no bytecode or pytest cache left in the example, which the tests copy into their git repositories
    env = os.environ | {"PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "agent/tests", "mcp-servers/weather-mcp-server/tests"],
        cwd=COMPONENTS, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed in [\d.]+s", summary), summary


def render(release: str, chart: str, *args: str) -> dict[str, dict]:
    """`helm template` of one of the example's charts, as `helm upgrade --install` would install it: kind/name ->
    manifest, each one valid against the Kubernetes schema."""
    common = ["--set", "image.repository=123456789012.dkr.ecr.us-west-2.amazonaws.com/agents-on-eks/x",
              "--set", "image.tag=abc"]
    subprocess.run([str(HELM), "lint", "--strict", str(CHARTS / chart), *common, *args], check=True,
                   capture_output=True)
    out = subprocess.run([str(HELM), "template", release, str(CHARTS / chart), *common, *args], check=True,
                         capture_output=True, text=True).stdout
    manifests = {}
    for manifest in yaml.safe_load_all(out):
        if manifest:
            kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)
            manifests[f"{manifest['kind']}/{manifest['metadata']['name']}"] = manifest
    return manifests


@pytest.mark.parametrize("release, chart, args, test_path", [
    ("weather-mcp", "mcp", (), "/health"),
    ("weather-agent", "agent", ("-f", str(CHARTS / "values/weather-agent.yaml")), "/forecast?city=seattle"),
])
def test_chart_serves_http_on_a_named_port_with_probes_and_a_helm_test(release, chart, args, test_path):
    manifests = render(release, chart, *args)
    deployment, service = manifests[f"Deployment/{release}"], manifests[f"Service/{release}"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]

    test = manifests[f"Pod/{release}-test-connection"]
    assert test["metadata"]["annotations"] == {"helm.sh/hook": "test"}
    assert not set(service["spec"]["selector"].items()) <= set(test["metadata"]["labels"].items()), \
        "the Service would route to the test pod"
    [wget] = test["spec"]["containers"]
    assert re.fullmatch(r"busybox:\d+\.\d+\.\d+", wget["image"]), "busybox pinned by tag"
    assert wget["command"] == ["wget"]
    assert wget["args"][:2] == ["-qO-", "-T"] and wget["args"][3:] == [f"{release}:80{test_path}"]
    assert test["spec"]["restartPolicy"] == "Never"


def test_agent_is_pointed_at_the_mcp_servers_streamable_http_endpoint():
    manifests = render("weather-agent", "agent", "-f", str(CHARTS / "values/weather-agent.yaml"))
    [container] = manifests["Deployment/weather-agent"]["spec"]["template"]["spec"]["containers"]
    assert container["env"] == [
        {"name": "MCP_SERVER_URL", "value": "http://weather-mcp.mcp-servers.svc.cluster.local/mcp"}]


def test_example_app_fixture_points_the_agent_at_its_own_mcp_namespace(example_app):
    """The tests give each app namespaces of its own: the agent's MCP URL must follow, or it calls no one."""
    mcp = example_app.config.component("weather-mcp").release
    agent = example_app.config.component("weather-agent").release
    manifests = render(agent.name, "agent", "-f", str(example_app.root / agent.values[0]))
    [container] = manifests[f"Deployment/{agent.name}"]["spec"]["template"]["spec"]["containers"]
    assert container["env"] == [
        {"name": "MCP_SERVER_URL", "value": f"http://{mcp.name}.{mcp.namespace}.svc.cluster.local/mcp"}]
