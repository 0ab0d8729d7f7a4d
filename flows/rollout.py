"""Deploy stage, the status checker: did every Deployment of a release really roll out, and if not, why.

helm's own wait says "not ready"; this says which Pod is stuck and on what
(ImagePullBackOff, CrashLoopBackOff with its last log lines), read from the
Kubernetes API while helm waits, before a rollback removes the evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time

import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from flows.kube import Watch, as_dict

PROBLEM_REASONS = {"ImagePullBackOff", "ErrImagePull", "CrashLoopBackOff", "CreateContainerConfigError",
                   "InvalidImageName", "RunContainerError", "OOMKilled", "Error"}
CRASH_LOG_LINES = 20


class RolloutFailed(RuntimeError):
    pass


def manifest_deployments(manifest: str, default_namespace: str) -> list[tuple[str, str]]:
    """(namespace, name) of every Deployment in a rendered helm manifest."""
    found = []
    for document in yaml.safe_load_all(manifest):
        if isinstance(document, dict) and document.get("kind") == "Deployment":
            meta = document.get("metadata") or {}
            found.append((meta.get("namespace") or default_namespace, meta["name"]))
    return found


def rollout_state(deployment: dict) -> str | None:
    """None when the Deployment's current template is fully rolled out, else what it is waiting for."""
    spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
    meta = deployment["metadata"]
    wanted = spec.get("replicas", 1)
    if status.get("observedGeneration", 0) < meta.get("generation", 1):
        return "the controller has not seen the new template yet"
    if status.get("updatedReplicas", 0) < wanted:
        return f"{status.get('updatedReplicas', 0)} of {wanted} replicas updated"
    if status.get("replicas", 0) > status.get("updatedReplicas", 0):
        return f"{status.get('replicas', 0) - status.get('updatedReplicas', 0)} old replicas still running"
    if status.get("availableReplicas", 0) < wanted:
        return f"{status.get('availableReplicas', 0)} of {wanted} replicas available"
    return None


async def verify_rollout(api: client.ApiClient, deployments: list[tuple[str, str]], timeout: float) -> None:
    """Wait until every Deployment has rolled out; raise RolloutFailed naming those that did not."""
    apps = client.AppsV1Api(api)
    deadline = time.monotonic() + timeout
    for namespace, name in deployments:
        waiting_for = "not found"
        while time.monotonic() < deadline:
            try:
                deployment = as_dict(api, await apps.read_namespaced_deployment(name, namespace))
            except ApiException as exc:
                if exc.status != 404:
                    raise
                deployment = None
            waiting_for = rollout_state(deployment) if deployment else "not found"
            if waiting_for is None:
                break
            await _wait_for_change(api, namespace, name, deadline)
        else:
            raise RolloutFailed(f"Deployment {namespace}/{name} did not roll out: {waiting_for}")


async def _wait_for_change(api: client.ApiClient, namespace: str, name: str, deadline: float) -> None:
    """Block until the Deployment changes (or a short while passes)."""
    remaining = max(1, min(int(deadline - time.monotonic()), 10))
    async with Watch(api) as stream:
        async for _ in stream.stream(client.AppsV1Api(api).list_namespaced_deployment, namespace,
                                     field_selector=f"metadata.name={name}", timeout_seconds=remaining):
            return


def owning_deployment(pod: dict) -> str | None:
    """Pods belong to a Deployment through a ReplicaSet named `<deployment>-<template hash>`."""
    for owner in pod["metadata"].get("ownerReferences") or []:
        if owner.get("kind") == "ReplicaSet":
            return owner["name"].rsplit("-", 1)[0]
    return None


def container_problems(pod: dict) -> list[str]:
    problems = []
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        last = (status.get("lastState") or {}).get("terminated") or {}
        for detail in (state.get("waiting"), state.get("terminated"), last):
            if detail and detail.get("reason") in PROBLEM_REASONS:
                message = detail.get("message") or (f"exit code {detail['exitCode']}" if "exitCode" in detail else "")
                problems.append(f"{status['name']}: {detail['reason']}" + (f": {message}" if message else ""))
                break
    return problems


def is_ready(pod: dict) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _event_time(event: dict) -> datetime.datetime:
    """The time `kubectl describe` orders events by: series.lastObservedTime, else lastTimestamp, else eventTime
    (kubernetes/kubernetes staging/src/k8s.io/kubectl/pkg/util/event/sorted_event_list.go eventTime, v1.35)."""
    series = event.get("series") or {}
    value = series.get("lastObservedTime") or event.get("lastTimestamp") or event.get("eventTime")
    if isinstance(value, datetime.datetime):
        return value
    try:
        return datetime.datetime.fromisoformat(str(value))
    except ValueError:
        return datetime.datetime.min.replace(tzinfo=datetime.UTC)


def latest_probe_failures(events: list[dict], pods: set[str]) -> dict[str, str]:
    """Pod name to the message of its latest `Unhealthy` event (the kubelet's `<kind> probe failed: <output>`,
    kubernetes/kubernetes pkg/kubelet/prober/prober.go), for the named Pods."""
    latest: dict[str, tuple[datetime.datetime, str]] = {}
    for event in events:
        involved = event.get("involvedObject") or {}
        pod = involved.get("name")
        if event.get("reason") != "Unhealthy" or involved.get("kind") != "Pod" or pod not in pods:
            continue
        when = _event_time(event)
        if pod not in latest or when >= latest[pod][0]:
            latest[pod] = when, event.get("message") or ""
    return {pod: message for pod, (_, message) in latest.items() if message}


class PodProblemRecorder:
    """Watches the Deployment Pods of a release's namespace while helm waits and keeps what went wrong with each.

    It starts before helm knows which Deployments the upgrade applies, so it keeps
    every Deployment's Pods and `describe` picks those of the release.
    """

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self._api = api
        self._namespace = namespace
        self._problems: dict[str, tuple[str, list[str]]] = {}
        self._crash_logs: dict[str, str] = {}
        self._unready: dict[str, str] = {}
        self._probe_failures: dict[str, str] = {}
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> PodProblemRecorder:
        self._task = asyncio.ensure_future(self._watch())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _watch(self) -> None:
        core = client.CoreV1Api(self._api)
        while True:
            try:
                async with Watch(self._api) as stream:
                    async for event in stream.stream(core.list_namespaced_pod, self._namespace, timeout_seconds=60):
                        pod = as_dict(self._api, event["object"])
                        if owner := owning_deployment(pod):
                            await self._record(core, pod, owner)
            except ApiException:
                await asyncio.sleep(1)

    async def _record(self, core: client.CoreV1Api, pod: dict, owner: str) -> None:
        name = pod["metadata"]["name"]
        if is_ready(pod):
            self._unready.pop(name, None)
        else:
            self._unready[name] = owner
        problems = container_problems(pod)
        if not problems:
            return
        self._problems[name] = owner, problems
        if any("CrashLoopBackOff" in p for p in problems) and name not in self._crash_logs:
            try:
                self._crash_logs[name] = await core.read_namespaced_pod_log(
                    name, self._namespace, tail_lines=CRASH_LOG_LINES, previous=True)
            except ApiException:
                self._crash_logs[name] = ""

    async def read_probe_failures(self) -> None:
        """The latest `Unhealthy` event of every Pod last seen not Ready: why a Pod that runs never became Ready.

        Events outlive the Pods a rollback deletes, so this may run after it. Without the right to list events
        the error goes without them.
        """
        try:
            events = await client.CoreV1Api(self._api).list_namespaced_event(self._namespace)
        except ApiException:
            return
        self._probe_failures.update(latest_probe_failures([as_dict(self._api, e) for e in events.items],
                                                          set(self._unready)))

    def describe(self, deployments: list[tuple[str, str]] | None) -> str:
        """The problems of the Pods of these Deployments; of every Deployment's Pods when they are not known."""
        names = None if deployments is None else {name for namespace, name in deployments
                                                  if namespace == self._namespace}
        problems = {pod: list(found) for pod, (owner, found) in self._problems.items()
                    if names is None or owner in names}
        for pod, message in self._probe_failures.items():
            if names is None or self._unready.get(pod) in names:
                problems.setdefault(pod, []).append(message)
        pods = sorted(problems)
        lines = [f"{pod}: {'; '.join(problems[pod])}" for pod in pods]
        for pod in pods:
            if self._crash_logs.get(pod, "").strip():
                lines.append(f"--- last log lines of {pod} ---\n{self._crash_logs[pod].rstrip()}")
        return "\n".join(lines)
