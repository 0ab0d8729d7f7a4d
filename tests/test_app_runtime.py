"""App pods run as local processes (sandbox/apps): probes, logs, the service proxy, cluster DNS, busybox wget."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest

from sandbox.builders import OCI, dockerfile_instructions, final_stage_steps, image_manifest, push_manifest, \
    remember_build
from tests.conftest import REPO_ROOT, wait_until

KUBECTL = REPO_ROOT / ".tools" / "bin" / "kubectl"
REGISTRY = "123456789012.dkr.ecr.us-west-2.amazonaws.com"

SERVER = b'''
import http.server, os, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health" and os.environ.get("HEALTHY") != "yes":
            self.send_response(500); self.end_headers(); return
        body = f"{self.path} from {os.environ.get('GREETING')} in {os.getcwd().rsplit('/', 1)[-1]}".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
print("listening on", os.environ["PORT"], file=sys.stderr)
http.server.HTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler).serve_forever()
'''
CLIENT = b'''
import os, sys, time, urllib.request
while True:
    try:
        print(urllib.request.urlopen(os.environ["TARGET"], timeout=5).read().decode(), flush=True)
    except Exception as exc:
        print("failed:", exc, flush=True)
    time.sleep(0.2)
'''
DOCKERFILE = b"FROM python:3.12-slim\nWORKDIR /srv/app\nENV PORT=8080 GREETING=image\nCOPY . .\nCMD python server.py\n"


@pytest.fixture(scope="module")
def image(sandbox) -> str:
    """An image a simulated build pushed: its context and Dockerfile known to the builders' registry."""
    context = {"server.py": SERVER, "client.py": CLIENT, "Dockerfile": DOCKERFILE}
    instructions = dockerfile_instructions(DOCKERFILE.decode())
    steps = final_stage_steps("buildkit", instructions, context, {}, OCI)
    manifest, digest = image_manifest(steps, {}, "", OCI)
    repository = f"runtime-{uuid.uuid4().hex[:8]}"
    sandbox.aws.client("ecr", "us-west-2").create_repository(repositoryName=repository)
    assert push_manifest(sandbox.aws, "us-west-2", f"{REGISTRY}/{repository}:v1", manifest, digest)
    remember_build(digest, context, instructions, {})
    return f"{REGISTRY}/{repository}:v1@{digest}"


@pytest.fixture
def namespace(sandbox):
    name = f"apps-{uuid.uuid4().hex[:6]}"
    sandbox.kube.create("namespaces", None, {"metadata": {"name": name}})
    return name


def deploy(sandbox, namespace: str, name: str, image: str, *, healthy: bool = True, command=None,
           env: dict | None = None) -> None:
    container = {"name": "app", "image": image, "ports": [{"name": "http", "containerPort": 8080}],
                 "env": [{"name": "GREETING", "value": "pod"}, {"name": "HEALTHY", "value": "yes" if healthy else "no"},
                         *({"name": k, "value": v} for k, v in (env or {}).items())],
                 "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 1,
                                    "failureThreshold": 1}}
    if command:
        container["command"] = command
    sandbox.kube.create("deployments", namespace, {
        "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"terminationGracePeriodSeconds": 1, "containers": [container]}}}})
    sandbox.kube.create("services", namespace, {
        "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}})


def pod_of(sandbox, namespace: str, name: str) -> dict | None:
    pods = sandbox.kube.list("pods", namespace, {"app": name})
    return pods[0] if pods else None


def ready(sandbox, namespace: str, name: str) -> dict | None:
    pod = pod_of(sandbox, namespace, name)
    conditions = (pod or {}).get("status", {}).get("conditions") or []
    return pod if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions) else None


def kubectl(sandbox, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(KUBECTL), "--kubeconfig", str(sandbox.kubeconfig), *args], capture_output=True,
                          text=True, timeout=30)


def test_app_pod_runs_as_a_process_behind_its_service(sandbox, namespace, image):
    deploy(sandbox, namespace, "web", image)
    pod = wait_until(lambda: ready(sandbox, namespace, "web"), 20, "the pod to pass its readiness probe")
    assert pod["status"]["containerStatuses"][0]["state"].get("running")
    answer = kubectl(sandbox, "get", "--raw", f"/api/v1/namespaces/{namespace}/services/web:80/proxy/hello?x=1")
    assert answer.returncode == 0, answer.stderr
    # the pod's env wins over the image's ENV; the process runs in the image's WORKDIR
    assert answer.stdout == "/hello?x=1 from pod in app"
    by_name = kubectl(sandbox, "get", "--raw", f"/api/v1/namespaces/{namespace}/services/http:web:web/proxy/")
    assert by_name.stdout == "/ from pod in app", by_name.stderr
    logs = kubectl(sandbox, "logs", "-n", namespace, pod["metadata"]["name"])
    assert "listening on 8080" in logs.stdout
    ports = sandbox.kube.pod_ports(namespace, pod["metadata"]["name"])
    assert set(ports) >= {8080} and ports[8080] != 8080

    sandbox.kube.delete("deployments", namespace, "web")
    wait_until(lambda: not sandbox.kube.pod_ports(namespace, pod["metadata"]["name"]), 10, "the process to stop")
    pids = subprocess.run(["pgrep", "-f", f"{namespace}"], capture_output=True, text=True).stdout.split()
    assert pids == [] or all(not os.path.exists(f"/proc/{p}") for p in pids)


def test_failing_readiness_probe_posts_unhealthy_and_keeps_the_service_empty(sandbox, namespace, image):
    deploy(sandbox, namespace, "sick", image, healthy=False)

    def unhealthy():  # the first probes may come before the process listens: connection refused
        return [e for e in sandbox.kube.list("events", namespace) if e["reason"] == "Unhealthy"
                and e["message"] == "Readiness probe failed: HTTP probe failed with statuscode: 500"]
    [event] = wait_until(unhealthy, 20, "an Unhealthy event with the probe's status code")
    assert event["type"] == "Warning" and event["source"]["component"] == "kubelet"
    assert ready(sandbox, namespace, "sick") is None
    answer = kubectl(sandbox, "get", "--raw", f"/api/v1/namespaces/{namespace}/services/sick:80/proxy/")
    assert answer.returncode != 0
    assert 'no endpoints available for service \\"sick\\"' in answer.stderr or \
        'no endpoints available for service "sick"' in answer.stderr
    sandbox.kube.delete("deployments", namespace, "sick")


def test_pod_process_reaches_another_service_by_its_dns_name(sandbox, namespace, image):
    deploy(sandbox, namespace, "backend", image)
    wait_until(lambda: ready(sandbox, namespace, "backend"), 20, "the backend")
    deploy(sandbox, namespace, "caller", image, command=["python", "client.py"],
           env={"TARGET": f"http://backend.{namespace}.svc.cluster.local/dns", "HEALTHY": "yes"})

    def called():
        pod = pod_of(sandbox, namespace, "caller")
        if pod is None:
            return None
        text = "".join(c.text for c in sandbox.kube.logs.chunks(namespace, pod["metadata"]["name"], "app"))
        return text if "/dns from pod" in text else None
    assert "/dns from pod in app" in wait_until(called, 20, "the caller's log")
    for name in ("backend", "caller"):
        sandbox.kube.delete("deployments", namespace, name)


@pytest.mark.parametrize("args,code,text", [
    (["web:80"], 0, "'index.html' saved"),
    (["-qO-", "web:80/hi"], 0, "/hi from pod in app"),
    (["-T", "2", "nowhere:80"], 1, "wget: bad address 'nowhere:80'"),
])
def test_busybox_wget_pod_is_the_request(sandbox, namespace, image, args, code, text):
    deploy(sandbox, namespace, "web", image)
    wait_until(lambda: ready(sandbox, namespace, "web"), 20, "the web pod")
    sandbox.kube.create("pods", namespace, {
        "metadata": {"name": "test-connection"},
        "spec": {"restartPolicy": "Never",
                 "containers": [{"name": "wget", "image": "busybox:1.36", "command": ["wget"], "args": args}]}})

    def ended():
        pod = sandbox.kube.get("pods", namespace, "test-connection")
        return pod if pod["status"].get("phase") in ("Succeeded", "Failed") else None
    pod = wait_until(ended, 20, "the test pod to end")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == code
    log = "".join(c.text for c in sandbox.kube.logs.chunks(namespace, "test-connection", "wget"))
    assert text in log
    sandbox.kube.delete("deployments", namespace, "web")


def test_kubectl_service_proxy_needs_services_proxy_rbac(sandbox, namespace, image, tmp_path):
    deploy(sandbox, namespace, "web", image)
    wait_until(lambda: ready(sandbox, namespace, "web"), 20, "the web pod")
    sandbox.kube.create("serviceaccounts", namespace, {"metadata": {"name": "verifier"}})
    config = sandbox.kube.write_service_account_kubeconfig(tmp_path / "kubeconfig", namespace, "verifier")
    path = f"/api/v1/namespaces/{namespace}/services/web:80/proxy/health"
    refused = subprocess.run([str(KUBECTL), "--kubeconfig", str(config), "get", "--raw", path],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0
    assert (f'services "web:80" is forbidden: User "system:serviceaccount:{namespace}:verifier" cannot get '
            f'resource "services/proxy" in API group "" in the namespace "{namespace}"') in refused.stderr
    sandbox.kube.create("roles", namespace, {"metadata": {"name": "proxy"}, "rules": [
        {"apiGroups": [""], "resources": ["services/proxy"], "verbs": ["get"]}]})
    sandbox.kube.create("rolebindings", namespace, {
        "metadata": {"name": "proxy"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                                   "name": "proxy"},
        "subjects": [{"kind": "ServiceAccount", "name": "verifier", "namespace": namespace}]})
    allowed = subprocess.run([str(KUBECTL), "--kubeconfig", str(config), "get", "--raw", path],
                             capture_output=True, text=True, timeout=30)
    assert allowed.returncode == 0, allowed.stderr
    assert json.dumps(allowed.stdout) and allowed.stdout == "/health from pod in app"
    sandbox.kube.delete("deployments", namespace, "web")
