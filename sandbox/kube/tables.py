"""Server-side printing (`meta.k8s.io/v1` Table) for human `kubectl get` output."""

from __future__ import annotations

import datetime
from collections.abc import Callable

from .catalog import ResourceType

Column = tuple[str, Callable[[dict], object]]


def wants_table(accept: str) -> bool:
    return "as=Table" in accept


def _age(obj: dict) -> str:
    created = obj["metadata"].get("creationTimestamp")
    if not created:
        return "<unknown>"
    started = datetime.datetime.fromisoformat(created.replace("Z", "+00:00"))
    seconds = int((datetime.datetime.now(datetime.UTC) - started).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _pod_status(pod: dict) -> str:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        if "waiting" in state:
            return state["waiting"].get("reason", "Waiting")
        if "terminated" in state:
            return state["terminated"].get("reason", "Terminated")
    if pod["metadata"].get("deletionTimestamp"):
        return "Terminating"
    return (pod.get("status") or {}).get("phase", "Pending")


def _pod_ready(pod: dict) -> str:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    total = len((pod.get("spec") or {}).get("containers") or [])
    return f"{sum(1 for s in statuses if s.get('ready'))}/{total}"


def _job_status(job: dict) -> str:
    conditions = {c["type"] for c in (job.get("status") or {}).get("conditions") or [] if c["status"] == "True"}
    for kind in ("Complete", "Failed", "Suspended"):
        if kind in conditions:
            return kind
    return "Running"


def _status(obj: dict, key: str, default: object = 0) -> object:
    return (obj.get("status") or {}).get(key, default)


COLUMNS: dict[str, list[Column]] = {
    "pods": [("Ready", _pod_ready), ("Status", _pod_status),
             ("Restarts", lambda p: sum(s.get("restartCount", 0) for s in _status(p, "containerStatuses", [])))],
    "deployments": [("Ready", lambda d: f"{_status(d, 'readyReplicas')}/{(d.get('spec') or {}).get('replicas', 1)}"),
                    ("Up-to-date", lambda d: _status(d, "updatedReplicas")),
                    ("Available", lambda d: _status(d, "availableReplicas"))],
    "replicasets": [("Desired", lambda r: (r.get("spec") or {}).get("replicas", 1)),
                    ("Current", lambda r: _status(r, "replicas")), ("Ready", lambda r: _status(r, "readyReplicas"))],
    "jobs": [("Status", _job_status),
             ("Completions", lambda j: f"{_status(j, 'succeeded')}/{(j.get('spec') or {}).get('completions', 1)}")],
    "services": [("Type", lambda s: (s.get("spec") or {}).get("type", "ClusterIP")),
                 ("Cluster-IP", lambda s: (s.get("spec") or {}).get("clusterIP", "<none>"))],
    "secrets": [("Type", lambda s: s.get("type", "Opaque")), ("Data", lambda s: len(s.get("data") or {}))],
    "configmaps": [("Data", lambda c: len(c.get("data") or {}) + len(c.get("binaryData") or {}))],
    "namespaces": [("Status", lambda n: _status(n, "phase", "Active"))],
}


def _partial_metadata(obj: dict) -> dict:
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}


def table(rt: ResourceType, items: list[dict], resource_version: str) -> dict:
    columns = [("Name", lambda o: o["metadata"]["name"])] + COLUMNS.get(rt.plural, []) + [("Age", _age)]
    definitions = [{"name": name, "type": "string", "format": "name" if name == "Name" else "",
                    "description": "", "priority": 0} for name, _ in columns]
    rows = [{"cells": [value(obj) for _, value in columns], "object": _partial_metadata(obj)} for obj in items]
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": definitions, "rows": rows}

