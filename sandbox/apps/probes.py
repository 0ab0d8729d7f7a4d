"""Container probes as the kubelet runs them, against a pod process on 127.0.0.1.

Sources (kubernetes/kubernetes v1.35):
- pkg/apis/core/v1/defaults.go SetDefaults_Probe: timeoutSeconds 1, periodSeconds 10, successThreshold 1,
  failureThreshold 3; initialDelaySeconds 0.
- pkg/kubelet/prober/prober.go: a failure posts a Warning event, reason `Unhealthy` (events.ContainerUnhealthy),
  message `<Readiness|Liveness|Startup> probe failed: <output>`.
- pkg/kubelet/prober/worker.go (checked at kubernetes/kubernetes 00421113, newWorker/doProbe): a readiness result
  starts as Failure, liveness as Success, startup as Unknown (the container is not `started` until it succeeds); a
  result changes only after `successThreshold` / `failureThreshold` equal results in a row (`resultRun`);
  liveness and readiness are not run until the container has started; startup stops once it has; a liveness or
  startup failure puts the worker on hold until a new container (the kubelet kills it, restartPolicy applies).
- pkg/probe/http/http.go DoHTTPProbe: 200..399 is success, otherwise `HTTP probe failed with statuscode: <code>`;
  a transport error is Go's client error text, e.g. `Get "http://10.244.0.10:8080/health": dial tcp
  10.244.0.10:8080: connect: connection refused`, or `... context deadline exceeded (Client.Timeout exceeded
  while awaiting headers)`. The request carries `User-Agent: kube-probe/<major>.<minor>` and `Accept: */*`.
- pkg/probe/tcp/tcp.go DoTCPProbe: the dial error text, `dial tcp 10.244.0.10:8080: connect: connection refused`
  or `dial tcp 10.244.0.10:8080: i/o timeout`.
The pod IP in the texts is the address the emulator reports for every pod (sandbox/kube/pods.py).
"""

from __future__ import annotations

import http.client
import socket
from dataclasses import dataclass

from sandbox.kube.pods import POD_IP
from sandbox.kube.services import find_port

USER_AGENT = "kube-probe/1.35"
KINDS = {"startupProbe": "Startup", "livenessProbe": "Liveness", "readinessProbe": "Readiness"}


@dataclass(frozen=True)
class ProbeSpec:
    kind: str  # Startup, Liveness, Readiness
    handler: dict
    initial_delay: float
    period: float
    timeout: float
    success_threshold: int
    failure_threshold: int
    termination_grace: float | None = None
    """probe.terminationGracePeriodSeconds: the grace of a kill this probe causes (liveness, startup)."""


def probe_specs(container: dict) -> dict[str, ProbeSpec]:
    """The container's probes with their defaults; timing in seconds as written."""
    specs = {}
    for field_name, kind in KINDS.items():
        probe = container.get(field_name)
        if not probe:
            continue
        handler = {k: probe[k] for k in ("httpGet", "tcpSocket", "exec", "grpc") if k in probe}
        specs[kind] = ProbeSpec(kind, handler, float(probe.get("initialDelaySeconds") or 0),
                                float(probe.get("periodSeconds") or 10), float(probe.get("timeoutSeconds") or 1),
                                int(probe.get("successThreshold") or 1), int(probe.get("failureThreshold") or 3),
                                None if probe.get("terminationGracePeriodSeconds") is None
                                else float(probe["terminationGracePeriodSeconds"]))
    return specs


def probe_ports(pod: dict, container: dict) -> set[int]:
    ports = set()
    for spec in probe_specs(container).values():
        target = (spec.handler.get("httpGet") or spec.handler.get("tcpSocket") or {}).get("port")
        if target is not None and (port := find_port(pod, target)) is not None:
            ports.add(port)
    return ports


def _go_dial_error(exc: OSError, address: str) -> str:
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"dial tcp {address}: i/o timeout"
    if isinstance(exc, ConnectionRefusedError):
        return f"dial tcp {address}: connect: connection refused"
    return f"dial tcp {address}: connect: {exc.strerror or exc}".lower()


def run_probe(spec: ProbeSpec, pod: dict, ports: dict[int, int]) -> tuple[bool, str]:
    """(success, output) of one probe; `ports` maps container ports to the process's 127.0.0.1 ports."""
    if "httpGet" in spec.handler:
        return _http(spec.handler["httpGet"], spec.timeout, pod, ports)
    if "tcpSocket" in spec.handler:
        return _tcp(spec.handler["tcpSocket"], spec.timeout, pod, ports)
    kind = next(iter(spec.handler), "none")
    return False, f"the sandbox runs httpGet and tcpSocket probes only, not {kind}"


def _host_port(target, pod: dict, ports: dict[int, int]) -> tuple[int | None, int | None]:
    port = find_port(pod, target)
    return port, (ports.get(port) if port is not None else None)


def _tcp(handler: dict, timeout: float, pod: dict, ports: dict[int, int]) -> tuple[bool, str]:
    port, host_port = _host_port(handler.get("port"), pod, ports)
    address = f"{POD_IP}:{port}"
    if host_port is None:
        return False, f"dial tcp {address}: connect: connection refused"
    try:
        with socket.create_connection(("127.0.0.1", host_port), timeout=timeout):
            return True, ""
    except OSError as exc:
        return False, _go_dial_error(exc, address)


def _http(handler: dict, timeout: float, pod: dict, ports: dict[int, int]) -> tuple[bool, str]:
    port, host_port = _host_port(handler.get("port"), pod, ports)
    scheme = (handler.get("scheme") or "HTTP").lower()
    path = handler.get("path") or "/"
    url = f"{scheme}://{POD_IP}:{port}{path if path.startswith('/') else '/' + path}"
    address = f"{POD_IP}:{port}"
    if host_port is None:
        return False, f'Get "{url}": dial tcp {address}: connect: connection refused'
    headers = {"User-Agent": USER_AGENT, "Accept": "*/*"}
    headers.update({h["name"]: h.get("value", "") for h in handler.get("httpHeaders") or []})
    connection = http.client.HTTPConnection("127.0.0.1", host_port, timeout=timeout)
    try:
        try:
            connection.connect()
        except OSError as exc:
            return False, f'Get "{url}": {_go_dial_error(exc, address)}'
        try:
            connection.request("GET", path if path.startswith("/") else "/" + path, headers=headers)
            response = connection.getresponse()
            response.read(10 * 1024)
        except (TimeoutError, socket.timeout):
            return False, f'Get "{url}": context deadline exceeded (Client.Timeout exceeded while awaiting headers)'
        except (OSError, http.client.HTTPException) as exc:
            return False, f'Get "{url}": {exc}'
    finally:
        connection.close()
    if 200 <= response.status < 400:
        return True, ""
    return False, f"HTTP probe failed with statuscode: {response.status}"
