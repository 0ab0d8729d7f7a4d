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

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

import yaml
from kubernetes_asyncio import client
from pydantic import BaseModel, ConfigDict, SecretStr

from flows.aio import within
from flows.config import ReleaseSpec
from flows.kube import with_retries
from flows.limits import ensure_limit, held_slot, run_logger
from flows.rollout import (
    PodProblemRecorder,
    RolloutFailed,
    manifest_deployments,
    verify_rollout,
)
from flows.verify import Verification, VerificationFailed

REPO_ROOT = Path(__file__).resolve().parent.parent
DIGEST_PLACEHOLDER = "sha256:<digest>"
SECRET_VALUES_PLACEHOLDER = "<secret values file>"


class DeployFailed(RuntimeError):
    """A release did not roll out; the message names release, revisions and reason.

    `output` is what a failed helm wrote on stdout (`helm test --logs` writes its test pods' logs there).
    """

    output: str = ""


class DeployedRelease(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    namespace: str
    revision: int
    image: str
    verification: Verification | None = None


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


def _chart_args(release: ReleaseSpec, repo_root: Path) -> list[str]:
    chart = str(repo_root / release.chart) if release.local_chart else release.chart
    return [chart, *(["--repo", release.repo] if release.repo else []),
            *(["--version", release.version] if release.version else [])]


def helm_set_value(value: str) -> str:
    """`value` written so that helm's `--set-string` parser reads it back unchanged.

    helm/helm pkg/strvals/parser.go (v4.1.4): a value ends at the first unescaped `,`
    (`val`), a backslash takes the next rune literally (`runesUntil`), and a value that
    starts with `{` is read as a list (`valList`).
    """
    escaped = value.replace("\\", "\\\\").replace(",", "\\,")
    return "\\" + escaped if escaped.startswith("{") else escaped


def _values_args(release: ReleaseSpec, *, repo_root: Path, image_repository: str, image_tag: str,
                 secret_values_file: str | None) -> list[str]:
    args = []
    for values in release.values:
        args += ["--values", str(repo_root / values)]
    if release.set_secret:
        args += ["--values", secret_values_file or SECRET_VALUES_PLACEHOLDER]
    args += ["--set-string", f"image.repository={helm_set_value(image_repository)}",
             "--set-string", f"image.tag={helm_set_value(image_tag)}"]
    for key, value in release.set.items():
        args += ["--set-string", f"{key}={helm_set_value(value)}"]
    return args


def helm_upgrade_argv(
    release: ReleaseSpec,
    *,
    repo_root: Path,
    image_repository: str,
    image_tag: str,
    helm: str = "helm",
    helm_version: str = "v4",
    kubeconfig: str | None = None,
    secret_values_file: str | None = None,
) -> list[str]:
    """The exact `helm upgrade --install` command; secret values only ever travel in a file."""
    return [
        helm, "upgrade", "--install", release.name, *_chart_args(release, repo_root),
        "--namespace", release.namespace, *(["--create-namespace"] if release.create_namespace else []),
        *_values_args(release, repo_root=repo_root, image_repository=image_repository, image_tag=image_tag,
                      secret_values_file=secret_values_file),
        "--wait", "--timeout", f"{release.timeout_seconds}s", rollback_flag(helm_version), "--output", "json",
        *(["--kubeconfig", kubeconfig] if kubeconfig else []),
    ]


def secret_values_document(values: dict[str, str]) -> dict:
    """`{"db.password": "x"}` as the nested values helm reads from a file."""
    document: dict = {}
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = document
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return document


@contextlib.contextmanager
def secret_values_file(values: dict[str, SecretStr]):
    """A 0600 values file holding the release's secret values, removed when the operation ends."""
    if not values:
        yield None
        return
    descriptor, path = tempfile.mkstemp(prefix="helm-secret-values-", suffix=".yaml")
    try:
        with os.fdopen(descriptor, "w") as handle:
            os.fchmod(handle.fileno(), 0o600)
            yaml.safe_dump(secret_values_document({k: v.get_secret_value() for k, v in values.items()}), handle)
        yield path
    finally:
        os.unlink(path)


HELM_STOP_SECONDS = 20.0


async def run_helm(argv: list[str], timeout: float) -> str:
    """Run helm to the end, or stop it the way that lets it leave its release consistent.

    helm runs in a session of its own: a worker cancelling the run signals the
    flow's whole process group, SIGTERM and 30 s later SIGKILL (prefect 3.9
    runner/_process_manager.py), and a helm killed mid-operation leaves its
    release `pending-*`. A helm this run stops (the run cancelled, or past
    `timeout`) gets SIGTERM instead, on which `helm upgrade` and `helm install`
    cancel the operation, record the release as failed and, with
    `--rollback-on-failure`/`--atomic`, roll it back (helm/helm pkg/cmd/upgrade.go
    and pkg/action/upgrade.go `handleContext`, v4.1.4); it is killed only if it
    has not ended after `HELM_STOP_SECONDS`, which keeps the whole stop inside
    Prefect's 30 s. The next deploy recovers a release left pending anyway
    (`recover_pending`).
    """
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True
    )
    output = asyncio.ensure_future(process.communicate())
    try:
        stdout, stderr = await within(asyncio.shield(output), timeout)
    except asyncio.TimeoutError:
        await stop_helm(process, output, argv)
        raise DeployFailed(f"`helm {argv[1]}` did not finish within {timeout:.0f}s") from None
    except BaseException:
        await asyncio.shield(stop_helm(process, output, argv))
        raise
    if process.returncode != 0:
        failed = DeployFailed(stderr.decode().strip() or stdout.decode().strip())
        failed.output = stdout.decode()
        raise failed
    return stdout.decode()


async def stop_helm(process: asyncio.subprocess.Process, output: asyncio.Future, argv: list[str]) -> None:
    """SIGTERM, up to `HELM_STOP_SECONDS` for helm to fail and roll back its operation, then SIGKILL."""
    if process.returncode is None:
        run_logger().warning("stopping `helm %s`: SIGTERM, so that it records the release as failed and rolls it "
                          "back; killed if it has not ended in %.0f s", argv[1], HELM_STOP_SECONDS)
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await within(asyncio.shield(output), HELM_STOP_SECONDS)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
    with contextlib.suppress(Exception):
        await output


_HELM_VERSIONS: dict[str, str] = {}


async def helm_version(helm: str) -> str:
    """The binary's version, asked once per process."""
    if helm not in _HELM_VERSIONS:
        _HELM_VERSIONS[helm] = (await run_helm([helm, "version", "--template", "{{.Version}}"], 30)).strip()
    return _HELM_VERSIONS[helm]


def release_lock_name(release: ReleaseSpec) -> str:
    return f"helm-release-{release.namespace}-{release.name}"


def helm_template_argv(binary: str, upgrade_argv: list[str]) -> list[str]:
    """`helm template` with the chart, values and namespace of a `helm upgrade --install` argv."""
    upgrade = upgrade_argv.index("upgrade")
    template = [binary, "template", *upgrade_argv[upgrade + 2:]]
    flags = {"--wait", "--create-namespace", "--rollback-on-failure", "--atomic"}
    template = [a for a in template if a not in flags]
    for option in ("--timeout", "--output"):
        at = template.index(option)
        del template[at:at + 2]
    return template


HELM_STORAGE_KINDS = {"secret": "secrets", "secrets": "secrets", "configmap": "configmaps", "configmaps": "configmaps"}


class Helm:
    """The helm CLI for one release, with the flags every call needs."""

    def __init__(self, release: ReleaseSpec, binary: str, kubeconfig: str | None) -> None:
        self.release, self.binary = release, binary
        self._common = ["--namespace", release.namespace, *(["--kubeconfig", kubeconfig] if kubeconfig else [])]

    async def revision(self) -> int | None:
        """The release's current revision, or None when it is not installed."""
        try:
            status = json.loads(await run_helm([self.binary, "status", self.release.name, *self._common,
                                                "--output", "json"], 60))
        except DeployFailed as exc:
            if "not found" in str(exc):
                return None
            raise
        return status["version"]

    async def stored_revision(self, api: client.ApiClient) -> int | None:
        """What `revision()` says, read from helm's storage objects with one API request instead of a helm process.

        helm keeps every revision as a Secret (or, with HELM_DRIVER=configmap, a
        ConfigMap) labelled `owner=helm,name=<release>,version=<n>`; other
        drivers are asked through `helm status`.
        """
        kind = HELM_STORAGE_KINDS.get(os.environ.get("HELM_DRIVER", "secret").lower() or "secret")
        if kind is None:
            return await self.revision()
        core = client.CoreV1Api(api)
        lister = core.list_namespaced_secret if kind == "secrets" else core.list_namespaced_config_map
        stored = await with_retries(lambda: lister(self.release.namespace,
                                                   label_selector=f"owner=helm,name={self.release.name}"))
        return max((int(item.metadata.labels["version"]) for item in stored.items), default=None)

    async def template(self, argv: list[str]) -> str:
        """The manifest an upgrade with these arguments would apply."""
        return await run_helm(helm_template_argv(self.binary, argv), 120)

    async def history(self, api: client.ApiClient) -> dict[int, str]:
        """Revision -> status, from the `version` and `status` labels helm puts on its storage objects
        (helm/helm pkg/storage/driver/secrets.go and cfgmaps.go, v4.1.4); `helm history` for other drivers."""
        kind = HELM_STORAGE_KINDS.get(os.environ.get("HELM_DRIVER", "secret").lower() or "secret")
        if kind is None:
            try:
                rows = json.loads(await run_helm([self.binary, "history", self.release.name, *self._common,
                                                  "--output", "json"], 60))
            except DeployFailed as exc:
                if "not found" in str(exc):
                    return {}
                raise
            return {row["revision"]: row["status"] for row in rows}
        core = client.CoreV1Api(api)
        lister = core.list_namespaced_secret if kind == "secrets" else core.list_namespaced_config_map
        stored = await with_retries(lambda: lister(self.release.namespace,
                                                   label_selector=f"owner=helm,name={self.release.name}"))
        return {int(item.metadata.labels["version"]): item.metadata.labels.get("status", "")
                for item in stored.items}

    async def run(self, args: list[str], timeout: float) -> str:
        """`helm <args>` for this release's namespace and cluster."""
        return await run_helm([self.binary, *args, *self._common], timeout)

    async def rollback(self, revision: int) -> None:
        await run_helm([self.binary, "rollback", self.release.name, str(revision), *self._common, "--wait",
                        "--timeout", f"{self.release.timeout_seconds}s"], self.release.timeout_seconds + 60)

    async def uninstall(self) -> None:
        await run_helm([self.binary, "uninstall", self.release.name, *self._common, "--wait"], 300)

    async def restore(self, previous: int | None) -> None:
        if previous is None:
            await self.uninstall()
        else:
            await self.rollback(previous)


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
