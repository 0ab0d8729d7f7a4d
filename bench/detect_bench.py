"""How soon a finished build Job is noticed: the flow's watch against prefect-kubernetes' polling.

What it measures
----------------
A plain Job runs in the Kubernetes emulator; its pod ends after a random
0.5 to 10.5 s (uniform, so completions fall anywhere in a 5 s polling period).
The emulator's store tells, in this process, the moment its Job controller
writes the Job's Complete condition; the sample is the time from that moment
until the waiting code returns.

- `detect_p50_s`, `detect_p95_s`: `flows.build_run.wait_for_job`, the watch
  the flow's build stage waits on, WATCH_SAMPLES Jobs.
- `detect_poll_p50_s`, `detect_poll_p95_s`: prefect-kubernetes'
  `KubernetesJob(interval_seconds=5)` and `KubernetesJobRun.await_for_completion`,
  which reads the Job and lists its Pods every 5 s, each read with a new API
  client, POLL_SAMPLES Jobs.

Both wait for ten Jobs at a time in one process, as a run with ten builds does.

Output: one `name: value` line per figure. From the repository root:

    .venv/bin/python -m bench.detect_bench
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

from kubernetes_asyncio import client
from prefect import flow
from prefect.testing.utilities import prefect_test_harness
from prefect_kubernetes import KubernetesClusterConfig, KubernetesCredentials
from prefect_kubernetes.jobs import KubernetesJob

from flows.build_run import wait_for_job
from flows.kube import kube_api
from sandbox.kube import KubeEmulator

NAMESPACE = "detect"
WATCH_SAMPLES, POLL_SAMPLES, AT_ONCE, POLL_INTERVAL = 40, 20, 10, 5
POD_SECONDS = (0.5, 10.5)


class CompletionClock:
    """The moment each Job first carries condition Complete=True, taken from the emulator's own store."""

    def __init__(self, emulator: KubeEmulator) -> None:
        self.completed: dict[str, float] = {}
        self._lock = threading.Lock()
        emulator.store.subscribe(self._on_event)

    def _on_event(self, event) -> None:
        if event.plural != "jobs":
            return
        conditions = (event.obj.get("status") or {}).get("conditions") or []
        if any(c["type"] == "Complete" and c["status"] == "True" for c in conditions):
            with self._lock:
                self.completed.setdefault(event.obj["metadata"]["name"], time.perf_counter())

    def latency(self, job: str, noticed: float) -> float:
        return noticed - self.completed[job]


def job_manifest(name: str) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [
                {"name": "work", "image": "busybox:1.37", "command": ["true"]}]}}}}


def pod_ends_after_a_random_while(handle) -> None:
    time.sleep(random.uniform(*POD_SECONDS))
    handle.running()
    handle.terminate(0)


async def watched(kubeconfig: str, name: str) -> float:
    async with kube_api(kubeconfig) as api:
        created = await client.BatchV1Api(api).create_namespaced_job(NAMESPACE, job_manifest(name))
        await wait_for_job(api, NAMESPACE, name, created.metadata.resource_version, time.monotonic() + 60)
    return time.perf_counter()


async def polled(kubeconfig: str, name: str) -> float:
    credentials = KubernetesCredentials(cluster_config=KubernetesClusterConfig.from_file(kubeconfig))
    job = KubernetesJob(v1_job=job_manifest(name), credentials=credentials, namespace=NAMESPACE,
                        interval_seconds=POLL_INTERVAL, delete_after_completion=False)
    await (await job.atrigger()).await_for_completion()
    return time.perf_counter()


async def latencies(wait, prefix: str, samples: int, kubeconfig: str, clock: CompletionClock) -> list[float]:
    """Run `samples` Jobs, AT_ONCE at a time, each waited for by `wait`; the detection latency of each."""
    found = []
    for batch in range(samples // AT_ONCE):
        names = [f"{prefix}-{batch}-{i}" for i in range(AT_ONCE)]
        noticed = await asyncio.gather(*(wait(kubeconfig, name) for name in names))
        found += [clock.latency(name, t) for name, t in zip(names, noticed)]
    return found


@flow(name="detect-bench")
async def detect(kubeconfig: str, clock: CompletionClock) -> tuple[list[float], list[float]]:
    return (await latencies(watched, "watch", WATCH_SAMPLES, kubeconfig, clock),
            await latencies(polled, "poll", POLL_SAMPLES, kubeconfig, clock))


def percentiles(samples: list[float]) -> tuple[float, float]:
    return statistics.median(samples), statistics.quantiles(samples, n=20)[18]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="buildkit-pipeline-bench-") as tmp, \
            prefect_test_harness(server_startup_timeout=120), KubeEmulator() as emulator:
        kubeconfig = str(emulator.write_kubeconfig(Path(tmp) / "kubeconfig"))
        emulator.allow_any_image()  # the bench measures detection, not image pulls
        emulator.create("namespaces", None, {"metadata": {"name": NAMESPACE}})
        emulator.on_pod(lambda pod: pod["metadata"].get("namespace") == NAMESPACE, pod_ends_after_a_random_while)
        clock = CompletionClock(emulator)
        watch_latencies, poll_latencies = asyncio.run(detect(kubeconfig, clock))
    for prefix, samples in (("detect", watch_latencies), ("detect_poll", poll_latencies)):
        p50, p95 = percentiles(samples)
        print(f"{prefix}_p50_s: {p50:.3f}")
        print(f"{prefix}_p95_s: {p95:.3f}")


if __name__ == "__main__":
    main()
