"""The verify stage through the flow on the sandbox: helm test, the MCP handshake and HTTP checks through the
emulator's service proxy, against the example app running as local processes; rollback and skip on failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.results import PipelineFailed
from sandbox.demo import ask_the_agent
from sandbox.example import commit_all
from tests.conftest import by_name, run_events, run_logs
from tests.test_deploy import MCP_CONTEXT, deployed_image, edit_pipeline, history
from tests.test_pipeline_e2e import timing_artifact

MCP, AGENT = "weather-mcp", "weather-agent"
MCP_CHART = Path("manifests/helm/mcp")

# A web server on the MCP server's port that answers every request with 200 "ok" and does not speak MCP; it
# runs as `python server.py` and as an ASGI `server:app`, whichever the image's CMD is.
HTTP_ONLY_SERVER = '''import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route


async def ok(request):
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/{path:path}", ok, methods=["GET", "POST", "DELETE", "HEAD"])])

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="0.0.0.0", port=int(os.environ.get("PORT", "8080")))
'''

# A helm test hook whose busybox wget cannot resolve its host: the pod exits 1 with wget's own words
# (mirror/busybox networking/wget.c: "bad address").
FAILING_TEST_HOOK = '''apiVersion: v1
kind: Pod
metadata:
  name: "{{ .Release.Name }}-test-fails"
  annotations:
    "helm.sh/hook": test
spec:
  restartPolicy: Never
  containers:
    - name: wget
      image: busybox:1.37
      command: ["wget"]
      args: ["-T", "5", "no-such-service:80"]
'''


def test_a_good_run_verifies_both_releases_with_helm_test_mcp_and_http(prefect_server, sandbox, example_app,
                                                                       capsys):
    state = example_app.run()
    assert state.is_completed(), state.message
    components = by_name(state.result())
    mcp, agent = components[MCP], components[AGENT]

    assert mcp.release.verification.mcp.tools == ["get_forecast"]
    assert mcp.release.verification.mcp.name and mcp.release.verification.helm_tests
    assert [(a.path, a.status) for a in agent.release.verification.http] == [("/health", 200)]
    assert agent.release.verification.helm_tests
    for component in (mcp, agent):
        assert component.outcome == "deployed" and component.seconds["verify"] > 0
        deploy_end, verify_start = component.spans["deploy"][1], component.spans["verify"][0]
        assert verify_start == deploy_end
    # the agent deploys only once the MCP server is verified
    assert agent.spans["deploy"][0] >= mcp.spans["verify"][1]
    logs = "\n".join(run_logs(state.state_details.flow_run_id))
    assert f"{MCP}: verified release" in logs and f"{AGENT}: verified release" in logs
    assert history(sandbox, example_app, MCP) == [(1, "deployed")]
    verified = run_events(state.state_details.flow_run_id, "helm.release.verif", 2)
    assert [(e["event"], e["payload"]["component"]) for e in verified] == [
        ("helm.release.verified", MCP), ("helm.release.verified", AGENT)]
    assert verified[0]["resource"]["prefect.resource.id"] == f"helm.release.{mcp.release.namespace}.{MCP}"
    assert verified[0]["payload"]["mcp"]["tools"] == ["get_forecast"] and verified[0]["payload"]["revision"] == 1
    assert verified[1]["payload"]["http"][0]["status"] == 200
    # make demo's last step: the agent, asked through the service proxy, answers with its MCP server's forecast
    capsys.readouterr()
    assert ask_the_agent(sandbox, example_app.config) == 0
    assert "Seattle: rain on " in capsys.readouterr().out


def test_a_server_that_answers_http_but_not_mcp_is_rolled_back_and_the_agent_skipped(
        prefect_server, sandbox, example_app):
    app = example_app
    assert app.run().is_completed()
    good_image = deployed_image(sandbox, app, MCP)
    agent_history = history(sandbox, app, AGENT)

    (app.root / MCP_CONTEXT / "server.py").write_text(HTTP_ONLY_SERVER)
    commit_all(app.root, "an MCP server that does not speak MCP")
    state = app.run()

    message = failure(state)
    assert f"{MCP}: DeployFailed: release " in message and "revision 2 failed (verification failed: " in message
    assert "release.verify.mcp (weather-mcp:80/mcp): the MCP handshake failed" in message
    assert "running revision 3, a rollback to revision 1" in message
    assert f"{AGENT}: not deployed because {MCP} did not deploy" in message
    rows = {(r["component"], r["stage"]): r for r in timing_artifact(state.state_details.flow_run_id)}
    assert rows[(MCP, "verify")]["outcome"] == "failed" and rows[(MCP, "verify")]["seconds"] > 0
    verified, deployed = rows[(MCP, "verify")], rows[(MCP, "deploy")]
    assert verified["seconds"] == pytest.approx(verified["ended_s"] - verified["started_s"], abs=0.002)
    # the rollback after the failed check is the deploy stage's: in its seconds, after its span
    assert deployed["seconds"] > deployed["ended_s"] - deployed["started_s"] + 0.1
    assert (AGENT, "deploy") not in rows and rows[(AGENT, "build")]["outcome"] == "skipped"
    assert history(sandbox, app, MCP) == [(1, "superseded"), (2, "superseded"), (3, "deployed")]
    assert deployed_image(sandbox, app, MCP) == good_image
    assert history(sandbox, app, AGENT) == agent_history
    [failed] = run_events(state.state_details.flow_run_id, "helm.release.verif", 1)
    assert (failed["event"], failed["payload"]["component"], failed["payload"]["revision"]) == (
        "helm.release.verification-failed", MCP, 2)
    assert "the MCP handshake failed" in failed["payload"]["failure"]


def test_a_failing_chart_test_hook_rolls_back_with_the_test_pods_log(prefect_server, sandbox, example_app):
    app = example_app
    assert app.run().is_completed()
    (app.root / MCP_CHART / "templates" / "tests").mkdir(parents=True, exist_ok=True)
    (app.root / MCP_CHART / "templates" / "tests" / "fails.yaml").write_text(FAILING_TEST_HOOK)
    commit_all(app.root, "a test hook that fails")
    state = app.run()

    message = failure(state)
    assert "release.verify.helm_test: helm test: " in message
    assert "test weather-mcp-test-fails: Failed" in message
    assert "--- last log lines of test pod weather-mcp-test-fails ---" in message
    assert "wget: bad address 'no-such-service:80'" in message
    assert "running revision 3, a rollback to revision 1" in message
    assert history(sandbox, app, MCP) == [(1, "superseded"), (2, "superseded"), (3, "deployed")]
    assert f"{AGENT}: not deployed because {MCP} did not deploy" in message


def test_a_release_without_checks_deploys_as_before(prefect_server, sandbox, example_app):
    app = example_app
    edit_pipeline(app, "verify: {mcp: {service: weather-mcp, port: 80, path: /mcp, tools: [get_forecast]}}",
                  "verify: {helm_test: false}")
    state = app.run(components=[MCP])
    assert state.is_completed(), state.message
    mcp = by_name(state.result())[MCP]
    assert mcp.outcome == "deployed" and mcp.release.verification is None
    assert "verify" not in mcp.seconds and "verify" not in mcp.spans
    logs = "\n".join(run_logs(state.state_details.flow_run_id))
    assert "verified release" not in logs


def failure(state) -> str:
    """The message of the run's PipelineFailed: every failed component with its error."""
    with pytest.raises(PipelineFailed) as failed:
        state.result()
    return str(failed.value)
