"""What the API server's defaulting and registry strategies add to objects on write."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import itertools
import random

NAME_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_cluster_ips = (str(ipaddress.IPv4Address("10.96.0.10") + i) for i in itertools.count())


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def random_suffix(length: int = 5) -> str:
    return "".join(random.choice(NAME_SUFFIX_ALPHABET) for _ in range(length))


def _container_defaults(pod_spec: dict) -> None:
    for container in (pod_spec.get("containers") or []) + (pod_spec.get("initContainers") or []):
        container.setdefault("imagePullPolicy", "Always" if str(container.get("image", "")).endswith(":latest")
                             or ":" not in str(container.get("image", "")).rsplit("/", 1)[-1] else "IfNotPresent")
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        container.setdefault("resources", {})
        for port in container.get("ports") or []:
            port.setdefault("protocol", "TCP")


def pod_spec_defaults(pod_spec: dict, restart_policy: str = "Always") -> None:
    pod_spec.setdefault("restartPolicy", restart_policy)
    pod_spec.setdefault("terminationGracePeriodSeconds", 30)
    pod_spec.setdefault("dnsPolicy", "ClusterFirst")
    pod_spec.setdefault("schedulerName", "default-scheduler")
    pod_spec.setdefault("securityContext", {})
    _container_defaults(pod_spec)


def _secret(obj: dict) -> None:
    obj.setdefault("type", "Opaque")
    string_data = obj.pop("stringData", None) or {}
    if string_data:
        data = obj.setdefault("data", {})
        for key, value in string_data.items():
            data[key] = base64.b64encode(value.encode()).decode()


def _service(obj: dict) -> None:
    spec = obj.setdefault("spec", {})
    spec.setdefault("type", "ClusterIP")
    if spec.get("clusterIP") != "None":
        spec.setdefault("clusterIP", next(_cluster_ips))
        spec.setdefault("clusterIPs", [spec["clusterIP"]])
    spec.setdefault("sessionAffinity", "None")
    spec.setdefault("ipFamilies", ["IPv4"])
    spec.setdefault("ipFamilyPolicy", "SingleStack")
    spec.setdefault("internalTrafficPolicy", "Cluster")
    for port in spec.get("ports") or []:
        port.setdefault("protocol", "TCP")
        port.setdefault("targetPort", port.get("port"))
    obj.setdefault("status", {"loadBalancer": {}})


def _deployment(obj: dict) -> None:
    spec = obj.setdefault("spec", {})
    spec.setdefault("replicas", 1)
    spec.setdefault("revisionHistoryLimit", 10)
    spec.setdefault("progressDeadlineSeconds", 600)
    strategy = spec.setdefault("strategy", {"type": "RollingUpdate"})
    if strategy.get("type", "RollingUpdate") == "RollingUpdate":
        strategy.setdefault("rollingUpdate", {}).setdefault("maxUnavailable", "25%")
        strategy["rollingUpdate"].setdefault("maxSurge", "25%")
    pod_spec_defaults(spec.setdefault("template", {}).setdefault("spec", {}))


def _replicaset(obj: dict) -> None:
    obj.setdefault("spec", {}).setdefault("replicas", 1)
    pod_spec_defaults(obj["spec"].setdefault("template", {}).setdefault("spec", {}))


def _job(obj: dict) -> None:
    spec = obj.setdefault("spec", {})
    spec.setdefault("backoffLimit", 6)
    spec.setdefault("completions", 1)
    spec.setdefault("parallelism", 1)
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    spec.setdefault("manualSelector", False)
    spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")
    template = spec.setdefault("template", {})
    pod_spec_defaults(template.setdefault("spec", {}), restart_policy="Never")
    if not spec.get("manualSelector"):
        uid, name = obj["metadata"]["uid"], obj["metadata"]["name"]
        labels = {"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": name,
                  "controller-uid": uid, "job-name": name}
        template.setdefault("metadata", {}).setdefault("labels", {}).update(labels)
        spec.setdefault("selector", {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}})


def _pod(obj: dict) -> None:
    pod_spec_defaults(obj.setdefault("spec", {}))
    obj["spec"].setdefault("serviceAccountName", "default")
    obj.setdefault("status", {}).setdefault("phase", "Pending")
    obj["status"].setdefault("qosClass", "BestEffort")


def _namespace(obj: dict) -> None:
    obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
    obj.setdefault("status", {}).setdefault("phase", "Active")
    obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]


ON_CREATE = {"secrets": _secret, "services": _service, "deployments": _deployment, "replicasets": _replicaset,
             "jobs": _job, "pods": _pod, "namespaces": _namespace}
ON_UPDATE = {"secrets": _secret, "deployments": _deployment, "replicasets": _replicaset}


def on_create(plural: str, obj: dict) -> None:
    if plural in ON_CREATE:
        ON_CREATE[plural](obj)


def on_update(plural: str, obj: dict) -> None:
    if plural in ON_UPDATE:
        ON_UPDATE[plural](obj)
