"""Build stage: one BuildKit Job per component, watched until it ends, its pushed digest read back.

The Job has a single container running `buildctl-daemonless.sh`: buildkitd
starts inside it, the dockerfile frontend downloads the context from the
presigned URL, and `--metadata-file` writes the push result to the container's
termination-message path, so the digest comes back through the Pod status.
The Pod needs no AWS identity: it reads through the URL and pushes with the
registry Secret mounted as `$DOCKER_CONFIG/config.json`.
"""

from __future__ import annotations

import asyncio
import json
import time

from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import BaseModel, ConfigDict

from flows.config import BuildSpec
from flows.kube import as_dict
from flows.package import PackagedContext
from flows.registry_auth import RegistryToken, owned_by, registry_secret_manifest

TERMINATION_MESSAGE_PATH = "/dev/termination-log"
DOCKER_CONFIG_DIR = "/buildkit/docker-config"
CONTEXT_URL_PLACEHOLDER = "<presigned-url>"
MANAGED_BY = {"app.kubernetes.io/managed-by": "buildkit-pipeline"}
LOG_TAIL_LINES = 50


class BuildFailed(RuntimeError):
    """A build Job that did not push an image; the message says why and shows the log's end."""


class ImageRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    repository: str
    tags: list[str]

    @property
    def names(self) -> list[str]:
        return [f"{self.repository}:{tag}" for tag in self.tags]


class BuiltImage(BaseModel):
    model_config = ConfigDict(frozen=True)

    repository: str
    tags: list[str]
    digest: str
    job: str

    @property
    def pinned_tag(self) -> str:
        """`<tag>@sha256:...`: a tag that helm charts accept and that pins the exact image built."""
        return f"{self.tags[0]}@{self.digest}"


def image_ref(repository: str, commit: str, context_sha256: str, *, dirty: bool = False) -> ImageRef:
    """`<commit12>` (`-dirty` for an uncommitted working tree) and `ctx-<context sha256 12>`."""
    revision = f"{commit[:12]}-dirty" if dirty else commit[:12]
    return ImageRef(repository=repository, tags=[revision, f"ctx-{context_sha256[:12]}"])


def job_name(component: str, context_sha256: str, run_id: str) -> str:
    suffix = f"-{context_sha256[:8]}-{run_id.replace('-', '')[:8]}"
    return f"bk-{component[: 63 - 3 - len(suffix)].rstrip('-')}{suffix}"


def buildctl_args(
    context_url: str, archive: PackagedContext, image: ImageRef, labels: dict[str, str] | None = None
) -> list[str]:
    names = ",".join(image.names)
    label_opts = [arg for key, value in (labels or {}).items() for arg in ("--opt", f"label:{key}={value}")]
    return [
        "build",
        "--frontend=dockerfile.v0",
        "--opt", f"context={context_url}",
        "--opt", f"filename={archive.dockerfile}",
        "--opt", f"contextsubdir={archive.contextsubdir}",
        *label_opts,
        "--output", f'type=image,"name={names}",push=true',
        "--metadata-file", TERMINATION_MESSAGE_PATH,
        "--progress=plain",
    ]


def buildkit_image(settings: BuildSpec) -> str:
    if settings.mode == "rootless" and not settings.image.endswith("-rootless"):
        return f"{settings.image}-rootless"
    return settings.image


def _security(settings: BuildSpec) -> tuple[dict, dict, list[dict]]:
    """Container securityContext, pod securityContext and extra env for the chosen mode."""
    if settings.mode == "privileged":
        return {"privileged": True}, {}, []
    unconfined = {
        "seccompProfile": {"type": "Unconfined"},
        "appArmorProfile": {"type": "Unconfined"},
        "runAsUser": 1000,
        "runAsGroup": 1000,
    }
    return unconfined, {"fsGroup": 1000}, [
        {"name": "BUILDKITD_FLAGS", "value": "--oci-worker-no-process-sandbox"}
    ]


def build_job_manifest(
    *,
    name: str,
    settings: BuildSpec,
    args: list[str],
    secret_name: str,
    labels: dict[str, str],
) -> dict:
    container_security, pod_security, mode_env = _security(settings)
    state_dir = "/var/lib/buildkit" if settings.mode == "privileged" else "/home/user/.local/share/buildkit"
    pod_labels = {**MANAGED_BY, **labels}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": pod_labels},
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": settings.timeout_seconds,
            "ttlSecondsAfterFinished": 3600,
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": settings.service_account,
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security,
                    "containers": [
                        {
                            "name": "buildkit",
                            "image": buildkit_image(settings),
                            "command": ["buildctl-daemonless.sh"],
                            "args": args,
                            "env": [{"name": "DOCKER_CONFIG", "value": DOCKER_CONFIG_DIR}, *mode_env],
                            "securityContext": container_security,
                            "terminationMessagePath": TERMINATION_MESSAGE_PATH,
                            "terminationMessagePolicy": "File",
                            "volumeMounts": [
                                {"name": "docker-config", "mountPath": DOCKER_CONFIG_DIR, "readOnly": True},
                                {"name": "buildkitd-state", "mountPath": state_dir},
                            ],
                        }
                    ],
                    "volumes": [
                        {
                            "name": "docker-config",
                            "secret": {
                                "secretName": secret_name,
                                "items": [{"key": ".dockerconfigjson", "path": "config.json"}],
                            },
                        },
                        {"name": "buildkitd-state", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def _condition(job: dict, kind: str) -> dict | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


def job_outcome(job: dict) -> str | None:
    """"Complete", "Failed", or None while the Job is still running."""
    if _condition(job, "Complete"):
        return "Complete"
    if _condition(job, "Failed"):
        return "Failed"
    return None


def read_digest(termination_message: str) -> str:
    """The pushed digest from buildctl's metadata JSON."""
    try:
        digest = json.loads(termination_message)["containerimage.digest"]
    except (ValueError, KeyError, TypeError):
        raise BuildFailed(f"the build pushed no digest (metadata: {termination_message[:200]!r})") from None
    if not str(digest).startswith("sha256:"):
        raise BuildFailed(f"the build reported an invalid digest {digest!r}")
    return digest


def _terminated(pod: dict) -> dict:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == "buildkit":
            return ((status.get("state") or {}).get("terminated")) or {}
    return {}


def describe_failure(job: dict, pods: list[dict]) -> str:
    """What went wrong, from the Job's condition and the buildkit container's state."""
    reasons = []
    if failed := _condition(job, "Failed"):
        reasons.append(f"{failed.get('reason', 'Failed')}: {failed.get('message', '')}".rstrip(": "))
    for pod in pods:
        terminated = _terminated(pod)
        if terminated:
            reasons.append(
                f"container exited {terminated.get('exitCode')} ({terminated.get('reason', 'Error')})"
            )
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            if waiting := (status.get("state") or {}).get("waiting"):
                reasons.append(f"{waiting.get('reason')}: {waiting.get('message', '')}".rstrip(": "))
    return "; ".join(reasons) or "the Job failed without a reason"


async def _create_or_adopt(create, read) -> dict:
    """Create an object; if a retried request already created it, use the existing one."""
    try:
        return await create()
    except ApiException as exc:
        if exc.status != 409:
            raise
        return await read()


async def wait_for_job(api: client.ApiClient, namespace: str, name: str, resource_version: str, deadline: float) -> dict:
    """Watch one Job until it is Complete or Failed, resuming the watch when the stream ends or drops."""
    batch = client.BatchV1Api(api)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BuildFailed(f"build Job {namespace}/{name} did not finish in time")
        try:
            async with watch.Watch() as stream:
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


async def _pods(api: client.ApiClient, namespace: str, job: str) -> list[dict]:
    pods = await client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=f"job-name={job}")
    return [as_dict(api, pod) for pod in pods.items]


async def _log_tail(api: client.ApiClient, namespace: str, pods: list[dict]) -> str:
    core = client.CoreV1Api(api)
    for pod in reversed(pods):
        try:
            return await core.read_namespaced_pod_log(
                pod["metadata"]["name"], namespace, container="buildkit", tail_lines=LOG_TAIL_LINES
            )
        except ApiException:
            continue
    return ""


async def run_build(
    api: client.ApiClient,
    *,
    component: str,
    manifest: dict,
    token: RegistryToken,
    secret_name: str,
    image: ImageRef,
    timeout_seconds: float,
) -> BuiltImage:
    """Create the registry Secret and the Job, wait for the Job, and return what it pushed.

    The Secret is owned by the Job (Kubernetes removes it with the Job) and is
    deleted as soon as the build ends, whatever the outcome.
    """
    namespace = manifest["metadata"]["namespace"]
    name = manifest["metadata"]["name"]
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    deadline = time.monotonic() + timeout_seconds
    secret = registry_secret_manifest(secret_name, namespace, token, manifest["metadata"]["labels"])
    try:
        await _create_or_adopt(
            lambda: core.create_namespaced_secret(namespace, secret),
            lambda: core.replace_namespaced_secret(secret_name, namespace, secret),
        )
        created = as_dict(api, await _create_or_adopt(
            lambda: batch.create_namespaced_job(namespace, manifest),
            lambda: batch.read_namespaced_job(name, namespace),
        ))
        await core.patch_namespaced_secret(secret_name, namespace, owned_by(created))
        job = await wait_for_job(api, namespace, name, created["metadata"]["resourceVersion"], deadline)
        pods = await _pods(api, namespace, name)
        if job_outcome(job) == "Complete":
            succeeded = [pod for pod in pods if _terminated(pod).get("exitCode") == 0]
            if succeeded:
                digest = read_digest(_terminated(succeeded[-1]).get("message", ""))
                return BuiltImage(repository=image.repository, tags=image.tags, digest=digest, job=name)
        reason = describe_failure(job, pods)
        tail = await _log_tail(api, namespace, pods)
        raise BuildFailed(
            f"{component}: build Job {namespace}/{name} failed: {reason}\n"
            f"--- last {LOG_TAIL_LINES} log lines ---\n{tail.rstrip()}"
        )
    finally:
        try:
            await asyncio.shield(core.delete_namespaced_secret(secret_name, namespace))
        except ApiException as exc:
            if exc.status != 404:
                raise
