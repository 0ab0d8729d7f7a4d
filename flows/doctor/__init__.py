"""`doctor`: check an AWS account, an EKS cluster, the pipeline file and Prefect before the first run.

Each group of checks is one module (`aws`, `cluster`, `nodes`, `pipeline_file`,
`prefect_checks`) with `async def checks(subject) -> list[Finding]`; a group
reads what it needs and changes nothing, except through a Finding's `repair`
when the operator asked for `--fix`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import AsyncIterator

from prefect_aws import AwsCredentials

from flows.config import PipelineConfig
from flows.doctor.findings import Finding, failed
from flows.source import SourceCheckout


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
