"""Pods as the kubelet would run them: status transitions (PodHandle) and container logs."""

from __future__ import annotations

import datetime
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import defaults, errors, kubelet

if TYPE_CHECKING:
    from .emulator import KubeEmulator

TERMINAL_PHASES = ("Succeeded", "Failed")
NODE_NAME = "sandbox-node"
POD_IP = "10.244.0.10"  # every pod's, as reported in its status


def container_names(pod: dict) -> list[str]:
    return [c.get("name", "") for c in (pod.get("spec") or {}).get("containers") or []] or [""]


def controller_owner(obj: dict) -> dict | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref
    return None


def is_ready(pod: dict) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def is_terminal(pod: dict) -> bool:
    return (pod.get("status") or {}).get("phase") in TERMINAL_PHASES


def _condition(kind: str, status: bool, reason: str | None = None, message: str | None = None) -> dict:
    condition = {"type": kind, "status": "True" if status else "False", "lastProbeTime": None,
                 "lastTransitionTime": defaults.now_iso()}
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    return condition


class PodHandle:
    """What a pod behaviour gets: the pod as created and the kubelet's levers on it.

    Every method is a no-op once the pod has been deleted (e.g. its Job was deleted)."""

    def __init__(self, emulator: KubeEmulator, pod: dict):
        self.emulator = emulator
        self.pod = pod
        self.namespace: str = pod["metadata"].get("namespace", "default")
        self.name: str = pod["metadata"]["name"]
        self._started_at: str | None = None

    def __repr__(self) -> str:
        return f"PodHandle({self.namespace}/{self.name})"

    @property
    def exists(self) -> bool:
        return self.emulator.get("pods", self.namespace, self.name) is not None

    def current(self) -> dict | None:
        return self.emulator.get("pods", self.namespace, self.name)

    def process(self, container: dict) -> tuple[list[str], list[str], dict[str, str]]:
        """What the kubelet starts `container` with: its command and args expanded against its environment
        (sandbox/kube/kubelet.py container_env, expand_command_and_args), and that environment, as
        kubernetes/kubernetes pkg/kubelet/kubelet_pods.go makeEnvironmentVariables and
        pkg/kubelet/container/helpers.go ExpandContainerCommandAndArgs (v1.35) do before the container starts."""
        env = kubelet.container_env(self.pod, container,
                                    lambda name: self.emulator.get("secrets", self.namespace, name))
        command, args = kubelet.expand_command_and_args(container, env)
        return command, args, env

    def _container_status(self, name: str, image: str, state: dict, ready: bool, started: bool) -> dict:
        return {"name": name, "image": image, "imageID": f"{image}@sha256:{'0' * 64}" if started else "",
                "containerID": f"containerd://{self.pod['metadata'].get('uid', '')[:12]}{name}" if started else "",
                "state": state, "lastState": {}, "ready": ready, "restartCount": 0, "started": started}

    def _images(self) -> list[tuple[str, str]]:
        containers = (self.pod.get("spec") or {}).get("containers") or []
        return [(c.get("name", ""), c.get("image", "")) for c in containers]

    def _write_status(self, status: dict, *, scheduled: bool = True) -> dict | None:
        """Write the pod status; a scheduled pod is also bound to the sandbox node.

        A pod that reached Succeeded or Failed keeps that status: the kubelet never changes a terminal
        phase (kubernetes/kubernetes pkg/kubelet/status/status_manager.go, v1.33), e.g. a build that
        finishes after its pod was evicted and stopped."""
        current = self.current()
        if current is not None and is_terminal(current):
            return None
        if current is not None and "conditions" in status:  # others' conditions (DisruptionTarget) stay
            written = {c["type"] for c in status["conditions"]}
            status["conditions"] = [c for c in (current.get("status") or {}).get("conditions") or []
                                    if c.get("type") not in written] + status["conditions"]
        patch: dict = {"status": {"hostIP": "10.0.0.1", "podIP": POD_IP, "qosClass": "BestEffort",
                                  **status}}
        if scheduled:
            patch["spec"] = {"nodeName": NODE_NAME}
        try:
            return self.emulator.patch("pods", self.namespace, self.name, patch,
                                       subresource=None if scheduled else "status")
        except errors.ApiError as exc:
            if exc.code == 404:
                return None
            raise

    def _scheduled(self) -> list[dict]:
        return [_condition("PodReadyToStartContainers", True), _condition("Initialized", True)]

    def running(self) -> dict | None:
        """Phase Running, every container running and ready, condition Ready=True."""
        self._started_at = self._started_at or defaults.now_iso()
        statuses = [self._container_status(name, image, {"running": {"startedAt": self._started_at}}, True, True)
                    for name, image in self._images()]
        conditions = self._scheduled() + [_condition("ContainersReady", True), _condition("Ready", True),
                                          _condition("PodScheduled", True)]
        return self._write_status({"phase": "Running", "startTime": self._started_at, "conditions": conditions,
                                   "containerStatuses": statuses})

    def log(self, line: str) -> None:
        self.emulator.append_pod_log(self.namespace, self.name, line + "\n")

    def terminate(self, exit_code: int, *, message: str = "", reason: str | None = None) -> dict | None:
        """Containers terminated with `exit_code`; `message` is the termination message."""
        started = self._started_at or defaults.now_iso()
        terminated = {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                      "startedAt": started, "finishedAt": defaults.now_iso()}
        if message:
            terminated["message"] = message
        statuses = [self._container_status(name, image, {"terminated": {**terminated,
                                                                         "containerID": f"containerd://{name}"}},
                                           False, False)
                    for name, image in self._images()]
        conditions = self._scheduled() + [_condition("ContainersReady", False, "PodCompleted"),
                                          _condition("Ready", False, "PodCompleted"),
                                          _condition("PodScheduled", True)]
        return self._write_status({"phase": "Succeeded" if exit_code == 0 else "Failed", "startTime": started,
                                   "conditions": conditions, "containerStatuses": statuses})

    def waiting(self, reason: str, message: str = "") -> dict | None:
        """Containers waiting (ImagePullBackOff, CrashLoopBackOff, ...); the pod is not ready."""
        state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        statuses = [self._container_status(name, image, state, False, False) for name, image in self._images()]
        not_ready = f"containers with unready status: [{' '.join(n for n, _ in self._images())}]"
        conditions = self._scheduled() + [_condition("ContainersReady", False, "ContainersNotReady", not_ready),
                                          _condition("Ready", False, "ContainersNotReady", not_ready),
                                          _condition("PodScheduled", True)]
        current = self.current() or {}
        phase = (current.get("status") or {}).get("phase", "Pending")
        return self._write_status({"phase": phase if phase == "Running" else "Pending",
                                   "startTime": self._started_at or defaults.now_iso(),
                                   "conditions": conditions, "containerStatuses": statuses})

    def report(self, statuses: list[dict], phase: str) -> dict | None:
        """Per-container statuses written as the kubelet's status manager does: Ready and ContainersReady are
        True when every container is ready, else False with `containers with unready status: [...]`
        (kubernetes/kubernetes pkg/kubelet/status/generate.go GeneratePodReadyCondition, v1.35)."""
        self._started_at = self._started_at or defaults.now_iso()
        unready = [s["name"] for s in statuses if not s.get("ready")]
        if phase in TERMINAL_PHASES:
            ready = [_condition("ContainersReady", False, "PodCompleted"), _condition("Ready", False, "PodCompleted")]
        elif unready:
            why = f"containers with unready status: [{' '.join(unready)}]"
            ready = [_condition("ContainersReady", False, "ContainersNotReady", why),
                     _condition("Ready", False, "ContainersNotReady", why)]
        else:
            ready = [_condition("ContainersReady", True), _condition("Ready", True)]
        return self._write_status({"phase": phase, "startTime": self._started_at,
                                   "conditions": self._scheduled() + ready + [_condition("PodScheduled", True)],
                                   "containerStatuses": statuses})

    def unschedulable(self, message: str) -> dict | None:
        return self._write_status({"phase": "Pending", "conditions": [
            _condition("PodScheduled", False, "Unschedulable", message)]}, scheduled=False)


@dataclass
class LogChunk:
    time: datetime.datetime
    text: str


class PodLogs:
    """Container output by (namespace, pod, container)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chunks: dict[tuple[str, str, str], list[LogChunk]] = {}

    def append(self, namespace: str, pod: str, container: str, text: str) -> None:
        with self._lock:
            self._chunks.setdefault((namespace, pod, container), []).append(
                LogChunk(datetime.datetime.now(datetime.UTC), text))

    def chunks(self, namespace: str, pod: str, container: str, start: int = 0) -> list[LogChunk]:
        with self._lock:
            return list(self._chunks.get((namespace, pod, container), [])[start:])

    def forget(self, namespace: str, pod: str) -> None:
        with self._lock:
            for key in [k for k in self._chunks if k[:2] == (namespace, pod)]:
                del self._chunks[key]
