"""Build stage, the run: create the Secrets and the Job, follow its log, wait for it, read back the digest.

Waiting is a watch on the Job (resumed from the last resourceVersion when the
stream ends or drops, relisted on 410 Gone), never a sleep loop. The per-build
Secrets are owned by the Job, so Kubernetes removes them with it, and are
deleted as soon as the build ends; a cancelled build deletes its Job too.
Creating them retries a transient API error on the spot (after `Retry-After`
when the server sends one), and a Job that already exists, because an earlier
create went through though its answer was lost, is adopted, never duplicated.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from prefect_aws import AwsCredentials
from pydantic import BaseModel

from flows.aio import within
from flows.aws import aws_client
from flows.build import (
    CONTEXT_URL_KEY,
    BuildFailed,
    BuildRequest,
    BuiltImage,
    ImageRef,
    describe_failure,
    job_outcome,
    read_digest,
    terminated_state,
)
from flows.builders import job_manifest
from flows import pending
from flows.plan import CONTEXT_SHA256_LABEL
from flows.kube import Watch, as_dict, with_retries
from flows.registry_auth import RegistryToken, owned_by, registry_secret_manifest
from flows.secrecy import carrying_secrets, withhold_presigned_query

LOG_TAIL_LINES = 50
LOG_IDLE_SECONDS = 2.0
LOG_DRAIN_LIMIT_SECONDS = 60.0


def existing_image(credentials: AwsCredentials, registry: str, image: ImageRef) -> str | None:
    """The digest of an image already pushed for this exact context (its `ctx-` tag), if any."""
    ecr = aws_client(credentials, "ecr")
    repository = image.repository.removeprefix(f"{registry}/")
    try:
        details = ecr.describe_images(repositoryName=repository, imageIds=[{"imageTag": image.context_tag}])
    except ecr.exceptions.ImageNotFoundException:
        return None
    return details["imageDetails"][0]["imageDigest"]


def tag_existing_image(credentials: AwsCredentials, registry: str, image: ImageRef, digest: str) -> None:
    """Give a reused image this run's tags, so `<commit12>` names what was deployed."""
    ecr = aws_client(credentials, "ecr")
    repository = image.repository.removeprefix(f"{registry}/")
    [found] = ecr.batch_get_image(repositoryName=repository, imageIds=[{"imageDigest": digest}])["images"]
    for tag in image.tags:
        try:
            ecr.put_image(repositoryName=repository, imageManifest=found["imageManifest"], imageTag=tag,
                          imageDigest=digest)
        except ecr.exceptions.ImageAlreadyExistsException:
            pass


# BatchGetImage's acceptedMediaTypes (ECR API Reference): without them ECR may answer another schema than was pushed
MANIFEST_TYPES = ["application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json",
                  "application/vnd.docker.distribution.manifest.list.v2+json"]
MAX_CONFIG_BYTES = 4 << 20


class UnverifiableImage(Exception):
    """The image's config could not be read or does not match its digest."""


def _manifest(ecr, repository: str, digest: str) -> dict:
    found = ecr.batch_get_image(repositoryName=repository, imageIds=[{"imageDigest": digest}],
                                acceptedMediaTypes=MANIFEST_TYPES)["images"]
    if not found:
        raise UnverifiableImage(f"BatchGetImage found no manifest {digest}")
    return json.loads(found[0]["imageManifest"])


def _blob(ecr, repository: str, digest: str) -> bytes:
    """A blob through GetDownloadUrlForLayer (which serves any blob an image references, its config too) and a GET
    of the presigned URL it returns; checked against its digest."""
    try:
        url = ecr.get_download_url_for_layer(repositoryName=repository, layerDigest=digest)["downloadUrl"]
    except (ecr.exceptions.LayersNotFoundException, ecr.exceptions.LayerInaccessibleException) as exc:
        raise UnverifiableImage(f"its config blob {digest} cannot be downloaded: "
                                f"{exc.response['Error']['Code']}") from None
    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # the URL's query is a secret: never in a message
            data = response.read(MAX_CONFIG_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise UnverifiableImage(f"downloading its config blob {digest} answered {exc.code}") from None
    except urllib.error.URLError as exc:  # a network fault: the task retries a ConnectionError
        raise ConnectionError(f"downloading its config blob {digest}: {exc.reason}") from None
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise UnverifiableImage(f"its config blob does not match its digest {digest}")
    return data


def context_labels(credentials: AwsCredentials, registry: str, image: ImageRef, digest: str) -> list[str | None]:
    """The context-sha256 label of the image's config, of every platform's for an image index (attestation
    manifests, platform `unknown/unknown`, left out)."""
    ecr = aws_client(credentials, "ecr")
    repository = image.repository.removeprefix(f"{registry}/")
    manifest = _manifest(ecr, repository, digest)
    if "manifests" in manifest:
        manifests = [_manifest(ecr, repository, m["digest"]) for m in manifest["manifests"]
                     if m.get("platform", {}).get("os") != "unknown"]
    else:
        manifests = [manifest]
    labels = []
    for one in manifests:
        config = json.loads(_blob(ecr, repository, one["config"]["digest"]))
        labels.append(((config.get("config") or {}).get("Labels") or {}).get(CONTEXT_SHA256_LABEL))
    return labels


def reuse_refusal(labels: list[str | None], archive_sha256: str) -> str | None:
    """Why an image whose configs carry `labels` must not be reused for the archive `archive_sha256`; None if
    every config names exactly this archive."""
    if not labels:
        return "it has no image config"
    for label in labels:
        if label is None:
            return f"its config has no {CONTEXT_SHA256_LABEL} label"
        if label != archive_sha256:
            return f"its {CONTEXT_SHA256_LABEL} label is {label}, not this context's {archive_sha256}"
    return None


class ImageFacts(BaseModel):
    size_bytes: int | None
    layers: int | None


def image_facts(credentials: AwsCredentials, registry: str, image: BuiltImage) -> ImageFacts:
    """The pushed image's size (compressed layers, as ECR counts it) and layer count, from its manifest."""
    ecr = aws_client(credentials, "ecr")
    repository = image.repository.removeprefix(f"{registry}/")
    ids = [{"imageDigest": image.digest}]
    [details] = ecr.describe_images(repositoryName=repository, imageIds=ids)["imageDetails"]
    images = ecr.batch_get_image(repositoryName=repository, imageIds=ids)["images"]
    manifest = json.loads(images[0]["imageManifest"]) if images else {}
    return ImageFacts(size_bytes=details.get("imageSizeInBytes"),
                      layers=len(manifest["layers"]) if "layers" in manifest else None)


def registry_secret(request: BuildRequest, namespace: str, token: RegistryToken, labels: dict[str, str]) -> dict:
    """The build's registry Secret, which also holds the presigned context URL the container reads through its env
    (flows/build.py CONTEXT_URL_KEY), so that the URL is in no Job or Pod spec."""
    manifest = registry_secret_manifest(request.registry_secret, namespace, token, labels)
    manifest["data"][CONTEXT_URL_KEY] = base64.b64encode(request.context_url.encode()).decode()
    return manifest


def build_secrets_manifest(name: str, namespace: str, values: dict[str, str], labels: dict[str, str]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "type": "Opaque",
        "data": {key: base64.b64encode(value.encode()).decode() for key, value in values.items()},
    }


async def _create_or_adopt(create, read):
    """Create an object, retrying transient errors; if an earlier request already created it, use that one.

    An adopted Job may have finished already: its answer was lost, and the build ran meanwhile.
    """
    try:
        return await with_retries(create)
    except ApiException as exc:
        if exc.status != 409:
            raise
        return await with_retries(read)


async def _create_secret(core: client.CoreV1Api, namespace: str, manifest: dict) -> None:
    name = manifest["metadata"]["name"]
    await _create_or_adopt(
        lambda: core.create_namespaced_secret(namespace, manifest),
        lambda: core.replace_namespaced_secret(name, namespace, manifest),
    )


async def _delete_quietly(delete, *args, **kwargs) -> None:
    try:
        await delete(*args, **kwargs)
    except ApiException as exc:
        if exc.status != 404:
            raise


async def wait_for_job(api: client.ApiClient, namespace: str, name: str, resource_version: str, deadline: float) -> dict:
    """Watch one Job until it is Complete or Failed, resuming the watch when the stream ends or drops."""
    batch = client.BatchV1Api(api)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BuildFailed(f"build Job {namespace}/{name} did not finish in time")
        try:
            async with Watch(api) as stream:
                async for event in stream.stream(
                    batch.list_namespaced_job,
                    namespace,
                    field_selector=f"metadata.name={name}",
                    resource_version=resource_version,
                    timeout_seconds=max(1, min(int(remaining), 300)),
                    _request_timeout=remaining + 5,
                ):
                    job = as_dict(api, event["object"])
                    resource_version = job["metadata"].get("resourceVersion", resource_version)
                    if event["type"] == "DELETED":
                        raise BuildFailed(f"build Job {namespace}/{name} was deleted before it finished")
                    if job_outcome(job):
                        return job
        except ApiException as exc:
            if exc.status != 410:
                raise
            job = as_dict(api, await batch.read_namespaced_job(name, namespace))
            if job_outcome(job):
                return job
            resource_version = job["metadata"]["resourceVersion"]
        except (asyncio.TimeoutError, OSError):
            continue


async def _started_pod(api: client.ApiClient, namespace: str, job: str, skip: frozenset[str] = frozenset()) -> str:
    """The name of a Job's Pod not in `skip`, once its build container has started (or already ended)."""
    core = client.CoreV1Api(api)
    while True:
        async with Watch(api) as stream:
            async for event in stream.stream(core.list_namespaced_pod, namespace, label_selector=f"job-name={job}",
                                             timeout_seconds=60):
                pod = as_dict(api, event["object"])
                if pod["metadata"]["name"] not in skip and pending.started(pod):
                    return pod["metadata"]["name"]


def _disrupted(pod: dict | None) -> bool:
    """A pod the Job replaces: it was evicted or preempted (see flows/build.py pod_failure_policy)."""
    return any(c.get("type") == "DisruptionTarget" and c.get("status") == "True"
               for c in ((pod or {}).get("status") or {}).get("conditions") or [])


@dataclass
class LogProgress:
    """When a log follower last received bytes: after the build ends, it reads on while they keep coming."""

    at: float = field(default_factory=time.monotonic)

    def received(self) -> None:
        self.at = time.monotonic()


async def follow_log(api: client.ApiClient, namespace: str, job: str, on_line: Callable[[str], None],
                     progress: LogProgress) -> None:
    """Hand every line the build container writes to `on_line` as it is written; after a pod that was
    disrupted, the same for the pod that replaces it."""
    followed: set[str] = set()
    while True:
        pod = await _started_pod(api, namespace, job, frozenset(followed))
        followed.add(pod)
        await _follow_pod_log(api, namespace, pod, on_line, progress)
        try:
            ended = as_dict(api, await client.CoreV1Api(api).read_namespaced_pod(pod, namespace))
        except ApiException:
            return
        if not _disrupted(ended):
            return
        on_line(f"--- pod {pod} was disrupted; following the pod that replaces it ---")


async def _follow_pod_log(api: client.ApiClient, namespace: str, pod: str, on_line: Callable[[str], None],
                          progress: LogProgress) -> None:
    response = await client.CoreV1Api(api).read_namespaced_pod_log(
        pod, namespace, follow=True, _preload_content=False
    )
    try:
        await read_lines(response.content, on_line, progress)
    finally:
        response.release()


async def read_lines(stream, on_line: Callable[[str], None], progress: LogProgress | None = None) -> None:
    """Hand `on_line` every line of a byte stream, however long.

    Iterating an aiohttp StreamReader reads lines with `readuntil`, which raises
    LineTooLong past twice the client's read buffer (aiohttp 3.14 streams.py;
    kubernetes_asyncio sets `read_bufsize=2**21`, so 4 MiB) and ends the follow,
    losing every later line. Chunks are split here instead, with no limit.
    """
    pending: list[bytes] = []
    async for chunk in stream.iter_any():
        if progress is not None:
            progress.received()
        if b"\n" not in chunk:
            pending.append(chunk)
            continue
        first, *lines, rest = chunk.split(b"\n")
        for line in (b"".join([*pending, first]), *lines):
            on_line(line.decode(errors="replace"))
        pending = [rest] if rest else []
    if pending:
        on_line(b"".join(pending).decode(errors="replace"))


class Stuck(BaseModel):
    """A build pod that will not start, with what the diagnosis reads."""

    reason: str
    pods: list[dict]
    events: list[dict]


async def _watch_into(queue: asyncio.Queue, api: client.ApiClient, list_fn, namespace: str, kind: str,
                      **selectors) -> None:
    """Put every (kind, event type, object) of a watch on `queue`, rewatching (and relisting) when it ends."""
    while True:
        try:
            async with Watch(api) as stream:
                async for event in stream.stream(list_fn, namespace, timeout_seconds=300, **selectors):
                    await queue.put((kind, event["type"], as_dict(api, event["object"])))
        except (ApiException, asyncio.TimeoutError, OSError):
            await asyncio.sleep(1)


async def watch_pending(api: client.ApiClient, namespace: str, job: str, timeout: float) -> Stuck:
    """Watch the Job's pods and the events of the Job and its pods until `flows/pending.py` gives up on them.

    Never returns while the build can still start; the caller cancels it once the Job ends.
    """
    core = client.CoreV1Api(api)
    queue: asyncio.Queue = asyncio.Queue()
    watches = [
        asyncio.create_task(_watch_into(queue, api, core.list_namespaced_pod, namespace, "pod",
                                        label_selector=f"job-name={job}")),
        asyncio.create_task(_watch_into(queue, api, core.list_namespaced_event, namespace, "event")),
    ]
    pods: dict[str, dict] = {}
    events: dict[str, dict] = {}
    first_seen: dict[str, float] = {}
    started_at = time.monotonic()
    recheck: float | None = None
    try:
        while True:
            try:
                kind, kind_of_change, obj = await within(queue.get(), recheck)
            except asyncio.TimeoutError:
                pass
            else:
                name = obj["metadata"]["name"]
                if kind == "pod":
                    first_seen.setdefault(name, time.monotonic())
                    if kind_of_change == "DELETED":
                        pods.pop(name, None)
                    else:
                        pods[name] = obj
                elif _about_job(obj, job):
                    events[obj["metadata"].get("uid", name)] = obj
            now = time.monotonic()
            ordered = sorted(pods.values(), key=lambda p: first_seen.get(p["metadata"]["name"], now))
            verdict = pending.job_verdict(job, ordered, list(events.values()), waited=now - started_at,
                                          timeout=timeout,
                                          pod_waited={n: now - t for n, t in first_seen.items()})
            if verdict.fail:
                return Stuck(reason=verdict.fail, pods=ordered, events=list(events.values()))
            recheck = verdict.recheck_in
    finally:
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)


def _about_job(event: dict, job: str) -> bool:
    """An event about the Job or one of its pods (named `<job>-<suffix>` by the Job controller)."""
    involved = event.get("involvedObject") or {}
    name = involved.get("name", "")
    return (involved.get("kind") == "Job" and name == job) or \
        (involved.get("kind") == "Pod" and name.startswith(f"{job}-") and "-" not in name[len(job) + 1:])


async def _job_or_stuck(api: client.ApiClient, namespace: str, name: str, resource_version: str, deadline: float,
                        pending_timeout: float) -> dict | Stuck:
    """The ended Job (wait_for_job), or the reason its pod will never start, whichever comes first."""
    waiter = asyncio.create_task(wait_for_job(api, namespace, name, resource_version, deadline))
    guard = asyncio.create_task(watch_pending(api, namespace, name, pending_timeout))
    try:
        done, _ = await asyncio.wait({waiter, guard}, return_when=asyncio.FIRST_COMPLETED)
        if guard in done and waiter not in done and guard.exception() is None:
            return guard.result()
        return await waiter
    finally:
        for task in (waiter, guard):
            task.cancel()
        await asyncio.gather(waiter, guard, return_exceptions=True)



async def _pods(api: client.ApiClient, namespace: str, job: str) -> list[dict]:
    pods = await client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=f"job-name={job}")
    return [as_dict(api, pod) for pod in pods.items]


async def _events(api: client.ApiClient, namespace: str, job: str) -> list[dict]:
    """The Job's events: a Pod that was never created (Pod Security, quota) shows only there."""
    events = await client.CoreV1Api(api).list_namespaced_event(
        namespace, field_selector=f"involvedObject.kind=Job,involvedObject.name={job}"
    )
    return [as_dict(api, event) for event in events.items]


async def _log_tail(api: client.ApiClient, namespace: str, pods: list[dict]) -> str:
    core = client.CoreV1Api(api)
    for pod in reversed(pods):
        try:
            return await core.read_namespaced_pod_log(pod["metadata"]["name"], namespace, tail_lines=LOG_TAIL_LINES)
        except ApiException:
            continue
    return ""


async def drain(follower: asyncio.Task, progress: LogProgress, idle: float, limit: float) -> None:
    """Let a log follower read the rest of an ended build's log, then stop it.

    The kubelet ends a follow once it has sent the log of a terminated container, so
    the follower normally ends by itself; it is stopped once nothing has arrived for
    `idle` seconds (a stream that hangs) or after `limit`. Not a fixed grace: a long
    log still arriving on a busy node would lose its last lines, and those say why.
    `asyncio.wait`, not `wait_for`, which on Python 3.11 can swallow a cancellation.
    """
    give_up = time.monotonic() + limit
    while not follower.done():
        left = min(progress.at + idle, give_up) - time.monotonic()
        if left <= 0:
            break
        await asyncio.wait({follower}, timeout=left)
    follower.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await follower


async def run_build(
    api: client.ApiClient,
    *,
    component: str,
    request: BuildRequest,
    token: RegistryToken,
    secret_values: dict[str, str],
    on_log_line: Callable[[str], None],
    explain: Callable[[str, dict, list[dict], list[dict]], str] = lambda log, job, pods, events: describe_failure(job, pods),
) -> BuiltImage:
    """Create the Secrets and the Job, follow the build log, and return what the Job pushed.

    `secret_values` are build secrets read from AWS Secrets Manager, stored for
    the Job in a Secret of its own. `explain` turns a failed build's log tail,
    Job, Pods and events into the reason the error gives.
    """
    manifest = job_manifest(request)
    namespace, name = manifest["metadata"]["namespace"], request.name
    labels = manifest["metadata"]["labels"]
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    deadline = time.monotonic() + request.settings.timeout_seconds + 60
    secrets = [registry_secret(request, namespace, token, labels)]
    if secret_values:
        secrets.append(build_secrets_manifest(f"{name}-secrets", namespace, secret_values, labels))
    follower, progress = None, LogProgress()
    try:
        for secret in secrets:
            await _create_secret(core, namespace, secret)
        created = as_dict(api, await _create_or_adopt(
            lambda: batch.create_namespaced_job(namespace, manifest),
            lambda: batch.read_namespaced_job(name, namespace),
        ))
        for secret in secrets:
            await with_retries(functools.partial(core.patch_namespaced_secret, secret["metadata"]["name"],
                                                 namespace, owned_by(created)))
        follower = asyncio.create_task(follow_log(api, namespace, name, on_log_line, progress))
        job = created if job_outcome(created) else await _job_or_stuck(
            api, namespace, name, created["metadata"]["resourceVersion"], deadline,
            request.settings.pending_timeout_seconds)
        if isinstance(job, Stuck):
            await _delete_quietly(batch.delete_namespaced_job, name, namespace, propagation_policy="Background")
            current = {"metadata": {"name": name, "namespace": namespace}}
            raise BuildFailed(f"{component}: build Job {namespace}/{name} never started, so it was deleted: "
                              f"{job.reason}: {explain('', current, job.pods, job.events)}")
        await drain(follower, progress, LOG_IDLE_SECONDS, LOG_DRAIN_LIMIT_SECONDS)
        pods = await _pods(api, namespace, name)
        if job_outcome(job) == "Complete":
            succeeded = [pod for pod in pods if terminated_state(pod).get("exitCode") == 0]
            if succeeded:
                digest = read_digest(terminated_state(succeeded[-1]).get("message", ""))
                return BuiltImage(repository=request.image.repository, tags=request.image.tags, digest=digest,
                                  job=name)
        tail = withhold_presigned_query(await _log_tail(api, namespace, pods))
        events = await _events(api, namespace, name)
        raise BuildFailed(
            f"{component}: build Job {namespace}/{name} failed: {explain(tail, job, pods, events)}\n"
            f"--- last {LOG_TAIL_LINES} log lines ---\n{tail.rstrip()}"
        )
    except asyncio.CancelledError:
        # A refused delete must not replace the cancellation with an error the task would retry (with a new
        # Job); the run's cleanup hook deletes what is left, and activeDeadlineSeconds bounds it regardless.
        with contextlib.suppress(ApiException, OSError, asyncio.TimeoutError):
            await asyncio.shield(_delete_quietly(batch.delete_namespaced_job, name, namespace,
                                                 propagation_policy="Background"))
        raise
    finally:
        if follower is not None and not follower.done():
            follower.cancel()
        for secret in secrets:  # owned by the Job: if the API refuses now, they go with it
            with contextlib.suppress(ApiException, OSError, asyncio.TimeoutError):
                await asyncio.shield(_delete_quietly(core.delete_namespaced_secret, secret["metadata"]["name"],
                                                     namespace))


async def delete_run_objects(api: client.ApiClient, namespace: str, flow_run_id: str) -> int:
    """Delete every build Job and Secret a flow run created; for cancelled and crashed runs.

    Each request is retried on a transient API error: the cancellation hook can be the last one to try (the
    runner kills the flow process once the hook is done), so a single 503 must not leave a build running.
    """
    selector = f"buildkit-pipeline/flow-run={flow_run_id}"
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    with carrying_secrets():
        jobs = (await with_retries(lambda: batch.list_namespaced_job(namespace, label_selector=selector))).items
        secrets = (await with_retries(lambda: core.list_namespaced_secret(namespace, label_selector=selector))).items
        for job in jobs:
            await with_retries(functools.partial(_delete_quietly, batch.delete_namespaced_job, job.metadata.name,
                                                 namespace, propagation_policy="Background"))
        for secret in secrets:
            await with_retries(functools.partial(_delete_quietly, core.delete_namespaced_secret,
                                                 secret.metadata.name, namespace))
    return len(jobs) + len(secrets)
