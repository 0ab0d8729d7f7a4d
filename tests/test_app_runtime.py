"""App pods run as local processes (sandbox/apps): probes, logs, the service proxy, cluster DNS, busybox wget."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest

from sandbox.apps import busybox
from sandbox.builders import (
    OCI,
    built_image,
    dockerfile_instructions,
    final_stage_steps,
    image_manifest,
    push_manifest,
    remember_build,
)
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
           env: dict | None = None, readiness: dict | None = None) -> None:
    container = {"name": "app", "image": image, "ports": [{"name": "http", "containerPort": 8080}],
                 "env": [{"name": "GREETING", "value": "pod"}, {"name": "HEALTHY", "value": "yes" if healthy else "no"},
                         *({"name": k, "value": v} for k, v in (env or {}).items())],
                 "readinessProbe": readiness or {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 1,
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
    (["-s", "web:80"], 1, "wget: invalid option -- 's'\nUsage: wget [-cqS] [--spider]"),
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


@pytest.mark.parametrize("argv,parsed", [
    # busybox 1_36_1 networking/wget.c: "cqSO:o:P:Y:U:T:+t:n::" and wget_longopts, parsed by glibc getopt_long
    (["-qO-", "-T", "10", "svc:80/x"], ({"quiet": True, "output": "-", "spider": False, "timeout": 10.0},
                                       ["svc:80/x"])),
    (["svc", "--spi", "--timeout=3", "-nv"], ({"quiet": False, "output": None, "spider": True, "timeout": 3.0},
                                              ["svc"])),
    (["-U", "probe", "--", "-not-an-option"], ({"quiet": False, "output": None, "spider": False, "timeout": 900.0},
                                               ["-not-an-option"])),
    (["-s", "svc"], "wget: invalid option -- 's'"),
    (["--follow", "svc"], "wget: unrecognized option '--follow'"),
    (["--no", "svc"], "wget: option '--no' is ambiguous; possibilities: "),
    (["svc", "-O"], "wget: option requires an argument -- 'O'"),
    (["--spider=yes", "svc"], "wget: option '--spider' doesn't allow an argument"),
    (["-T", "soon", "svc"], "wget: invalid number 'soon'"),
    (["-q"], ""),
])
def test_busybox_wget_takes_busyboxs_options_and_shows_its_usage_for_any_other(argv, parsed):
    if isinstance(parsed, tuple):
        assert busybox.parse(["wget", *argv]) == parsed
    else:
        with pytest.raises(busybox.UsageError) as refused:
            busybox.parse(["wget", *argv])
        assert str(refused.value).startswith(parsed) and (parsed or str(refused.value) == "")


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


@pytest.fixture
def time_scale(sandbox):
    """Set the app runtime's time scale for one test (back-off and probe periods are multiplied by it)."""
    before = sandbox.apps.time_scale

    def set_scale(value: float) -> None:
        sandbox.apps.time_scale = value
    yield set_scale
    sandbox.apps.time_scale = before


def bare_pod(sandbox, namespace: str, name: str, image: str, *, policy: str = "Always", **container) -> None:
    sandbox.kube.create("pods", namespace, {
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"restartPolicy": policy, "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "app", "image": image, "ports": [{"name": "http", "containerPort": 8080}],
                                 **container}]}})


def status_of(sandbox, namespace: str, name: str) -> dict:
    return (sandbox.kube.get("pods", namespace, name)["status"].get("containerStatuses") or [{}])[0]


def events(sandbox, namespace: str, reason: str) -> list[dict]:
    return [e for e in sandbox.kube.list("events", namespace) if e["reason"] == reason]


def test_a_crashing_container_restarts_with_back_off_doubling_to_five_minutes(sandbox, namespace, image, time_scale):
    time_scale(0.01)  # 10 s of back-off take 0.1 s: 10+20+40+80+160 s before the capped 300 s one
    bare_pod(sandbox, namespace, "crash", image, command=["python", "-c", "import sys; print('boom'); sys.exit(1)"])
    uid = sandbox.kube.get("pods", namespace, "crash")["metadata"]["uid"]
    seen: set[str] = set()

    def backed_off(wanted: str):
        status = status_of(sandbox, namespace, "crash")
        waiting = (status.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") == "CrashLoopBackOff":
            seen.add(waiting["message"])
        return status if waiting.get("message", "").startswith(f"back-off {wanted} ") else None
    status = wait_until(lambda: backed_off("5m0s"), 20, "the back-off to reach its maximum", interval=0.02)
    # Go's time.Duration text (kubernetes pkg/kubelet/kuberuntime/kuberuntime_manager.go doBackOff)
    assert status["state"]["waiting"]["message"] == \
        f"back-off 5m0s restarting failed container=app pod=crash_{namespace}({uid})"
    assert f"back-off 1m20s restarting failed container=app pod=crash_{namespace}({uid})" in seen, seen
    assert status["restartCount"] >= 5 and status["ready"] is False
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert status["lastState"]["terminated"]["reason"] == "Error"
    [backoff] = events(sandbox, namespace, "BackOff")
    assert backoff["type"] == "Warning" and backoff["count"] >= 4
    assert backoff["message"] == f"Back-off restarting failed container app in pod crash_{namespace}({uid})"
    log = "".join(c.text for c in sandbox.kube.logs.chunks(namespace, "crash", "app"))
    assert "boom" in log


def test_a_failing_liveness_probe_kills_and_restarts_the_container(sandbox, namespace, image, time_scale):
    time_scale(0.1)
    bare_pod(sandbox, namespace, "sick", image, env=[{"name": "HEALTHY", "value": "no"}],
             livenessProbe={"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 2,
                            "failureThreshold": 2})
    status = wait_until(lambda: (s := status_of(sandbox, namespace, "sick")).get("restartCount", 0) >= 1 and s,
                        20, "a restart after the liveness probe failed")
    # SIGTERM ends the Python server: 128 + 15
    assert status["lastState"]["terminated"]["exitCode"] == 143
    killing = events(sandbox, namespace, "Killing")
    assert killing and killing[0]["message"] == "Container app failed liveness probe, will be restarted"
    assert killing[0]["type"] == "Normal"
    assert any(e["message"].startswith("Liveness probe failed: ") for e in events(sandbox, namespace, "Unhealthy"))


def test_a_liveness_failure_under_restart_policy_never_kills_without_restarting(sandbox, namespace, image,
                                                                                 time_scale):
    time_scale(0.1)
    bare_pod(sandbox, namespace, "once", image, policy="Never", env=[{"name": "HEALTHY", "value": "no"}],
             livenessProbe={"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 2,
                            "failureThreshold": 2})

    def failed():
        pod = sandbox.kube.get("pods", namespace, "once")
        return pod if pod["status"].get("phase") == "Failed" else None
    pod = wait_until(failed, 20, "the pod to fail")
    status = pod["status"]["containerStatuses"][0]
    assert status["restartCount"] == 0 and status["state"]["terminated"]["exitCode"] == 143
    # kuberuntime_manager.go computePodActions adds ", will be restarted" only when the container restarts
    assert [e["message"] for e in events(sandbox, namespace, "Killing")] == ["Container app failed liveness probe"]


def test_tcp_socket_readiness_probe(sandbox, namespace, image, time_scale):
    from sandbox.kube.pods import POD_IP
    time_scale(0.1)
    bare_pod(sandbox, namespace, "tcp", image, env=[{"name": "HEALTHY", "value": "yes"}],
             readinessProbe={"tcpSocket": {"port": "http"}, "periodSeconds": 1})
    bare_pod(sandbox, namespace, "closed", image, env=[{"name": "HEALTHY", "value": "yes"}],
             ports=[{"name": "http", "containerPort": 8080}, {"name": "admin", "containerPort": 9090}],
             readinessProbe={"tcpSocket": {"port": "admin"}, "periodSeconds": 1})
    wait_until(lambda: ready(sandbox, namespace, "tcp"), 20, "the tcpSocket probe to pass")

    def refused():
        return [e for e in events(sandbox, namespace, "Unhealthy") if e["involvedObject"]["name"] == "closed"]
    [event] = wait_until(refused, 20, "the closed port's probe to fail")
    # pkg/probe/tcp/tcp.go DoTCPProbe: Go's dial error (net.OpError) for the pod's IP
    assert event["message"] == f"Readiness probe failed: dial tcp {POD_IP}:9090: connect: connection refused"
    assert ready(sandbox, namespace, "closed") is None


def test_a_probe_waits_for_the_first_period_tick_after_its_initial_delay(sandbox, namespace, image, time_scale):
    """worker.go: the worker probes at once and then every periodSeconds; a tick inside initialDelaySeconds does
    nothing, so a probe with initialDelaySeconds 5 and periodSeconds 10 first runs at 10 s, not at 5 s."""
    import time
    time_scale(0.1)
    created = time.monotonic()
    bare_pod(sandbox, namespace, "late", image, env=[{"name": "HEALTHY", "value": "yes"}],
             readinessProbe={"httpGet": {"path": "/health", "port": "http"}, "initialDelaySeconds": 5,
                             "periodSeconds": 10})
    wait_until(lambda: ready(sandbox, namespace, "late"), 20, "the delayed probe to pass", interval=0.02)
    assert time.monotonic() - created >= 0.95


SSE = b'''
import http.server, os, time
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Type", "text/event-stream"); self.end_headers()
        self.wfile.write(b"data: one\\n\\n")
        while not os.path.exists(os.environ["GATE"]):
            time.sleep(0.02)
        self.wfile.write(b"data: two\\n\\n")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
'''


def read_until(stream, marker: bytes, limit: float = 10) -> bytes:
    import select
    import time
    seen = b""
    deadline = time.monotonic() + limit
    while marker not in seen:
        assert time.monotonic() < deadline, f"no {marker!r} in {seen!r}"
        readable, _, _ = select.select([stream], [], [], 0.1)
        if readable:
            chunk = stream.recv(4096)
            assert chunk, f"closed before {marker!r}: {seen!r}"
            seen += chunk
    return seen


def test_a_streamed_response_passes_unbuffered_through_the_service_proxy_and_the_pods_dns_proxy(
        sandbox, namespace, image, tmp_path, time_scale):
    import socket
    from urllib.parse import urlsplit
    time_scale(0.1)
    (tmp_path / "sse.py").write_bytes(SSE)
    deploy(sandbox, namespace, "sse", image, command=["python", str(tmp_path / "sse.py")],
           env={"GATE": str(tmp_path / "gate")}, readiness={"tcpSocket": {"port": "http"}, "periodSeconds": 1})
    wait_until(lambda: ready(sandbox, namespace, "sse"), 20, "the streaming pod")
    api = urlsplit(sandbox.kube.url)
    dns = urlsplit(sandbox.dns.url(namespace))
    requests = [
        (api.port, f"GET /api/v1/namespaces/{namespace}/services/sse:80/proxy/events HTTP/1.1\r\n"
                   f"Host: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"),
        (dns.port, f"GET http://sse.{namespace}.svc.cluster.local/events HTTP/1.1\r\nHost: sse\r\n"
                   f"Accept: text/event-stream\r\n\r\n"),
    ]
    for port, request in requests:
        gate = tmp_path / "gate"
        gate.unlink(missing_ok=True)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(request.encode())
            first = read_until(client, b"data: one")
            assert b"200" in first.split(b"\r\n", 1)[0] and b"data: two" not in first
            gate.touch()  # only now does the server write its second event
            read_until(client, b"data: two")
    sandbox.kube.delete("deployments", namespace, "sse")


def pod_pids(sandbox, namespace: str, pod: dict) -> set[int]:
    """The pids whose environment names this pod and its 127.0.0.1 ports (sandbox/apps/runtime.py sets both)."""
    name = pod["metadata"]["name"]
    ports = ",".join(f"{c}={h}" for c, h in sandbox.kube.pod_ports(namespace, name).items())
    wanted = {f"HOSTNAME={name}".encode(), f"BUILDKIT_SANDBOX_POD_PORTS={ports}".encode()}
    pids = set()
    for entry in os.listdir("/proc"):
        try:
            environ = set(open(f"/proc/{entry}/environ", "rb").read().split(b"\0")) if entry.isdigit() else set()
        except OSError:
            continue
        if wanted <= environ:
            pids.add(int(entry))
    return pids


def test_service_proxy_redirects_a_get_of_proxy_without_a_slash(sandbox, namespace, image):
    import http.client
    from urllib.parse import urlsplit
    deploy(sandbox, namespace, "web", image)
    wait_until(lambda: ready(sandbox, namespace, "web"), 20, "the web pod")
    base = f"/api/v1/namespaces/{namespace}/services/web:80/proxy"
    connection = http.client.HTTPConnection("127.0.0.1", urlsplit(sandbox.kube.url).port, timeout=10)
    try:
        connection.request("GET", base + "?x=1")
        response = connection.getresponse()
        response.read()
        # apimachinery pkg/util/proxy/upgradeaware.go proxyRedirectsforRootPath
        assert (response.status, response.getheader("Location")) == (301, base + "/?x=1")
        connection.request("GET", base + "/")
        response = connection.getresponse()
        assert (response.status, response.read()) == (200, b"/ from pod in app")
    finally:
        connection.close()
    sandbox.kube.delete("deployments", namespace, "web")


def test_no_pod_process_outlives_sandbox_stop_and_another_sandboxs_pods_live_on(sandbox, namespace, image,
                                                                                   tmp_path):
    """A restart test: a second sandbox of its own, stopped while its pod runs; the session sandbox's pod is left
    alone (each runtime ends the processes it started)."""
    from sandbox.stack import Sandbox
    deploy(sandbox, namespace, "web", image)
    ours = pod_pids(sandbox, namespace, wait_until(lambda: ready(sandbox, namespace, "web"), 20, "the session pod"))
    assert ours
    other = Sandbox(tmp_path / "other").start()
    try:
        if not other.image_exists(image):  # moto's backends are per process: the image may be there already
            repository, _, reference = image.partition("/")[2].partition(":")
            tag, _, digest = reference.partition("@")
            built = built_image(digest)
            manifest, _ = image_manifest(final_stage_steps("buildkit", built.instructions, built.context, {}, OCI),
                                         {}, "", OCI)
            other.aws.client("ecr", "us-west-2").create_repository(repositoryName=repository)
            assert push_manifest(other.aws, "us-west-2", f"{REGISTRY}/{repository}:{tag}", manifest, digest)
        other.kube.create("namespaces", None, {"metadata": {"name": namespace}})
        deploy(other, namespace, "web", image)
        theirs = pod_pids(other, namespace, wait_until(lambda: ready(other, namespace, "web"), 20, "the other pod"))
        assert theirs and not theirs & ours
    finally:
        other.stop()

    def gone(pid: int) -> bool:
        """Ended: no such process, or a zombie (a `/bin/sh -c` container's child, reparented to this machine's
        init when the shell was killed, lingers until init reaps it)."""
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().rpartition(")")[2].split()[0] == "Z"
        except FileNotFoundError:
            return True
    assert all(gone(pid) for pid in theirs)
    assert not any(gone(pid) for pid in ours)
    assert ready(sandbox, namespace, "web")
    sandbox.kube.delete("deployments", namespace, "web")
