"""The helm CLI: the exact argv of each operation, and running it so that a stopped helm leaves its release
consistent. Pure argv builders are plain functions; `Helm` binds the flags every call for one release needs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml
from kubernetes_asyncio import client
from pydantic import SecretStr

from flows.aio import within
from flows.config import ReleaseSpec
from flows.kube import with_retries
from flows.limits import run_logger

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET_VALUES_PLACEHOLDER = "<secret values file>"


class DeployFailed(RuntimeError):
    """A release did not roll out; the message names release, revisions and reason.

    `output` is what a failed helm wrote on stdout (`helm test --logs` writes its test pods' logs there).
    """

    output: str = ""


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
