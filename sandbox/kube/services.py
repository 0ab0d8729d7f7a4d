"""Where traffic for a Service goes in the sandbox: its ready endpoint pods and the 127.0.0.1 port each pod's
process (sandbox/apps/runtime.py) listens on for the target container port.

The emulator runs no endpoints controller; a Service's endpoints are computed here as the EndpointSlice controller
would publish them: the pods its selector matches that are Ready and not terminating, each with the Service
port's `targetPort` (a number, or a container port's name) (kubernetes/kubernetes pkg/controller/endpointslice,
pkg/api/v1/pod FindPort, v1.35).

`proxy_target` is the API server's service proxy lookup, pkg/registry/core/service/storage/storage.go
`ResourceLocation` (v1.35): the id is `name`, `name:port` or `scheme:name:port` (apimachinery
pkg/util/net SplitSchemeNamePort, schemes "", http, https); a port number is turned into the Service port's
name first (`no service port %d found for service %q`, 503); then an endpoint serving that port name is picked
at random (`no endpoints available for service %q`, 503, with the name when there are none at all, with the id
when none serves the port).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import errors, selectors
from .pods import is_ready

if TYPE_CHECKING:
    from .emulator import KubeEmulator

CLUSTER_DOMAIN = "cluster.local"


@dataclass(frozen=True)
class Endpoint:
    pod: str
    container_port: int
    host_port: int | None
    """The 127.0.0.1 port the pod's process listens on for `container_port`; None when no process serves it (a pod
    the sandbox runs without a process): a connection to it is refused."""


def find_port(pod: dict, target: int | str) -> int | None:
    """pkg/api/v1/pod FindPort: a number is itself, a name is the container port so named."""
    if isinstance(target, int) or str(target).isdigit():
        return int(target)
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == target and (port.get("protocol") or "TCP") == "TCP":
                return int(port["containerPort"])
    return None


def endpoints(emulator: KubeEmulator, service: dict, service_port: dict) -> list[Endpoint]:
    """The ready endpoints of one port of the Service."""
    selector = (service.get("spec") or {}).get("selector")
    if not selector:
        return []
    namespace = service["metadata"].get("namespace", "default")
    target = service_port.get("targetPort", service_port.get("port"))
    found = []
    for pod in emulator.list("pods", namespace):
        if pod["metadata"].get("deletionTimestamp") or not is_ready(pod):
            continue
        if not selectors.match_labels({"matchLabels": selector}, pod["metadata"].get("labels")):
            continue
        port = find_port(pod, target)
        if port is None:
            continue
        name = pod["metadata"]["name"]
        found.append(Endpoint(name, port, emulator.pod_ports(namespace, name).get(port)))
    return found


def split_scheme_name_port(id_: str) -> tuple[str, str, str] | None:
    parts = id_.split(":")
    if len(parts) == 1:
        scheme, name, port = "", parts[0], ""
    elif len(parts) == 2:
        scheme, name, port = "", parts[0], parts[1]
    elif len(parts) == 3:
        scheme, name, port = parts
    else:
        return None
    return (scheme, name, port) if name and scheme in ("", "http", "https") else None


def proxy_target(emulator: KubeEmulator, namespace: str, id_: str) -> tuple[str, Endpoint]:
    """(scheme, endpoint) for `.../services/{id}/proxy`; raises the API server's errors."""
    parsed = split_scheme_name_port(id_)
    if parsed is None:
        raise errors.bad_request(f"invalid service request {id_!r}".replace("'", '"'))
    scheme, name, port_name = parsed
    service = emulator.get("services", namespace, name)
    if port_name.isdigit():
        if service is None:
            raise errors.ApiError(404, f'services "{name}" not found', "NotFound",
                                  {"name": name, "kind": "services"})
        match = next((p for p in service["spec"].get("ports") or [] if p.get("port") == int(port_name)), None)
        if match is None:
            raise errors.ApiError(503, f'no service port {port_name} found for service "{name}"')
        port_name = match.get("name", "")
    if service is None:
        raise errors.ApiError(404, f'endpoints "{name}" not found', "NotFound", {"name": name, "kind": "endpoints"})
    subsets = {p.get("name", ""): endpoints(emulator, service, p) for p in service["spec"].get("ports") or []}
    if not any(subsets.values()):
        raise errors.ApiError(503, f'no endpoints available for service "{name}"')
    serving = subsets.get(port_name) or []
    if not serving:
        raise errors.ApiError(503, f'no endpoints available for service "{id_}"')
    return scheme or "http", random.choice(serving)


def resolve_host(emulator: KubeEmulator, namespace: str, host: str) -> dict | None:
    """The Service a pod in `namespace` reaches by `host`, through its resolv.conf search path
    (`<ns>.svc.cluster.local svc.cluster.local cluster.local`, kubernetes/kubernetes pkg/kubelet/network/dns
    dns.go generateSearchesForDNSClusterFirst, v1.35): `svc`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`."""
    host = host.rstrip(".").lower()
    candidates = [host] + [f"{host}.{suffix}" for suffix in
                           (f"{namespace}.svc.{CLUSTER_DOMAIN}", f"svc.{CLUSTER_DOMAIN}", CLUSTER_DOMAIN)]
    for fqdn in candidates:
        labels = fqdn.split(".")
        if len(labels) == 5 and labels[2:] == ["svc", *CLUSTER_DOMAIN.split(".")]:
            service = emulator.get("services", labels[1], labels[0])
            if service is not None:
                return service
    return None


def service_endpoint(emulator: KubeEmulator, service: dict, port: int) -> Endpoint | None | str:
    """An endpoint for a connection to the Service's `port`: None when the Service has no such port (the
    connection goes nowhere), "" when it has no ready endpoint (kube-proxy rejects it: connection refused)."""
    match = next((p for p in service["spec"].get("ports") or [] if p.get("port") == port), None)
    if match is None:
        return None
    ready = endpoints(emulator, service, match)
    return random.choice(ready) if ready else ""
