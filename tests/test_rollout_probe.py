"""A rollout whose pods never pass their readiness probe fails with the probe's reason, as `kubectl describe` shows it.

The sandbox runs the app's pods as processes (sandbox/apps) and probes them: the flow's error must name what the
kubelet's `Unhealthy` event says, and the release must be back on its previous revision.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from flows.config import load_config
from flows.results import PipelineFailed
from sandbox.example import commit_all, create_example_repo
from tests.conftest import HELM, ExampleApp

SERVER = '''
import http.server
HEALTH = {health}
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = HEALTH if self.path == "/healthz" else 200
        self.send_response(code); self.send_header("Content-Length", "2"); self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
'''
DOCKERFILE = 'FROM python:3.12-slim\nWORKDIR /app\nCOPY server.py .\nEXPOSE 8080\nCMD ["python", "server.py"]\n'
CHART = "apiVersion: v2\nname: probed\nversion: 0.1.0\n"
VALUES = 'image:\n  repository: ""\n  tag: ""\n'
DEPLOYMENT = '''apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}
spec:
  replicas: 1
  selector:
    matchLabels: {app: {{ .Release.Name }}}
  template:
    metadata:
      labels: {app: {{ .Release.Name }}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
        - name: web
          image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
          ports: [{name: http, containerPort: 8080}]
          readinessProbe:
            httpGet: {path: /healthz, port: http}
            periodSeconds: 10
            failureThreshold: 3
'''
PIPELINE = '''source: {{repo: ., ref: main}}
registry: 123456789012.dkr.ecr.us-west-2.amazonaws.com
aws: {{region: us-west-2, bucket: probed-{suffix}, prefix: build/}}
build: {{namespace: build-{suffix}, service_account: buildkit, image: moby/buildkit:v0.31.2, mode: privileged}}
components:
  - name: probed
    context: app
    image: probe-test/probed-{suffix}
    release: {{name: probed, chart: chart, namespace: probed-{suffix}, timeout_seconds: 12}}
'''


@pytest.fixture
def probed_app(tmp_path, sandbox) -> ExampleApp:
    """A one-component app whose chart has a readiness probe on /healthz, in a git repository of its own."""
    suffix = uuid.uuid4().hex[:6]
    source = tmp_path / "source"
    files = {"app/server.py": SERVER.format(health=200), "app/Dockerfile": DOCKERFILE, "chart/Chart.yaml": CHART,
             "chart/values.yaml": VALUES, "chart/templates/deployment.yaml": DEPLOYMENT,
             "buildkit-pipeline.yaml": PIPELINE.format(suffix=suffix)}
    for path, text in files.items():
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        (source / path).write_text(text)
    pipeline_file = create_example_repo(tmp_path / "repo", source)
    config = load_config(pipeline_file)
    return ExampleApp(pipeline_file, config, sandbox.prepare(config))


def history(sandbox, namespace: str) -> list[tuple[int, str]]:
    out = subprocess.run([str(HELM), "history", "probed", "-n", namespace, "-o", "json", "--kubeconfig",
                          str(sandbox.kubeconfig)], check=True, capture_output=True, text=True).stdout
    return [(entry["revision"], entry["status"]) for entry in json.loads(out)]


def test_a_rollout_that_never_passes_its_readiness_probe_names_the_probes_reason(prefect_server, sandbox,
                                                                                    probed_app):
    namespace = probed_app.config.component("probed").release.namespace
    probed_app.run().result()
    assert history(sandbox, namespace) == [(1, "deployed")]
    good = sandbox.kube.get("deployments", namespace, "probed")["spec"]["template"]["spec"]["containers"][0]["image"]

    server = Path(probed_app.root) / "app" / "server.py"
    server.write_text(SERVER.format(health=500))
    commit_all(probed_app.root, "/healthz answers 500")
    state = probed_app.run()

    with pytest.raises(PipelineFailed) as error:
        state.result()
    message = str(error.value)
    assert f"release {namespace}/probed: revision 2 failed" in message
    assert "a rollback to revision 1" in message
    failed_pods = [line for line in message.splitlines() if line.startswith("probed-")]
    assert failed_pods, message
    # the kubelet's event for the new pod (pkg/kubelet/prober/prober.go): the probe's output, the status code
    assert all(line.endswith(": Readiness probe failed: HTTP probe failed with statuscode: 500")
               for line in failed_pods), message
    assert history(sandbox, namespace) == [(1, "superseded"), (2, "failed"), (3, "deployed")]
    deployment = sandbox.kube.get("deployments", namespace, "probed")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == good
    assert deployment["status"]["availableReplicas"] == 1
