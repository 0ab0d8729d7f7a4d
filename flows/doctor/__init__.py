"""`doctor`: check an AWS account, an EKS cluster, the pipeline file and Prefect before the first run.

Each group of checks is one module (`aws`, `cluster`, `nodes`, `pipeline_file`,
`prefect_checks`) with `async def checks(subject) -> list[Finding]`; a group
reads what it needs and changes nothing, except through a Finding's `repair`
when the operator asked for `--fix`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import AsyncIterator

from prefect_aws import AwsCredentials

from flows.config import ComponentSpec, PipelineConfig
from flows.doctor.findings import Finding, failed
from flows.source import SourceCheckout

PLACEHOLDER_TAG = "doctor"
PLACEHOLDER_SECRET = "doctor-placeholder"


@dataclass
class Subject:
    """What the checks look at: the pipeline file and its checkout, and the target's AWS account and cluster.

    `api` is None when no Kubernetes client could be made (`kube_error` says why);
    the cluster checks report that, the others go on.
    """

    config: PipelineConfig
    source: SourceCheckout
    credentials: AwsCredentials
    kubeconfig: str | None
    bucket: str
    build_role_arn: str | None
    api: object | None = None
    kube_error: str = ""
    _manifests: dict[str, asyncio.Future] = field(default_factory=dict, repr=False)

    def upgrade_argv(self, component: ComponentSpec, helm: str, secret_file: str | None) -> list[str]:
        """The release's `helm upgrade --install` argv as a run builds it, with a placeholder image tag."""
        from flows.helm import helm_upgrade_argv

        return helm_upgrade_argv(component.release, repo_root=self.source.path,
                                 image_repository=self.config.image_repository(component),
                                 image_tag=PLACEHOLDER_TAG, helm=helm, secret_values_file=secret_file)

    async def manifest(self, component: ComponentSpec) -> str:
        """What `helm template` renders for the component's release with its values and `set`: once per doctor
        run, for the pipeline-file and the cluster checks alike. flows.helm.DeployFailed with helm's error when the
        chart does not render."""
        if component.name not in self._manifests:
            self._manifests[component.name] = asyncio.ensure_future(self._render(component))
        return await self._manifests[component.name]

    async def _render(self, component: ComponentSpec) -> str:
        from pydantic import SecretStr

        from flows.helm import Helm, helm_binary, secret_values_file

        release, helm = component.release, helm_binary()
        # never the set_secret values (Prefect Secret blocks): a placeholder of each, in a file as a run passes them
        placeholders = {key: SecretStr(PLACEHOLDER_SECRET) for key in release.set_secret}
        with secret_values_file(placeholders) as secret_file:
            return await Helm(release, helm, None).template(self.upgrade_argv(component, helm, secret_file))


@contextlib.asynccontextmanager
async def opened(config: PipelineConfig, source: SourceCheckout, target: str | None,
                 aws_credentials: AwsCredentials | None, kubeconfig: str | None,
                 build_role_arn: str | None) -> AsyncIterator[Subject]:
    """The Subject of a check, connected as a run of this target would be (flows.pipeline.connection)."""
    from flows.kube import kube_api
    from flows.pipeline import connection

    async with connection(target, aws_credentials, kubeconfig, config, build_role_arn) as connected:
        subject = Subject(config, source, connected.credentials, connected.kubeconfig, connected.bucket,
                          connected.build_role_arn)
        try:
            async with kube_api(connected.kubeconfig) as api:
                subject.api = api
                yield subject
                return
        except Exception as exc:  # noqa: BLE001 - an unusable kubeconfig is a finding, not a crash
            if subject.api is not None:
                raise
            subject.kube_error = f"{type(exc).__name__}: {exc}"
        yield subject


async def examine(subject: Subject, groups) -> list[Finding]:
    """Every group's findings in order. A group that raises is itself a failed finding, so one broken check
    never hides the others."""
    findings: list[Finding] = []
    for name, checks in groups:
        try:
            findings.extend(await checks(subject))
        except Exception as exc:  # noqa: BLE001 - reported as the group's failure
            findings.append(failed(name, f"the check itself failed: {type(exc).__name__}: {exc}",
                                   "report this as a bug of buildkit-pipeline, with the line above"))
    return findings


async def repair(findings: list[Finding], say) -> list[str]:
    """Run the repair of every finding that has one, each announced by its fix first; the checks named."""
    repaired = []
    for finding in findings:
        if finding.status != "pass" and finding.repair is not None:
            say(f"fixing {finding.check}: {finding.fix}")
            await finding.repair()
            repaired.append(finding.check)
    return repaired
