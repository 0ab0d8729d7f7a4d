"""Deploy stage: `helm upgrade --install` of a component's release with the exact image that was built.

The image tag is `<tag>@sha256:<digest>`, so the cluster runs the bytes the
build pushed even if the tag moves later. helm waits for the release to be
ready and rolls back to the previous revision when it is not.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from flows.config import ReleaseSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
DIGEST_PLACEHOLDER = "sha256:<digest>"


class DeployFailed(RuntimeError):
    """helm could not install or upgrade a release; the previous revision is still running."""


class DeployedRelease(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    namespace: str
    revision: int
    image: str


def helm_binary() -> str:
    """`$HELM_BIN`, else the project's fetched copy, else `helm` on PATH."""
    if explicit := os.environ.get("HELM_BIN"):
        return explicit
    local = REPO_ROOT / ".tools" / "bin" / "helm"
    if local.exists():
        return str(local)
    return shutil.which("helm") or "helm"


def rollback_flag(helm_version: str) -> str:
    """Helm 4 renamed `--atomic` to `--rollback-on-failure`."""
    major = int(helm_version.lstrip("v").split(".")[0])
    return "--rollback-on-failure" if major >= 4 else "--atomic"


def helm_upgrade_argv(
    release: ReleaseSpec,
    *,
    repo_root: Path,
    image_repository: str,
    image_tag: str,
    helm: str = "helm",
    helm_version: str = "v4",
    kubeconfig: str | None = None,
) -> list[str]:
    argv = [
        helm, "upgrade", "--install", release.name, str(repo_root / release.chart),
        "--namespace", release.namespace, "--create-namespace",
    ]
    for values in release.values:
        argv += ["--values", str(repo_root / values)]
    argv += ["--set-string", f"image.repository={image_repository}", "--set-string", f"image.tag={image_tag}"]
    for key, value in release.set.items():
        argv += ["--set-string", f"{key}={value}"]
    argv += ["--wait", "--timeout", f"{release.timeout_seconds}s", rollback_flag(helm_version)]
    if kubeconfig:
        argv += ["--kubeconfig", kubeconfig]
    return argv


async def _run(argv: list[str], timeout: float) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        raise DeployFailed(f"`{' '.join(argv[1:3])}` did not finish within {timeout:.0f}s") from None
    if process.returncode != 0:
        raise DeployFailed(stderr.decode().strip() or stdout.decode().strip())
    return stdout.decode()


async def helm_version(helm: str) -> str:
    return (await _run([helm, "version", "--template", "{{.Version}}"], 30)).strip()


async def upgrade_release(
    release: ReleaseSpec,
    *,
    repo_root: Path,
    image_repository: str,
    image_tag: str,
    kubeconfig: str | None,
) -> DeployedRelease:
    helm = helm_binary()
    argv = helm_upgrade_argv(
        release,
        repo_root=repo_root,
        image_repository=image_repository,
        image_tag=image_tag,
        helm=helm,
        helm_version=await helm_version(helm),
        kubeconfig=kubeconfig,
    )
    try:
        await _run(argv, release.timeout_seconds + 60)
    except DeployFailed as exc:
        raise DeployFailed(f"release {release.namespace}/{release.name}: {exc}") from None
    status_argv = [helm, "status", release.name, "--namespace", release.namespace, "--output", "json"]
    if kubeconfig:
        status_argv += ["--kubeconfig", kubeconfig]
    status = json.loads(await _run(status_argv, 60))
    return DeployedRelease(
        name=release.name,
        namespace=release.namespace,
        revision=status["version"],
        image=f"{image_repository}:{image_tag}",
    )
