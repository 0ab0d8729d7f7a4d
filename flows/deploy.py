"""Deploy stage: `helm upgrade --install` of a component's release with the exact image that was built.

The image tag is `<tag>@sha256:<digest>`, so the cluster runs the bytes the
build pushed even if the tag moves later. helm waits for the release and rolls
back on failure; then the rollout is verified through the Kubernetes API, and a
release that did not come up is put back on its previous revision. One helm
operation per release runs at a time, across flow runs (a Prefect global
concurrency limit keyed by release), so an on-demand run and the nightly never
meet in "another operation is in progress".
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

from kubernetes_asyncio import client
from pydantic import BaseModel, ConfigDict, SecretStr

from flows.config import ReleaseSpec
from flows.helm import DeployFailed, Helm, helm_binary, helm_upgrade_argv, helm_version, run_helm, secret_values_file
from flows.limits import ensure_limit, held_slot, run_logger
from flows.rollout import (
    PodProblemRecorder,
    RolloutFailed,
    manifest_deployments,
    verify_rollout,
)
from flows.verify import Verification, VerificationFailed

DIGEST_PLACEHOLDER = "sha256:<digest>"


class DeployedRelease(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    namespace: str
    revision: int
    image: str
    verification: Verification | None = None


def release_lock_name(release: ReleaseSpec) -> str:
    return f"helm-release-{release.namespace}-{release.name}"


PENDING = ("pending-install", "pending-upgrade", "pending-rollback")


def pending_recovery(history: dict[int, str]) -> int | None | Literal["uninstall"]:
    """What puts a release whose last revision is `pending-*` back in a state helm can upgrade.

    helm refuses to upgrade such a release ("another operation
    (install/upgrade/rollback) is in progress", helm/helm pkg/action/upgrade.go
    `errPending`, v4.1.4); a helm that was killed mid-operation leaves it so.
    The answer is the revision to roll back to: the last deployed one, else the
    last failed or superseded one (what helm itself upgrades from when none is
    deployed, pkg/action/upgrade.go `prepareUpgrade`). A release that never got past
    a `pending-install` has nothing to roll back to and is uninstalled, so
    that the upgrade installs it afresh. None when the last revision is not
    pending.
    """
    if not history or history[max(history)] not in PENDING:
        return None
    deployed = [revision for revision, status in history.items() if status == "deployed"]
    ended = [revision for revision, status in history.items() if status in ("failed", "superseded")]
    if deployed or ended:
        return max(deployed or ended)
    return "uninstall"


async def recover_pending(helm: Helm, api: client.ApiClient) -> int | None:
    """The release's current revision, after rolling back (or uninstalling) a release left `pending-*`.

    Called holding the release's lock, so no helm of this pipeline is working
    on the release: a pending revision is one whose helm died. (A helm whose
    flow process was killed outright runs on in its own session until its
    `--timeout`, within the lock's lease of `timeout_seconds` plus 2 minutes,
    unless it also rolls back after that timeout.)
    """
    history = await helm.history(api)
    recovery = pending_recovery(history)
    if recovery is None:
        return max(history, default=None)
    release, last = helm.release, max(history)
    where = f"release {release.namespace}/{release.name}: revision {last} is {history[last]}"
    if recovery == "uninstall":
        run_logger().warning("%s (a helm was stopped before the release was ever installed); uninstalling it "
                          "to install it afresh", where)
        await helm.uninstall()
        return None
    run_logger().warning("%s (a helm was stopped mid-operation); rolling back to revision %d, then upgrading",
                      where, recovery)
    await helm.rollback(recovery)
    return last + 1


async def upgrade_release(
    release: ReleaseSpec,
    *,
    api,
    repo_root: Path,
    image_repository: str,
    image_tag: str,
    kubeconfig: str | None,
    secret_values: dict[str, SecretStr] | None = None,
    verify: Callable[[dict, Helm], Awaitable[Verification | None]] | None = None,
) -> DeployedRelease:
    """Upgrade (or install) the release, verify its rollout, and leave the previous revision running on failure.

    The Deployments to verify are those of the manifest helm applied (`--output
    json`); Pod problems are recorded in the release's namespace from before the
    upgrade starts, and on failure reported for the Deployments the chart renders.
    `verify` gets the release helm installed (its `--output json`) once it has
    rolled out, still holding the release's lock, so a failed check rolls back
    exactly the revision this upgrade made.
    """
    helm = Helm(release, helm_binary(), kubeconfig)
    version = await helm_version(helm.binary)
    lock = release_lock_name(release)
    await ensure_limit(lock, 1)
    with secret_values_file(secret_values or {}) as values_file:
        argv = helm_upgrade_argv(release, repo_root=repo_root, image_repository=image_repository,
                                 image_tag=image_tag, helm=helm.binary, helm_version=version,
                                 kubeconfig=kubeconfig, secret_values_file=values_file)
        async with held_slot(lock, lease_seconds=release.timeout_seconds + 120,
                             timeout=3 * (release.timeout_seconds + 120),
                             # helm/helm pkg/action/upgrade.go (v4): a helm killed midway leaves the release
                             # pending-upgrade, and every later upgrade then fails with errPending
                             when_lost="helm is not started once the lock is lost; a helm already running is left "
                                       "to finish") as held:
            previous = await recover_pending(helm, api)
            async with PodProblemRecorder(api, release.namespace) as problems:
                deployments, verification = None, None
                try:
                    held.ensure_held()
                    upgraded = json.loads(await run_helm(argv, release.timeout_seconds + 60))
                    deployments = manifest_deployments(upgraded.get("manifest", ""), release.namespace)
                    await verify_rollout(api, deployments, release.timeout_seconds)
                    if verify is not None:
                        verification = await verify(upgraded, helm)
                except VerificationFailed as exc:
                    await helm.restore(previous)
                    current = await helm.revision()
                    raise DeployFailed(_failure_message(release, exc.summary, previous, current,
                                                        exc.details)) from None
                except (DeployFailed, RolloutFailed) as exc:
                    await problems.read_probe_failures()
                    if isinstance(exc, RolloutFailed):
                        await helm.restore(previous)
                    elif deployments is None:
                        with contextlib.suppress(DeployFailed):
                            deployments = manifest_deployments(await helm.template(argv), release.namespace)
                    current = await helm.revision()
                    raise DeployFailed(_failure_message(
                        release, exc, previous, current, problems.describe(deployments))) from None
    return DeployedRelease(name=release.name, namespace=release.namespace, revision=upgraded["version"],
                           image=f"{image_repository}:{image_tag}", verification=verification)


def _failure_message(release: ReleaseSpec, error: Exception | str, previous: int | None, current: int | None,
                     pods: str) -> str:
    """`release ns/name: revision 3 failed (<reason>); running revision 4, a rollback to revision 2`."""
    reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    attempted = f"revision {(previous or 0) + 1} failed ({reason})"
    if current is None:
        state = "the release is not installed"
    elif current == previous:
        state = f"still on revision {previous}"
    else:
        state = f"running revision {current}, a rollback to revision {previous}"
    return f"release {release.namespace}/{release.name}: {attempted}; {state}" + (f"\n{pods}" if pods else "")
