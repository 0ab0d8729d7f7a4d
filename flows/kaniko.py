"""Build stage, the spec for the second builder: one unprivileged Kaniko Job per component.

Kaniko's executor downloads the same presigned `.tar.gz` over https and unpacks
it into `/kaniko/buildcontext/`; `--context-sub-path=context` makes the
filtered context the build context, and the Dockerfile at the archive's root is
named by its absolute path, which Kaniko checks before any path relative to the
context. The registry Secret is mounted where the executor image's
`DOCKER_CONFIG` points (`/kaniko/.docker/config.json`), `--digest-file` writes
the pushed digest to the termination-message path, and the registry cache lives
in the same repository as BuildKit's (Kaniko tags each cached layer by its key).
The container runs with the runtime's default capabilities: no privileged flag,
no AWS identity.
"""

from __future__ import annotations

from flows.build import (
    CONTEXT_URL_REF,
    TERMINATION_MESSAGE_PATH,
    BuildRequest,
    build_job,
    context_url_env,
    registry_config_volume,
)

CONTAINER = "kaniko"
KANIKO_DIR = "/kaniko"
DOCKER_CONFIG_DIR = f"{KANIKO_DIR}/.docker"
BUILD_CONTEXT_DIR = f"{KANIKO_DIR}/buildcontext"


def _repeated(flag: str, values: dict[str, str]) -> list[str]:
    return [f"{flag}={key}={value}" for key, value in values.items()]


def _cache_flags(request: BuildRequest) -> list[str]:
    if request.cache_repository is None or request.no_cache:
        return []
    return ["--cache=true", f"--cache-repo={request.cache_repository}"]


def kaniko_args(request: BuildRequest) -> list[str]:
    [platform] = request.platforms or [None]
    return [
        f"--context={CONTEXT_URL_REF}",
        f"--context-sub-path={request.archive.contextsubdir}",
        f"--dockerfile={BUILD_CONTEXT_DIR}/{request.archive.dockerfile}",
        *[f"--destination={name}" for name in request.image.names],
        f"--digest-file={TERMINATION_MESSAGE_PATH}",
        *([f"--custom-platform={platform}"] if platform else []),
        *([f"--target={request.target}"] if request.target else []),
        *_repeated("--build-arg", request.build_args),
        *_repeated("--label", request.image_labels),
        *_cache_flags(request),
        "--push-retry=2",
        "--log-format=text",
        "--verbosity=info",
    ]


def kaniko_job_manifest(request: BuildRequest) -> dict:
    if request.secrets or len(request.platforms) > 1:
        raise ValueError(f"{request.name}: Kaniko cannot mount build secrets or build several platforms")
    config_volume, config_mount = registry_config_volume(request, DOCKER_CONFIG_DIR)
    container = {
        "name": CONTAINER,
        "image": request.settings.kaniko_image,
        "args": kaniko_args(request),
        "env": [{"name": "DOCKER_CONFIG", "value": DOCKER_CONFIG_DIR}, context_url_env(request)],
        "volumeMounts": [config_mount],
    }
    job = build_job(request, container, [config_volume])
    if request.platforms:
        # Kaniko runs RUN steps natively: a build for another architecture must land on a node of it.
        pod = job["spec"]["template"]["spec"]
        pod.setdefault("nodeSelector", {}).setdefault("kubernetes.io/arch", request.platforms[0].split("/")[1])
    return job
