"""App pods as local processes: the emulator's kubelet for images a simulated builder pushed.

Each container of such a pod runs as a process started from the image's build context (extracted to a temp
directory as the final stage's COPY/ADD lay it out), its WORKDIR, ENV and ENTRYPOINT/CMD (sandbox/apps/image.py),
the pod's `env` and `command`/`args` (sandbox/kube/kubelet.py). `python` is this project's venv interpreter (the
image's `pip install` is simulated). Ports: see sandbox/apps/shim/sitecustomize.py. stdout and stderr are the
container's log. Cluster DNS: `HTTP_PROXY` points at the sandbox's service proxy for the pod's namespace
(sandbox/apps/dnsproxy.py).

The kubelet's behaviour, kubernetes/kubernetes v1.35:
- restartPolicy (pkg/kubelet/kuberuntime/kuberuntime_manager.go computePodActions, pkg/kubelet/container
  helpers.go ShouldContainerBeRestarted): Always restarts any exit, OnFailure a non-zero one, Never none; the
  first restart is at once, later ones wait a back-off of 10 s doubling to 300 s (pkg/kubelet/kubelet.go
  backOffPeriod = 10 s, pkg/kubelet/apis/config/v1beta1/defaults.go MaxContainerBackOff = 300 s; client-go
  util/flowcontrol/backoff.go Next doubles up to the maximum) while the container waits with reason
  CrashLoopBackOff, message `back-off <d> restarting failed container=<c> pod=<pod>_<ns>(<uid>)` with <d> a Go
  time.Duration (`10s`, `1m20s`, `5m0s`), and the kubelet posts the Warning event BackOff `Back-off restarting
  failed container <c> in pod <pod>_<ns>(<uid>)` (pkg/kubelet/kuberuntime/kuberuntime_manager.go doBackOff).
- a container that cannot start (executable not found) terminates with exit code 128, reason StartError and
  containerd's message (containerd v2 / runc: `failed to create containerd task: failed to create shim task: OCI
  runtime create failed: runc create failed: unable to start container process: exec: "<x>": executable file not
  found in $PATH: unknown`).
- probes: sandbox/apps/probes.py; a liveness or startup failure posts Normal `Killing` `Container <c> failed
  <liveness|startup> probe, will be restarted` (pkg/kubelet/kuberuntime/kuberuntime_manager.go computePodActions;
  without `, will be restarted` under restartPolicy Never, which then leaves it terminated) and kills it with the
  probe's terminationGracePeriodSeconds when it has one (kuberuntime_container.go setTerminationGracePeriod).
  Probe timing follows pkg/kubelet/prober/worker.go run/doProbe: the worker probes at once and then every period
  on a fixed ticker from its start (kept across restarts of the container); a tick before initialDelaySeconds
  (whole seconds since the container started) does nothing.
- deletion: SIGTERM to the container's processes, SIGKILL after terminationGracePeriodSeconds (capped by
  `grace_cap` here).
Timing knobs (back-off, probe periods and initial delays) are multiplied by `time_scale`, probe timeouts are not.
No process outlives the runtime: `stop()`, an atexit hook, and PR_SET_PDEATHSIG (the process dies with this one
even when it is killed) end them.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import posixpath
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.apps.image import ImageConfig, container_argv, image_config
from sandbox.apps.probes import ProbeSpec, probe_ports, probe_specs, run_probe
from sandbox.builders import BuiltImage
from sandbox.kube import KubeEmulator, PodHandle
from sandbox.kube import defaults
from sandbox.kube import kubelet as kubelet_rules
from sandbox.kube.pods import is_terminal

log = logging.getLogger(__name__)

VENV_BIN = Path(sys.executable).parent
SHIM = Path(__file__).resolve().parent / "shim"
PYTHON = re.compile(r"python(3(\.\d+)?)?")
BACKOFF_INITIAL, BACKOFF_MAX = 10.0, 300.0
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_live: set[subprocess.Popen] = set()
_live_lock = threading.Lock()


def _die_with_parent() -> None:
    if _libc is not None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _kill_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _forget(process: subprocess.Popen) -> None:
    with _live_lock:
        _live.discard(process)


@atexit.register
def kill_all(only: set[subprocess.Popen] | None = None) -> None:
    """Every pod process still running (or those of `only`), SIGKILLed; at interpreter exit all of them."""
    with _live_lock:
        doomed = list(_live if only is None else _live & only)
        _live.difference_update(doomed)
    for process in doomed:
        _kill_group(process, signal.SIGKILL)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def materialise(config: ImageConfig, image: BuiltImage, root: Path) -> None:
    """The files the final stage's COPY/ADD put into the image, under `root` (the image's `/`)."""
    files = {path: data for path, data in image.context.items() if data is not None}
    for sources, destination in config.copies:
        for source in sources:
            prefix = source.strip("/").removeprefix("./") if source not in (".", "./", "/") else ""
            for path, data in files.items():
                if prefix and path != prefix and not path.startswith(prefix + "/"):
                    continue
                if path == prefix:
                    target = posixpath.join(destination, posixpath.basename(path)) \
                        if destination.endswith("/") else destination
                else:
                    target = posixpath.join(destination, path[len(prefix):].lstrip("/") if prefix else path)
                out = root / target.lstrip("/")
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(data)


def resolve_executable(argv0: str, root: Path) -> str | None:
    """What the container would exec for argv[0]: the venv's interpreter for `python`, the venv's console
    scripts (what `pip install` put on PATH), a shell, or a file of the image; None when there is none."""
    base = posixpath.basename(argv0)
    if PYTHON.fullmatch(base):
        return sys.executable
    if "/" in argv0:
        if argv0 in ("/bin/sh", "/bin/bash", "/usr/bin/env") and Path(argv0).exists():
            return argv0
        inside = root / argv0.lstrip("/")
        return str(inside) if inside.is_file() and os.access(inside, os.X_OK) else None
    if (VENV_BIN / argv0).exists():
        return str(VENV_BIN / argv0)
    if argv0 in ("sh", "bash", "env"):
        return shutil.which(argv0)
    return None


def not_found_message(argv0: str) -> str:
    return ("failed to create containerd task: failed to create shim task: OCI runtime create failed: runc create "
            f'failed: unable to start container process: exec: "{argv0}": executable file not found in $PATH: '
            "unknown")


def go_duration(seconds: float) -> str:
    """Go's time.Duration String() for whole seconds: `10s`, `1m20s`, `5m0s`, `1h0m0s`."""
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass
class ProbeState:
    spec: ProbeSpec
    next_at: float
    result: bool
    successes: int = 0
    failures: int = 0


@dataclass
class Container:
    spec: dict
    config: ImageConfig
    name: str
    image: str
    process: subprocess.Popen | None = None
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict = field(default_factory=dict)
    restarts: int = 0
    exits: int = 0
    start_at: float = 0.0
    started_at: str = ""
    probes: dict[str, ProbeState] = field(default_factory=dict)
    ticks: dict[str, float] = field(default_factory=dict)
    """Each probe worker's next tick: the worker outlives restarts of its container (prober_manager.go)."""
    running_since: float = 0.0
    done: bool = False

    @property
    def started(self) -> bool:
        startup = self.probes.get("Startup")
        return self.process is not None and (startup is None or startup.result)

    @property
    def ready(self) -> bool:
        readiness = self.probes.get("Readiness")
        return self.started and (readiness is None or readiness.result)


class AppRuntime:
    """Runs the pods whose every container image a simulated builder pushed (`resolve` knows its build)."""

    def __init__(self, emulator: KubeEmulator, resolve: Callable[[str], BuiltImage | None], *,
                 proxy_url: Callable[[str], str | None] = lambda namespace: None, time_scale: float = 0.1,
                 grace_cap: float = 2.0, tick: float = 0.05) -> None:
        self.emulator = emulator
        self.resolve = resolve
        self.proxy_url = proxy_url
        self.time_scale = time_scale
        self.grace_cap = grace_cap
        self.tick = tick
        self._stopping = threading.Event()
        self._tmp = tempfile.TemporaryDirectory(prefix="sandbox-pods-")
        self.started: set[subprocess.Popen] = set()
        """Every process this runtime started: `stop()` ends these, not another sandbox's."""

    def recognises(self, pod: dict) -> bool:
        containers = (pod.get("spec") or {}).get("containers") or []
        return bool(containers) and all(self.resolve(c.get("image", "")) for c in containers)

    def install(self) -> None:
        self.emulator.on_pod(self.recognises, self.run)

    def stop(self) -> None:
        self._stopping.set()
        kill_all(self.started)

    def run(self, handle: PodHandle) -> None:
        PodRun(self, handle).run()


class PodRun:
    def __init__(self, runtime: AppRuntime, handle: PodHandle) -> None:
        self.runtime = runtime
        self.handle = handle
        self.pod = handle.pod
        self.uid = self.pod["metadata"].get("uid", "")
        self.policy = (self.pod.get("spec") or {}).get("restartPolicy", "Always")
        self.root = Path(tempfile.mkdtemp(prefix=f"{handle.name}-", dir=runtime._tmp.name))
        self.containers: list[Container] = []
        self.ports: dict[int, int] = {}
        self._last_report: object = None

    # ------------------------------------------------------------------ setup

    def _prepare(self) -> None:
        wanted: set[int] = set()
        for spec in self.pod["spec"]["containers"]:
            built = self.runtime.resolve(spec["image"])
            config = image_config(built.instructions, built.build_args)
            materialise(config, built, self.root / spec["name"])
            self.containers.append(Container(spec, config, spec["name"], spec["image"]))
            wanted |= {int(p["containerPort"]) for p in spec.get("ports") or [] if p.get("containerPort")}
            wanted |= set(config.exposed) | probe_ports(self.pod, spec)
        for service in self.runtime.emulator.list("services", self.handle.namespace):
            for port in (service.get("spec") or {}).get("ports") or []:
                target = port.get("targetPort", port.get("port"))
                if isinstance(target, int) or str(target).isdigit():
                    wanted.add(int(target))
        self.ports = {port: free_port() for port in sorted(wanted)}
        self.runtime.emulator.set_pod_ports(self.handle.namespace, self.handle.name, self.ports)

    def _environment(self, container: Container) -> tuple[list[str], dict[str, str], Path] | str:
        """(argv, env, cwd) of the container's process, or why it cannot start."""
        command, args, pod_env = self.handle.process(container.spec)
        argv = container_argv(container.config, command, args)
        root = self.root / container.name
        if not argv:
            return "no command specified"
        executable = resolve_executable(argv[0], root)
        if executable is None:
            return not_found_message(argv[0])
        argv = [executable] + [str(root / a.lstrip("/")) if a.startswith("/") and (root / a.lstrip("/")).exists()
                               else a for a in argv[1:]]
        env = dict(container.config.env)
        env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
        env.update({"HOSTNAME": self.handle.name, "HOME": str(root)})
        env.update(pod_env)
        env["PYTHONPATH"] = os.pathsep.join([str(SHIM), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
        env["BUILDKIT_SANDBOX_POD_PORTS"] = ",".join(f"{c}={h}" for c, h in self.ports.items())
        if proxy := self.runtime.proxy_url(self.handle.namespace):
            env.update({"HTTP_PROXY": proxy, "http_proxy": proxy, "NO_PROXY": "127.0.0.1,localhost",
                        "no_proxy": "127.0.0.1,localhost"})
        workdir = root / container.config.workdir.lstrip("/")
        workdir.mkdir(parents=True, exist_ok=True)
        return argv, env, workdir

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        try:
            self._prepare()
            while not self.runtime._stopping.is_set():
                current = self.handle.current()
                if current is None or current["metadata"].get("deletionTimestamp"):
                    self._terminate_all(current)
                    return
                now = time.monotonic()
                for container in self.containers:
                    self._step(container, now)
                self._report()
                if all(c.done for c in self.containers):
                    return
                time.sleep(self.runtime.tick)
        except kubelet_rules.EnvError as exc:
            self.handle.waiting("CreateContainerConfigError", str(exc))
        finally:
            for container in self.containers:
                self._kill(container, 0)
            self.runtime.emulator.set_pod_ports(self.handle.namespace, self.handle.name, None)
            shutil.rmtree(self.root, ignore_errors=True)

    def _step(self, container: Container, now: float) -> None:
        if container.done:
            return
        if container.process is None:
            if now >= container.start_at:
                self._start(container)
            return
        code = container.process.poll()
        if code is not None:
            self._exited(container, code, "Completed" if code == 0 else "Error")
            return
        self._probe(container, now)

    def _start(self, container: Container) -> None:
        prepared = self._environment(container)
        if isinstance(prepared, str):
            self._exited(container, 128, "StartError", prepared)
            return
        argv, env, cwd = prepared
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_die_with_parent)
        with _live_lock:
            _live.add(process)
            self.runtime.started.add(process)
        for stream in (process.stdout, process.stderr):
            threading.Thread(target=self._pump, args=(stream, container.name), daemon=True,
                             name=f"log-{self.handle.name}-{container.name}").start()
        container.process = process
        container.started_at = defaults.now_iso()
        container.state = {"running": {"startedAt": container.started_at}}
        now = time.monotonic()
        container.running_since = now
        container.probes = {kind: ProbeState(spec, container.ticks.setdefault(kind, now), kind != "Readiness")
                            for kind, spec in probe_specs(container.spec).items()}
        if "Startup" in container.probes:
            container.probes["Startup"].result = False
        self.runtime.emulator.record_event(self.pod, "Normal", "Started", f"Started container {container.name}",
                                           "kubelet")

    def _pump(self, stream, container: str) -> None:
        for line in iter(stream.readline, b""):
            self.runtime.emulator.append_pod_log(self.handle.namespace, self.handle.name,
                                                 line.decode(errors="replace"), container)
        stream.close()

    def _exited(self, container: Container, code: int, reason: str, message: str = "") -> None:
        if container.process is not None:
            _forget(container.process)
        container.process = None
        terminated = {"exitCode": code, "reason": reason, "startedAt": container.started_at or defaults.now_iso(),
                      "finishedAt": defaults.now_iso(), **({"message": message} if message else {})}
        container.exits += 1
        restart = self.policy == "Always" or (self.policy == "OnFailure" and code != 0)
        if not restart:
            container.state, container.done = {"terminated": terminated}, True
            return
        container.last_state = {"terminated": terminated}
        container.restarts += 1
        delay = 0.0 if container.exits == 1 else min(BACKOFF_INITIAL * 2 ** (container.exits - 2), BACKOFF_MAX)
        container.start_at = time.monotonic() + delay * self.runtime.time_scale
        if delay:
            pod = f"{self.handle.name}_{self.handle.namespace}({self.uid})"
            container.state = {"waiting": {"reason": "CrashLoopBackOff", "message":
                                           f"back-off {go_duration(delay)} restarting failed "
                                           f"container={container.name} pod={pod}"}}
            self.runtime.emulator.record_event(self.pod, "Warning", "BackOff",
                                               f"Back-off restarting failed container {container.name} in pod {pod}",
                                               "kubelet")
        else:
            container.state = {"waiting": {"reason": "ContainerCreating"}}

    def _probe(self, container: Container, now: float) -> None:
        startup = container.probes.get("Startup")
        scale = self.runtime.time_scale
        for kind, state in container.probes.items():
            if now < state.next_at:
                continue
            while state.next_at <= now:
                state.next_at += state.spec.period * scale
            container.ticks[kind] = state.next_at
            if int((now - container.running_since) / scale) < state.spec.initial_delay:
                continue
            if kind != "Startup" and startup is not None and not startup.result:
                continue
            if kind == "Startup" and state.result:
                continue
            success, output = run_probe(state.spec, self.pod, self.ports)
            if success:
                state.successes, state.failures = state.successes + 1, 0
                if state.successes >= state.spec.success_threshold:
                    state.result = True
                continue
            state.failures, state.successes = state.failures + 1, 0
            self.runtime.emulator.record_event(self.pod, "Warning", "Unhealthy", f"{kind} probe failed: {output}",
                                               "kubelet")
            if state.failures < state.spec.failure_threshold:
                continue
            state.result = False
            if kind in ("Liveness", "Startup"):
                restarts = self.policy != "Never"
                self.runtime.emulator.record_event(
                    self.pod, "Normal", "Killing", f"Container {container.name} failed {kind.lower()} probe"
                    + (", will be restarted" if restarts else ""), "kubelet")
                grace = state.spec.termination_grace
                code = self._kill(container, self._grace() if grace is None else min(grace, self.runtime.grace_cap))
                self._exited(container, code, "Error")
                return

    # ------------------------------------------------------------------ stopping

    def _grace(self, pod: dict | None = None) -> float:
        seconds = float(((pod or self.pod).get("spec") or {}).get("terminationGracePeriodSeconds", 30))
        return min(seconds, self.runtime.grace_cap)

    def _kill(self, container: Container, grace: float) -> int:
        """SIGTERM to the container's process group, SIGKILL after `grace`; the exit code."""
        process = container.process
        if process is None:
            return 0
        if process.poll() is None:
            _kill_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _kill_group(process, signal.SIGKILL)
                process.wait(timeout=5)
        _kill_group(process, signal.SIGKILL)  # what the container's process left behind
        _forget(process)
        container.process = None
        code = process.returncode
        return 128 - code if code < 0 else code

    def _terminate_all(self, current: dict | None) -> None:
        grace = self._grace(current)
        for container in self.containers:
            self._kill(container, grace)

    def _report(self) -> None:
        statuses = []
        for container in self.containers:
            started = container.process is not None
            statuses.append({
                "name": container.name, "image": container.image,
                "imageID": container.image if "@" in container.image else "",
                "containerID": f"containerd://{self.uid[:12]}{container.name}{container.restarts}" if started else "",
                "state": container.state, "lastState": container.last_state, "ready": container.ready,
                "restartCount": container.restarts, "started": container.started})
        if all(c.done for c in self.containers):
            codes = [c.state["terminated"]["exitCode"] for c in self.containers]
            phase = "Succeeded" if not any(codes) else "Failed"
        elif any(c.process is not None or c.restarts for c in self.containers):
            phase = "Running"
        else:
            phase = "Pending"
        signature = (phase, repr(statuses))
        if signature == self._last_report:
            return
        self._last_report = signature
        current = self.handle.current()
        if current is not None and not is_terminal(current):
            self.handle.report(statuses, phase)
