"""The deploy stage with the real helm binary against the emulator: rollback, order, locking, helm 3, secrets."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
import yaml
from prefect.blocks.system import Secret

from flows.helm import DeployFailed
from flows.results import PipelineFailed
from sandbox.example import commit_all
from tests.conftest import HELM, run_logs

MCP, AGENT = "weather-mcp", "weather-agent"
MCP_CONTEXT = "agents/weather/mcp-servers/weather-mcp-server"


def history(sandbox, app, component: str) -> list[tuple[int, str]]:
    release = app.config.component(component).release
    out = subprocess.run([str(HELM), "history", release.name, "-n", release.namespace, "-o", "json",
                          "--kubeconfig", str(sandbox.kubeconfig)], check=True, capture_output=True, text=True).stdout
    return [(entry["revision"], entry["status"]) for entry in json.loads(out)]


def deployed_image(sandbox, app, component: str) -> str:
    release = app.config.component(component).release
    deployment = sandbox.kube.get("deployments", release.namespace, release.name)
    return deployment["spec"]["template"]["spec"]["containers"][0]["image"]


def edit_pipeline(app, old: str, new: str) -> None:
    text = app.pipeline_file.read_text()
    assert old in text
    app.pipeline_file.write_text(text.replace(old, new))
    commit_all(app.root, f"pipeline: {new}")


@pytest.fixture
def pod_behaviour(sandbox):
    """Register a behaviour for some Pods for one test; the builders' stand-ins are put back afterwards."""
    yield sandbox.kube.on_pod
    sandbox.install_builders()


@pytest.fixture
def recording_helm(tmp_path, monkeypatch):
    """A helm wrapper that records every call (start, end, argv) and can claim to be helm 3."""
    log = tmp_path / "helm-calls.jsonl"

    def install(version: str | None = None) -> Path:
        script = tmp_path / "helm"
        script.write_text(f"""#!{os.sys.executable}
import json, os, subprocess, sys, time
argv = sys.argv[1:]
if {version!r} and argv[:1] == ["version"]:
    print({version!r}); sys.exit(0)
real = [a if a != "--atomic" else "--rollback-on-failure" for a in argv]
started = time.time()
code = subprocess.call([{str(HELM)!r}, *real])
with open({str(log)!r}, "a") as out:
    out.write(json.dumps({{"argv": argv, "start": started, "end": time.time(), "code": code}}) + "\\n")
sys.exit(code)
""")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        monkeypatch.setenv("HELM_BIN", str(script))
        return log

    return install


def calls(log: Path, command: str) -> list[dict]:
    return [c for c in map(json.loads, log.read_text().splitlines()) if c["argv"][:1] == [command]]


def test_a_release_that_never_becomes_ready_is_rolled_back_to_the_previous_image(
    prefect_server, sandbox, example_app, pod_behaviour
):
    app = example_app
    namespace = app.config.component(MCP).release.namespace
    edit_pipeline(app, f"namespace: {namespace}}}", f"namespace: {namespace}, timeout_seconds: 15}}")
    app.run().result()
    good_image = deployed_image(sandbox, app, MCP)
    server = app.root / MCP_CONTEXT / "server.py"
    server.write_text(server.read_text() + "\n# a release that will not pull\n")
    bad_commit = commit_all(app.root, "Break the image")
    pod_behaviour(lambda pod: bad_commit[:12] in pod["spec"]["containers"][0]["image"],
                  lambda handle: handle.waiting("ImagePullBackOff", 'Back-off pulling image "weather-mcp"'))

    state = app.run()

    with pytest.raises(PipelineFailed) as error:
        state.result()
    message = str(error.value)
    release = app.config.component(MCP).release
    assert f"release {release.namespace}/{MCP}: revision 2 failed" in message
    assert "running revision 3, a rollback to revision 1" in message
    assert "ImagePullBackOff" in message
    assert f"{AGENT}: " in message and "did not deploy" in message
    assert history(sandbox, app, MCP) == [(1, "superseded"), (2, "failed"), (3, "deployed")]
    assert deployed_image(sandbox, app, MCP) == good_image
    deployment = sandbox.kube.get("deployments", release.namespace, MCP)
    assert deployment["status"]["availableReplicas"] == 1


def test_helm_3_gets_atomic_and_helm_4_rollback_on_failure(prefect_server, sandbox, example_app, recording_helm):
    log = recording_helm("v3.16.4+g7877b45")
    example_app.run(components=[MCP]).result()
    [upgrade] = calls(log, "upgrade")
    assert "--atomic" in upgrade["argv"] and "--rollback-on-failure" not in upgrade["argv"]


def test_helm_4_gets_rollback_on_failure(prefect_server, sandbox, example_app, recording_helm):
    log = recording_helm()
    example_app.run(components=[MCP]).result()
    [upgrade] = calls(log, "upgrade")
    assert "--rollback-on-failure" in upgrade["argv"] and "--atomic" not in upgrade["argv"]


def test_two_runs_on_one_release_serialize_their_helm_operations(prefect_server, sandbox, example_app,
                                                                 recording_helm):
    log = recording_helm()
    sandbox.kube.rollout_delay = 1.5
    try:
        states = []
        threads = [threading.Thread(target=lambda: states.append(example_app.run(components=[MCP])))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        sandbox.kube.rollout_delay = 0.2
    assert [s.is_completed() for s in states] == [True, True]
    first, second = sorted(calls(log, "upgrade"), key=lambda c: c["start"])
    assert first["end"] <= second["start"], "two helm upgrades of one release overlapped"
    assert [r for r, _ in history(sandbox, example_app, MCP)] == [1, 2]


def test_secret_values_reach_the_release_but_no_argv_log_or_result(prefect_server, sandbox, example_app,
                                                                   recording_helm):
    log = recording_helm()
    password = "s3cr3t-db-password-for-test"
    namespace = example_app.config.component(MCP).release.namespace
    Secret(value=password).save(f"db-password-{namespace}", overwrite=True)
    edit_pipeline(example_app, f"namespace: {namespace}}}",
                  f"namespace: {namespace}, set_secret: {{db.password: db-password-{namespace}}}}}")
    leftover_before = set(Path(tempfile.gettempdir()).glob("helm-secret-values-*"))

    state = example_app.run(components=[MCP])
    result = state.result()

    release = example_app.config.component(MCP).release
    values = json.loads(subprocess.run(
        [str(HELM), "get", "values", MCP, "-n", release.namespace, "-o", "json", "--kubeconfig",
         str(sandbox.kubeconfig)], check=True, capture_output=True, text=True).stdout)
    assert values["db"]["password"] == password
    assert all(password not in " ".join(call["argv"]) for call in map(json.loads, log.read_text().splitlines()))
    assert password not in result.model_dump_json()
    logs = run_logs(state.state_details.flow_run_id)
    assert logs and all(password not in message for message in logs)
    assert set(Path(tempfile.gettempdir()).glob("helm-secret-values-*")) == leftover_before


def test_a_remote_chart_must_be_pinned(tmp_path):
    from flows.config import ConfigError, parse_config

    document = {
        "source": {"repo": "."}, "registry": "123456789012.dkr.ecr.us-west-2.amazonaws.com",
        "aws": {"region": "us-west-2", "bucket": "bucket"},
        "components": [{"name": "a", "context": "a", "image": "a",
                        "release": {"name": "a", "chart": "oci://example.com/charts/a"}}],
    }
    with pytest.raises(ConfigError, match=r"components\[0\]\.release: .*pin it with `version`"):
        parse_config(document)
    document["components"][0]["release"]["version"] = "1.2.3"
    assert parse_config(document).components[0].release.version == "1.2.3"
    assert issubclass(DeployFailed, RuntimeError)


SET_VALUES = {
    "settings.comma": "a,b,c",
    "settings.equals": "x=y=z",
    "settings.backslash": "C:\\build\\out",
    "settings.brace": "{not,a,list}",
    "settings.nested.deeper": "dotted",
    "settings.items[1].name": "second",
}


def render_settings_into_the_mcp_deployment(root: Path) -> None:
    """Each `release.set` value as an env var of the MCP server's Deployment, where the test reads it back."""
    template = root / "manifests/helm/mcp/templates/deployment.yaml"
    anchor = "          imagePullPolicy: {{ .Values.image.pullPolicy }}\n"
    env = "".join(f"            - {{name: {name}, value: {{{{ {expression} | quote }}}}}}\n" for name, expression in [
        ("COMMA", ".Values.settings.comma"), ("EQUALS", ".Values.settings.equals"),
        ("BACKSLASH", ".Values.settings.backslash"), ("BRACE", ".Values.settings.brace"),
        ("NESTED", ".Values.settings.nested.deeper"), ("ITEMS", "toJson .Values.settings.items")])
    template.write_text(template.read_text().replace(anchor, anchor + "          env:\n" + env))


def test_set_values_with_commas_equals_backslashes_dots_and_list_indexes_reach_the_chart_intact(
    prefect_server, sandbox, example_app
):
    """helm splits `--set-string` on unescaped commas, reads backslashes as escapes and `{...}` as a list
    (helm/helm pkg/strvals/parser.go): the values must arrive as written, and stay strings."""
    render_settings_into_the_mcp_deployment(example_app.root)
    document = yaml.safe_load(example_app.pipeline_file.read_text())
    [mcp] = [c for c in document["components"] if c["name"] == MCP]
    mcp["release"]["set"] = SET_VALUES
    example_app.pipeline_file.write_text(yaml.safe_dump(document, sort_keys=False))
    commit_all(example_app.root, "release.set values helm would split")

    state = example_app.run(components=[MCP])

    assert state.is_completed(), state.message
    release = example_app.config.component(MCP).release
    deployment = sandbox.kube.get("deployments", release.namespace, release.name)
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env == {"COMMA": "a,b,c", "EQUALS": "x=y=z", "BACKSLASH": "C:\\build\\out", "BRACE": "{not,a,list}",
                   "NESTED": "dotted", "ITEMS": '[null,{"name":"second"}]'}
