"""KubeEmulator: the in-process Kubernetes API server of the sandbox."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import pathlib
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import yaml
from aiohttp import web

from . import defaults, errors, kubelet, patching, rbac, selectors, tls
from .controllers import Controllers
from .pods import NODE_NAME, PodHandle, PodLogs, container_names, controller_owner, is_terminal
from .server import ApiServer, Fault, RequestRecord
from .store import ObjectStore

log = logging.getLogger(__name__)

PodMatcher = Callable[[dict], bool]
PodBehaviour = Callable[[PodHandle], None]
ImageResolver = Callable[[str], bool]


def _has_labels(wanted: dict) -> Callable[[dict], bool]:
    return lambda obj: selectors.match_labels({"matchLabels": wanted}, obj["metadata"].get("labels"))


class KubeEmulator:
    """A Kubernetes API server on 127.0.0.1 for kubectl, helm and kubernetes_asyncio.

    It serves from a background thread with its own event loop. Its state is read and
    written from any thread through the methods below (they return deep copies), and
    every write emits the watch events and resourceVersion bumps a real server would.
    Small Job/ReplicaSet/Deployment controllers and a pretend kubelet run the pods:
    a pod nobody registered a behaviour for runs and exits 0 (bare and Job pods) or
    becomes Ready after `rollout_delay` (pods of a ReplicaSet).

    Before any behaviour runs, the pod must get past the scheduler, its Secret volumes,
    its image pulls and its env Secrets (sandbox/kube/kubelet.py): an image runs only
    when `image_resolver` knows it, so a sandbox installs one (sandbox/stack.py) and a
    test that is not about images says so with `allow_any_image()`.
    `pod_failure_backoff` is the Job controller's delay before replacing a failed pod
    (DefaultJobPodFailureBackOff, 10 s), `image_pull_backoff` the kubelet's before
    pulling again (pkg/kubelet/kubelet.go backOffPeriod, 10 s), `termination_seconds`
    how long a pod being deleted takes to stop (its containers exit on SIGTERM).
    `log_bytes_per_second`, when set, is how fast a followed log reaches its reader
    (a busy node or API server: a follow still streams after the container has ended).
    """

    def __init__(self, *, rollout_delay: float = 0.2, pod_start_delay: float = 0.05,
                 job_pod_duration: float = 0.2, pod_failure_backoff: float = 10.0,
                 image_pull_backoff: float = 10.0, termination_seconds: float = 0.3):
        self.rollout_delay = rollout_delay
        self.pod_start_delay = pod_start_delay
        self.job_pod_duration = job_pod_duration
        self.pod_failure_backoff = pod_failure_backoff
        self.image_pull_backoff = image_pull_backoff
        self.termination_seconds = termination_seconds
        self.image_resolver: ImageResolver = lambda image: False
        self.kubelet_retry_seconds = 0.5
        self.log_bytes_per_second: float | None = None
        self.store = ObjectStore()
        self.logs = PodLogs()
        self.rbac = rbac.Rbac(self.store)
        self._server = ApiServer(self)
        self._controllers = Controllers(self)
        self._behaviours: list[tuple[PodMatcher, PodBehaviour]] = []
        self._pod_ports: dict[tuple[str, str], dict[int, int]] = {}
        self._behaviours_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._port: int | None = None
        self._tls_port: int | None = None
        self.certificate = tls.create()
        self._startup_error: BaseException | None = None
        self._seed_cluster()

    def _seed_cluster(self) -> None:
        """What every cluster has: the system namespaces, one Ready node and the bootstrap RBAC policy."""
        rbac.seed(self.store)
        for namespace in ("default", "kube-system", "kube-public"):
            self.store.create("namespaces", None, {"metadata": {"name": namespace}})
        self.store.create("nodes", None, {
            "metadata": {"name": NODE_NAME, "labels": {"kubernetes.io/hostname": NODE_NAME,
                                                       "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}},
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
                       "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110"},
                       "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110"},
                       # every field the kubelet fills (kubernetes/kubernetes pkg/kubelet/nodestatus/setters.go
                       # MachineInfo and VersionInfo, v1.35); k8s.io/api core/v1 NodeSystemInfo has them required
                       "nodeInfo": {"machineID": "0" * 32, "systemUUID": "ec2" + "0" * 29, "bootID": "sandbox-boot",
                                    "kernelVersion": "6.12.0-sandbox", "osImage": "Amazon Linux 2023",
                                    "containerRuntimeVersion": "containerd://2.1.0", "kubeletVersion": "v1.35.0",
                                    "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"}}})

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> KubeEmulator:
        if self._thread is not None:
            raise RuntimeError("the emulator is already started")
        self._port, self._startup_error, self._server.stopping = None, None, False
        self._controllers = Controllers(self)
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve_forever, args=(ready,), name="kube-emulator",
                                        daemon=True)
        self._thread.start()
        ready.wait(timeout=30)
        if self._startup_error is not None or self._port is None:
            raise RuntimeError("the Kubernetes emulator did not start") from self._startup_error
        self._controllers.start()
        return self

    def _serve_forever(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._serve(ready))
        except BaseException as exc:  # reported to start() through _startup_error
            self._startup_error = exc
            ready.set()

    async def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._server.loop = self._loop
        self._stop_requested = asyncio.Event()
        # handler_cancellation: a watch whose client went away ends at once, not at its next event.
        runner = web.AppRunner(self._server.app(), access_log=None, shutdown_timeout=1.0,
                               handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._port = runner.addresses[0][1]
        secure = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self.certificate.server_context())
        await secure.start()
        self._tls_port = runner.addresses[1][1]
        ready.set()
        await self._stop_requested.wait()
        await runner.cleanup()

    def stop(self) -> None:
        if self._thread is None or self._loop is None or self._stop_requested is None:
            return
        self._controllers.stop()
        self._server.stopping = True
        self._server.drop_watches()
        self._loop.call_soon_threadsafe(self._stop_requested.set)
        self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> KubeEmulator:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("the emulator is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def https_url(self) -> str:
        """The same API over TLS (certificate from `self.certificate.ca_pem`): clients send tokens only over TLS."""
        if self._tls_port is None:
            raise RuntimeError("the emulator is not started")
        return f"https://127.0.0.1:{self._tls_port}"

    def write_kubeconfig(self, path: str | os.PathLike) -> pathlib.Path:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        config = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "sandbox", "cluster": {"server": self.url}}],
            "users": [{"name": "sandbox", "user": {}}],
            "contexts": [{"name": "sandbox", "context": {"cluster": "sandbox", "user": "sandbox",
                                                         "namespace": "default"}}],
            "current-context": "sandbox",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)  # helm warns about group/world-readable kubeconfigs
        return path

    def write_service_account_kubeconfig(self, path: str | os.PathLike, namespace: str, name: str,
                                         expiration_seconds: int = rbac.DEFAULT_TOKEN_SECONDS) -> pathlib.Path:
        """A kubeconfig for an existing ServiceAccount: its requests are authorized by RBAC, not as the admin."""
        return rbac.write_service_account_kubeconfig(self.rbac, self.https_url, self.certificate.ca_pem, path, namespace,
                                                    name, expiration_seconds)

    def write_exec_kubeconfig(self, path: str | os.PathLike, principal: str, lifetime_seconds: float,
                              username: str | None = None, groups: tuple[str, ...] = ()) -> pathlib.Path:
        """A kubeconfig whose user gets tokens from an exec plugin (sandbox/kube/exec_credential.py, the
        sandbox's `aws eks get-token`) that work for `lifetime_seconds`; with `username`, the access entry that
        maps the IAM principal to that user and `groups` for RBAC (aws/aws-cli
        awscli/customizations/eks/get_token.py v2; docs.aws EKS CreateAccessEntry; kubernetes/client-go
        plugin/pkg/client/auth/exec/exec.go v0.35.2 runs the plugin)."""
        if username is not None:
            self.rbac.authenticator.exec_tokens.add_access_entry(principal, username, groups)
        return rbac.write_exec_kubeconfig(self.rbac, self.https_url, self.certificate.ca_pem, path, principal,
                                          lifetime_seconds)

    @property
    def exec_token_uses(self) -> list[rbac.ExecTokenUse]:
        """Each exec token's first accepted request and every refusal of one (sandbox/kube/rbac.py ExecTokens)."""
        return self.rbac.authenticator.exec_tokens.recorded()

    def revoke_exec_tokens(self) -> None:
        """The exec tokens issued so far answer 401 from now on; the plugin's next one works (`ExecTokens.revoke`;
        source: docs.aws IAM "revoking role session credentials", a deny on aws:TokenIssueTime)."""
        self.rbac.authenticator.exec_tokens.revoke()

    # ---------------------------------------------------------------- state

    def get(self, resource: str, namespace: str | None, name: str) -> dict | None:
        return self.store.find(resource, namespace, name)

    def list(self, resource: str, namespace: str | None = None,
             label_selector: str | dict | None = None) -> list[dict]:
        if isinstance(label_selector, dict):
            predicate = _has_labels(label_selector)
        else:
            predicate = selectors.label_selector(label_selector)
        items, _ = self.store.list(resource, namespace, predicate)
        return items

    def create(self, resource: str, namespace: str | None, obj: dict) -> dict:
        return self.store.create(resource, namespace, obj)

    def patch(self, resource: str, namespace: str | None, name: str, merge_patch: dict,
              subresource: str | None = None) -> dict:
        """A JSON merge patch. Without `subresource`, status changes are kept too
        (the Python API is the test's back door; HTTP clients get the real rules)."""
        return self.store.mutate(resource, namespace, name, lambda cur: patching.merge_patch(cur, merge_patch),
                                 subresource=subresource or "*")

    def delete(self, resource: str, namespace: str | None, name: str, *,
               propagation_policy: str = "Background") -> dict | None:
        """Delete (with its dependents); returns the deleted object, None if there was none."""
        try:
            deleted = self.store.delete(resource, namespace, name, propagation=propagation_policy)
        except errors.ApiError as exc:
            if exc.code == 404:
                return None
            raise
        if resource == "pods":
            self.logs.forget(deleted["metadata"].get("namespace", ""), name)
        return deleted

    # ---------------------------------------------------------------- observation and faults

    @property
    def requests(self) -> list[RequestRecord]:
        with self._server.lock:
            return list(self._server.records)

    def clear_requests(self) -> None:
        with self._server.lock:
            self._server.records.clear()

    def inject_fault(self, method: str, path_regex: str, status: int, times: int = 1, *,
                     after: bool = False, retry_after: int | None = None) -> None:
        """The next `times` requests whose method and path (re.search) match answer `status`.

        With after=True the request is performed first and its response replaced: a
        response lost on the way back. `retry_after` (seconds) adds the `Retry-After`
        header and `details.retryAfterSeconds`, as the API server sends with a 429."""
        with self._server.lock:
            self._server.faults.append(Fault(method.upper(), re.compile(path_regex), status, times, after,
                                             retry_after))

    def clear_faults(self) -> None:
        with self._server.lock:
            self._server.faults.clear()

    def drop_watches(self) -> None:
        self._server.drop_watches()

    def expire_history(self) -> None:
        """Every resourceVersion older than the current one now answers 410 Gone to watches."""
        self.store.expire_history()

    # ---------------------------------------------------------------- pods

    def append_pod_log(self, namespace: str, pod: str, text: str, container: str | None = None) -> None:
        if container is None:
            current = self.get("pods", namespace, pod)
            container = container_names(current)[0] if current else ""
        self.logs.append(namespace, pod, container, text)

    def pod_ports(self, namespace: str, pod: str) -> dict[int, int]:
        """container port -> the 127.0.0.1 port the pod's process listens on (sandbox/apps/runtime.py)."""
        with self._behaviours_lock:
            return dict(self._pod_ports.get((namespace, pod), {}))

    def set_pod_ports(self, namespace: str, pod: str, ports: dict[int, int] | None) -> None:
        with self._behaviours_lock:
            if ports:
                self._pod_ports[(namespace, pod)] = dict(ports)
            else:
                self._pod_ports.pop((namespace, pod), None)

    def on_pod(self, matcher: PodMatcher, behaviour: PodBehaviour) -> None:
        """Run `behaviour(handle)` in its own thread for each new Pod `matcher` accepts.
        The most recently registered matching behaviour wins."""
        with self._behaviours_lock:
            self._behaviours.append((matcher, behaviour))

    def clear_pod_behaviours(self) -> None:
        with self._behaviours_lock:
            self._behaviours.clear()

    def _behaviour_for(self, pod: dict) -> PodBehaviour:
        with self._behaviours_lock:
            candidates = list(reversed(self._behaviours))
        for matcher, behaviour in candidates:
            try:
                if matcher(copy.deepcopy(pod)):
                    return behaviour
            except Exception:
                log.exception("pod matcher %r crashed", matcher)
        return self._default_behaviour

    def _start_pod_behaviour(self, pod: dict) -> None:
        behaviour = self._behaviour_for(pod)
        handle = PodHandle(self, copy.deepcopy(pod))

        def run() -> None:
            try:
                if self._kubelet_admits(handle):
                    behaviour(handle)
            except Exception:
                log.exception("pod behaviour for %s crashed", handle)
        threading.Thread(target=run, name=f"pod-{handle.name}", daemon=True).start()

    def allow_any_image(self) -> None:
        """Every image pulls: for tests and tools that are not about images."""
        self.image_resolver = lambda image: True

    # ---------------------------------------------------------------- the scheduler and the kubelet

    def record_event(self, obj: dict, kind: str, reason: str, message: str, component: str) -> dict | None:
        """A core/v1 Event about `obj`; a repeat of the same reason and message bumps `count`, as the
        client-go event recorder's correlator does (k8s.io/client-go tools/record/events_cache.go)."""
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace", "default")
        involved = {"kind": obj.get("kind", "Pod"), "apiVersion": obj.get("apiVersion", "v1"),
                    "name": meta.get("name", ""), "namespace": namespace, "uid": meta.get("uid", "")}
        now = defaults.now_iso()
        for event in self.list("events", namespace):
            if (event.get("involvedObject") or {}).get("uid") == involved["uid"] \
                    and event.get("reason") == reason and event.get("message") == message:
                return self.patch("events", namespace, event["metadata"]["name"],
                                  {"count": event.get("count", 1) + 1, "lastTimestamp": now})
        return self.create("events", namespace, {
            "metadata": {"generateName": f"{involved['name']}."}, "involvedObject": involved,
            "reason": reason, "message": message, "type": kind, "source": {"component": component},
            "reportingComponent": component, "count": 1, "firstTimestamp": now, "lastTimestamp": now})

    def image_pullable(self, image: str) -> bool:
        try:
            return bool(self.image_resolver(image))
        except Exception:
            log.exception("the image resolver failed on %s", image)
            return False

    def _kubelet_admits(self, handle: PodHandle) -> bool:
        """Schedule the pod, mount its Secrets, pull its images and resolve its env, as far as each can go.

        A pod that no node fits stays Pending (PodScheduled=False, Unschedulable); one whose Secret or image
        is missing waits (ContainerCreating, ErrImagePull/ImagePullBackOff, CreateContainerConfigError) and
        is retried until it is deleted. True once its containers may start.
        """
        pod = handle.pod
        nodes = self.list("nodes")
        if message := kubelet.unschedulable_message(pod, nodes):
            handle.unschedulable(message)
            self.record_event(pod, "Warning", "FailedScheduling", message, "default-scheduler")
            return False
        self.record_event(pod, "Normal", "Scheduled",
                          f"Successfully assigned {handle.namespace}/{handle.name} to {NODE_NAME}", "default-scheduler")

        def get_secret(name: str) -> dict | None:
            return self.get("secrets", handle.namespace, name)

        def still_wanted() -> bool:
            current = handle.current()
            return current is not None and not current["metadata"].get("deletionTimestamp")

        while failures := kubelet.mount_failures(pod, get_secret):
            if not still_wanted():
                return False
            handle.waiting("ContainerCreating")
            for failure in failures:
                self.record_event(pod, "Warning", "FailedMount", failure, "kubelet")
            time.sleep(self.kubelet_retry_seconds)
        for container in (pod.get("spec") or {}).get("containers") or []:
            image = container.get("image", "")
            while not self.image_pullable(image):
                if not still_wanted():
                    return False
                self.record_event(pod, "Normal", "Pulling", f'Pulling image "{image}"', "kubelet")
                error = kubelet.pull_error(image)
                self.record_event(pod, "Warning", "Failed", f'Failed to pull image "{image}": {error}', "kubelet")
                self.record_event(pod, "Warning", "Failed", "Error: ErrImagePull", "kubelet")
                handle.waiting("ErrImagePull", error)
                time.sleep(min(1.0, self.image_pull_backoff))
                if not still_wanted():
                    return False
                self.record_event(pod, "Normal", "BackOff", f'Back-off pulling image "{image}"', "kubelet")
                self.record_event(pod, "Warning", "Failed", "Error: ImagePullBackOff", "kubelet")
                handle.waiting("ImagePullBackOff", f'Back-off pulling image "{image}"')
                time.sleep(self.image_pull_backoff)
        for container in (pod.get("spec") or {}).get("containers") or []:
            while error := kubelet.env_secret_error(pod, container, get_secret):
                if not still_wanted():
                    return False
                handle.waiting("CreateContainerConfigError", error)
                self.record_event(pod, "Warning", "Failed", f"Error: {error}", "kubelet")
                time.sleep(self.kubelet_retry_seconds)
        return still_wanted()

    def delete_pod_gracefully(self, namespace: str, name: str) -> None:
        """Delete a pod the way the API server and kubelet do it with a grace period: `deletionTimestamp`
        first, its containers stop (SIGTERM, exit 143 unless they ended already), the pod turns Failed,
        then the object goes (kubernetes/kubernetes pkg/kubelet/kubelet.go syncTerminatingPod, v1.33)."""
        try:
            marked = self.store.mark_deleting("pods", namespace, name)
        except errors.ApiError as exc:
            if exc.code == 404:
                return
            raise
        grace = min(float(marked["spec"].get("terminationGracePeriodSeconds", 30)), self.termination_seconds)
        timer = threading.Timer(grace, self._finish_termination, args=(namespace, name))
        timer.daemon = True
        timer.start()

    def _finish_termination(self, namespace: str, name: str) -> None:
        with self.store.lock:
            pod = self.get("pods", namespace, name)
            if pod is None:
                return
            if not is_terminal(pod):
                PodHandle(self, pod).terminate(143, reason="Error")
            if (controller_owner(pod) or {}).get("kind") != "Job":
                self.delete("pods", namespace, name)
            # a Job's pod keeps its batch.kubernetes.io/job-tracking finalizer until the Job controller has
            # counted it (controllers.py reconcile_job deletes it then)

    def evict(self, namespace: str, name: str) -> dict | None:
        """What `POST .../pods/{name}/eviction` does to a pod no PodDisruptionBudget protects: the
        DisruptionTarget condition (reason EvictionByEvictionAPI), then a graceful delete
        (kubernetes/kubernetes pkg/registry/core/pod/storage/eviction.go, v1.33)."""
        def mark(pod: dict) -> dict:
            conditions = [c for c in (pod.get("status") or {}).get("conditions") or []
                          if c.get("type") != "DisruptionTarget"]
            conditions.append({"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                               "message": "Eviction API: evicting", "lastProbeTime": None,
                               "lastTransitionTime": defaults.now_iso()})
            pod.setdefault("status", {})["conditions"] = conditions
            return pod
        try:
            evicted = self.store.mutate("pods", namespace, name, mark, subresource="status")
        except errors.ApiError as exc:
            if exc.code == 404:
                return None
            raise
        self.delete_pod_gracefully(namespace, name)
        return evicted

    def _default_behaviour(self, handle: PodHandle) -> None:
        owner = controller_owner(handle.pod) or {}
        if owner.get("kind") in ("ReplicaSet", "StatefulSet", "DaemonSet"):
            time.sleep(self.rollout_delay)
            handle.running()
            return
        time.sleep(self.pod_start_delay)
        if handle.running() is None:
            return
        time.sleep(self.job_pod_duration)
        handle.terminate(0)
