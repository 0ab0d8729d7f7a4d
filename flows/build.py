"""Build stage, the spec: one BuildKit Job per component.

The Job has a single container running `buildctl-daemonless.sh`: buildkitd
starts inside it, the dockerfile frontend downloads the context from the
presigned URL, and `--metadata-file` writes the push result to a file under
/tmp, which a successful build then copies into the container's
termination-message path, so the digest comes back through the Pod status.
The Pod needs no AWS identity: it reads through the URL and pushes with the
registry Secret mounted as `$DOCKER_CONFIG/config.json`.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict

from flows.config import Builder, BuildSpec
from flows.package import PackagedContext

TERMINATION_MESSAGE_PATH = "/dev/termination-log"
# buildctl writes --metadata-file atomically, a temp file in its folder renamed onto it (moby/buildkit v0.31.2
# cmd/buildctl/build.go writeMetadataFile -> continuity.AtomicWriteFile); a rename onto the kubelet's bind mount at
# the termination-message path fails with EBUSY, and uid 1000 may not create files in /dev. /tmp is writable for
# root and uid 1000 in both images (buildctl-daemonless.sh itself runs `mktemp -d /tmp/...`).
METADATA_FILE = "/tmp/buildctl-metadata.json"
# Both images are Alpine with BusyBox's /bin/sh and cat (moby/buildkit v0.31.2 Dockerfile). `&&` keeps
# buildctl's exit status when it fails; `>` is a plain write, which a bind-mounted file accepts.
BUILD_SCRIPT = f'buildctl-daemonless.sh "$@" && cat {METADATA_FILE} > {TERMINATION_MESSAGE_PATH}'
DOCKER_CONFIG_DIR = "/buildkit/docker-config"
BUILD_SECRETS_DIR = "/run/build-secrets"
CONTEXT_URL_PLACEHOLDER = "<presigned-url>"
# The presigned URL lives in the per-build registry Secret, never in the Job: anyone who may read Jobs and Pods
# (the `view` ClusterRole, kubernetes/kubernetes plugin/pkg/auth/authorizer/rbac/bootstrappolicy/policy.go) may not
# read Secrets. A `kubernetes.io/dockerconfigjson` Secret requires only `.dockerconfigjson` and takes more keys
# (pkg/apis/core/validation/validation.go ValidateSecret). The kubelet sets the env from the key and expands
# `$(CONTEXT_URL)` in command and args before the container starts (pkg/kubelet/container/helpers.go
# ExpandContainerCommandAndArgs), once: the URL's characters are never expanded again.
CONTEXT_URL_KEY = "context-url"
CONTEXT_URL_ENV = "CONTEXT_URL"
CONTEXT_URL_REF = f"$({CONTEXT_URL_ENV})"
MANAGED_BY = {"app.kubernetes.io/managed-by": "buildkit-pipeline"}
CONTAINER = "buildkit"
BUILDKIT_CACHE_TAG = "buildcache"
# kubernetes-sigs/karpenter pkg/apis/v1/labels.go DoNotDisruptAnnotationKey: Karpenter (and EKS Auto Mode)
# do not consolidate, drift or expire a node while a running pod carries it.
DO_NOT_DISRUPT = {"karpenter.sh/do-not-disrupt": "true"}


class BuildFailed(RuntimeError):
    """A build Job that did not push an image; the message says why and shows the log's end."""


class ImageRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    repository: str
    tags: list[str]

    @property
    def names(self) -> list[str]:
        return [f"{self.repository}:{tag}" for tag in self.tags]

    @property
    def context_tag(self) -> str:
        return next(tag for tag in self.tags if tag.startswith("ctx-"))


class BuiltImage(BaseModel):
    model_config = ConfigDict(frozen=True)

    repository: str
    tags: list[str]
    digest: str
    job: str | None
    reused: bool = False

    @property
    def pinned_tag(self) -> str:
        """`<tag>@sha256:...`: a tag that helm charts accept and that pins the exact image built."""
        return f"{self.tags[0]}@{self.digest}"


class SecretFile(BaseModel):
    """A build secret as the Job sees it: a key of a Kubernetes Secret, mounted as a file."""

    model_config = ConfigDict(frozen=True)

    id: str
    secret_name: str
    key: str


class BuildRequest(BaseModel):
    """Everything one build Job needs; the Job manifest and buildctl's argv derive from it alone."""

    model_config = ConfigDict(frozen=True)

    name: str
    builder: Builder = "buildkit"
    settings: BuildSpec
    context_url: str
    archive: PackagedContext
    image: ImageRef
    registry_secret: str
    cache_repository: str | None
    no_cache: bool = False
    platforms: list[str] = []
    build_args: dict[str, str] = {}
    target: str | None = None
    secrets: list[SecretFile] = []
    labels: dict[str, str] = {}
    image_labels: dict[str, str] = {}


def image_ref(repository: str, commit: str, context_sha256: str, *, dirty: bool = False,
              latest: bool = False) -> ImageRef:
    """`<commit12>` (`-dirty` for an uncommitted working tree), `ctx-<context sha256 12>`, and `latest` on request."""
    revision = f"{commit[:12]}-dirty" if dirty else commit[:12]
    return ImageRef(repository=repository, tags=[revision, f"ctx-{context_sha256[:12]}", *(["latest"] if latest else [])])


def job_name(component: str, context_sha256: str, run_id: str, builder: Builder = "buildkit") -> str:
    """`bk-` for BuildKit, `kn-` for Kaniko: a run that builds a component with both gets two Jobs."""
    prefix = {"buildkit": "bk-", "kaniko": "kn-"}[builder]
    suffix = f"-{context_sha256[:8]}-{run_id.replace('-', '')[:8]}"
    return f"{prefix}{component[: 63 - len(prefix) - len(suffix)].rstrip('-')}{suffix}"


def _opts(prefix: str, values: dict[str, str]) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--opt", f"{prefix}{key}={value}")]


def _cache_flags(request: BuildRequest) -> list[str]:
    """ECR-compatible registry cache; a missing cache on the first build is not an error."""
    if request.cache_repository is None:
        return ["--no-cache"] if request.no_cache else []
    cache_ref = f"{request.cache_repository}:{BUILDKIT_CACHE_TAG}"
    # ignore-error=true: a refused cache export (e.g. an immutable `buildcache` tag) costs the cache, not the build,
    # whose image is already pushed (moby/buildkit v0.31.2 README: default false; solver/llbsolver/export.go
    # runCacheExporters drops the error, the "exporting cache to registry" step still ends with it)
    export = f"type=registry,ref={cache_ref},mode=max,image-manifest=true,oci-mediatypes=true,ignore-error=true"
    if request.no_cache:
        return ["--no-cache", "--export-cache", export]
    return ["--export-cache", export, "--import-cache", f"type=registry,ref={cache_ref}"]


def buildctl_args(request: BuildRequest) -> list[str]:
    names = ",".join(request.image.names)
    return [
        "build",
        "--frontend=dockerfile.v0",
        "--opt", f"context={CONTEXT_URL_REF}",
        "--opt", f"filename={request.archive.dockerfile}",
        "--opt", f"contextsubdir={request.archive.contextsubdir}",
        *(["--opt", f"platform={','.join(request.platforms)}"] if request.platforms else []),
        *(["--opt", f"target={request.target}"] if request.target else []),
        *_opts("build-arg:", request.build_args),
        *_opts("label:", request.image_labels),
        *[arg for s in request.secrets for arg in ("--secret", f"id={s.id},src={BUILD_SECRETS_DIR}/{s.id}")],
        *_cache_flags(request),
        "--output", f'type=image,"name={names}",push=true',
        "--metadata-file", METADATA_FILE,
        "--progress=rawjson",
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


def _state_volume(settings: BuildSpec) -> dict:
    if settings.state_volume_claim:
        return {"name": "buildkitd-state", "persistentVolumeClaim": {"claimName": settings.state_volume_claim}}
    return {"name": "buildkitd-state", "emptyDir": {}}


def _secret_volumes(request: BuildRequest) -> tuple[list[dict], list[dict]]:
    volumes, mounts = [], []
    for index, secret in enumerate(request.secrets):
        name = f"build-secret-{index}"
        volumes.append({"name": name, "secret": {"secretName": secret.secret_name,
                                                  "items": [{"key": secret.key, "path": secret.id}]}})
        mounts.append({"name": name, "mountPath": f"{BUILD_SECRETS_DIR}/{secret.id}", "subPath": secret.id,
                       "readOnly": True})
    return volumes, mounts


def registry_config_volume(request: BuildRequest, mount_path: str) -> tuple[dict, dict]:
    """The registry Secret as `<mount_path>/config.json`, read-only: the volume and its mount."""
    volume = {
        "name": "docker-config",
        "secret": {"secretName": request.registry_secret, "items": [{"key": ".dockerconfigjson", "path": "config.json"}]},
    }
    return volume, {"name": "docker-config", "mountPath": mount_path, "readOnly": True}


def context_url_env(request: BuildRequest) -> dict:
    """The container's `CONTEXT_URL`, read by the kubelet from the registry Secret (see CONTEXT_URL_KEY)."""
    return {"name": CONTEXT_URL_ENV,
            "valueFrom": {"secretKeyRef": {"name": request.registry_secret, "key": CONTEXT_URL_KEY}}}


def pod_failure_policy(container: str) -> dict:
    """One retry for a pod that was disrupted, none for a build that failed.

    Rules are matched in order and the first match wins (kubernetes/kubernetes
    pkg/controller/job/pod_failure_policy.go): an evicted or preempted pod has the
    DisruptionTarget condition, and its container may also exit non-zero (143 on
    SIGTERM), so that rule comes first and Counts the failure against
    backoffLimit 1: one replacement pod, and a second disruption fails the Job
    (Ignore would replace pods without bound until the deadline). Any other
    non-zero exit of the build container is the build's own failure (a RUN step,
    a push): FailJob, never retried. A pod failure with neither (e.g. the kubelet
    rejecting the pod) counts, so it is retried once too.
    """
    return {"rules": [
        {"action": "Count", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": container, "operator": "NotIn", "values": [0]}},
    ]}


def build_job(request: BuildRequest, container: dict, volumes: list[dict], pod_security: dict | None = None) -> dict:
    """The Job around one build container: one retry after a disruption only, a deadline, a TTL, no API token,
    labelled for cleanup, and not to be disrupted by Karpenter / EKS Auto Mode while it runs.

    Both builders share it; the container reports through its termination message.
    """
    settings = request.settings
    pod_labels = {**MANAGED_BY, **request.labels}
    pod_spec = {
        "restartPolicy": "Never",
        "serviceAccountName": settings.service_account,
        "automountServiceAccountToken": False,
        **({"securityContext": pod_security} if pod_security is not None else {}),
        "containers": [{
            **container,
            "resources": settings.resources.model_dump(exclude_defaults=False),
            "terminationMessagePath": TERMINATION_MESSAGE_PATH,
            "terminationMessagePolicy": "File",
        }],
        "volumes": volumes,
    }
    if settings.node_selector:
        pod_spec["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        pod_spec["tolerations"] = list(settings.tolerations)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": request.name, "namespace": settings.namespace, "labels": pod_labels},
        "spec": {
            "backoffLimit": 1,
            "podFailurePolicy": pod_failure_policy(container["name"]),
            "activeDeadlineSeconds": settings.timeout_seconds,
            "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
            "template": {"metadata": {"labels": pod_labels, "annotations": dict(DO_NOT_DISRUPT)}, "spec": pod_spec},
        },
    }


def build_job_manifest(request: BuildRequest) -> dict:
    settings = request.settings
    container_security, pod_security, mode_env = _security(settings)
    state_dir = "/var/lib/buildkit" if settings.mode == "privileged" else "/home/user/.local/share/buildkit"
    secret_volumes, secret_mounts = _secret_volumes(request)
    config_volume, config_mount = registry_config_volume(request, DOCKER_CONFIG_DIR)
    container = {
        "name": CONTAINER,
        "image": buildkit_image(settings),
        "command": ["/bin/sh", "-c", BUILD_SCRIPT, "buildctl-daemonless.sh"],
        "args": buildctl_args(request),
        "env": [{"name": "DOCKER_CONFIG", "value": DOCKER_CONFIG_DIR}, context_url_env(request), *mode_env],
        "securityContext": container_security,
        "volumeMounts": [config_mount, {"name": "buildkitd-state", "mountPath": state_dir}, *secret_mounts],
    }
    return build_job(request, container, [config_volume, _state_volume(settings), *secret_volumes], pod_security)


def _condition(job: dict, kind: str) -> dict | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


def job_outcome(job: dict) -> str | None:
    """"Complete", "Failed", or None while the Job is still running.

    Since Kubernetes 1.31 the Job controller writes SuccessCriteriaMet / FailureTarget as soon as the
    outcome is decided and Complete / Failed only once its pods have stopped (job_controller.go
    enactJobFinished), which for a pod being killed can take its whole grace period: the outcome is
    known at the first one.
    """
    if _condition(job, "Complete") or _condition(job, "SuccessCriteriaMet"):
        return "Complete"
    if _condition(job, "Failed") or _condition(job, "FailureTarget"):
        return "Failed"
    return None


def read_digest(termination_message: str) -> str:
    """The pushed digest: buildctl writes its metadata JSON, Kaniko's `--digest-file` the bare digest."""
    message = termination_message.strip()
    try:
        digest = message if message.startswith("sha256:") else json.loads(message)["containerimage.digest"]
    except (ValueError, KeyError, TypeError):
        raise BuildFailed(f"the build pushed no digest (metadata: {termination_message[:200]!r})") from None
    if not str(digest).startswith("sha256:"):
        raise BuildFailed(f"the build reported an invalid digest {digest!r}")
    return digest


def terminated_state(pod: dict) -> dict:
    """How the build pod's one container ended, or {} while it has not."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        return ((status.get("state") or {}).get("terminated")) or {}
    return {}


def describe_failure(job: dict, pods: list[dict]) -> str:
    """What went wrong, from the Job's condition and the build container's state."""
    reasons = []
    if failed := _condition(job, "Failed") or _condition(job, "FailureTarget"):
        reasons.append(f"{failed.get('reason', 'Failed')}: {failed.get('message', '')}".rstrip(": "))
    for pod in pods:
        if terminated := terminated_state(pod):
            reasons.append(f"container exited {terminated.get('exitCode')} ({terminated.get('reason', 'Error')})")
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            if waiting := (status.get("state") or {}).get("waiting"):
                reasons.append(f"{waiting.get('reason')}: {waiting.get('message', '')}".rstrip(": "))
    return "; ".join(reasons) or "the Job failed without a reason"
