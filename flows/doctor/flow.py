"""The `doctor` flow and what the CLI calls: every check group against one pipeline file and target."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact
from prefect_aws import AwsCredentials

from flows.doctor import aws, cluster, examine, nodes, opened, pipeline_file, prefect_checks, repair
from flows.doctor.findings import MARKS, Finding, exit_code, render

GROUPS = (
    ("pipeline", pipeline_file.checks),
    ("aws", aws.checks),
    ("cluster", cluster.checks),
    ("nodes", nodes.checks),
    ("prefect", prefect_checks.checks),
)


class DoctorFailed(RuntimeError):
    """At least one check failed; the message lists them."""


async def check_target(config_path: Path, ref: str | None = None, target: str | None = None, *, fix: bool = False,
                       aws_credentials: AwsCredentials | None = None, kubeconfig: str | None = None,
                       build_role_arn: str | None = None, say: Callable[[str], None] = print,
                       prepared: tuple | None = None) -> list[Finding]:
    """Every check's finding. With `fix`, the safe repairs run (each announced first) and the checks run again.

    A pipeline file that does not load or a source that cannot be checked out is
    bad input (ConfigError, SourceError), raised before anything remote is asked.
    `prepared` is the file's (config, checkout) when the caller has them already.
    """
    from flows.plan import prepare_source

    config, source = prepared or prepare_source(config_path, ref)
    async with opened(config, source, target, aws_credentials, kubeconfig, build_role_arn) as subject:
        findings = await examine(subject, GROUPS)
        if fix and await repair(findings, say):
            findings = await examine(subject, GROUPS)
    return findings


def markdown(findings: list[Finding]) -> str:
    rows = [f"| {MARKS[f.status]} | `{f.check}` | {f.found} | {f.fix.replace(chr(10), '<br>')} |" for f in findings]
    return "\n".join(["| | check | found | fix |", "|---|---|---|---|", *rows])


@flow(name="doctor", log_prints=False)
async def doctor(config: str, target: str | None = None, ref: str | None = None, fix: bool = False) -> list[dict]:
    """Check the AWS account, the cluster, the pipeline file and Prefect before a first run, and say what to fix.

    Args:
        config: The pipeline file, relative to the deployment's checkout.
        target: The BuildKit Pipeline Target block to check (the worker's default chain when empty).
        ref: The branch, tag or commit whose charts and values are checked (default: the file's source.ref).
        fix: Create what is safe to create and idempotent (ECR repositories, the namespace and its label, RBAC,
            the bucket's lifecycle rule, the concurrency limit), each logged before it is done.
    """
    from flows.deployed import pipeline_file
    from flows.pipeline import LOCAL_CONNECTION, deployment_id

    logger, local = get_run_logger(), LOCAL_CONNECTION.get()
    findings = await check_target(await pipeline_file(config, deployment_id()), ref, target, fix=fix, aws_credentials=local.aws_credentials,
                                  kubeconfig=local.kubeconfig, build_role_arn=local.build_role_arn,
                                  say=logger.info)
    logger.info("doctor:\n%s", render(findings))
    await acreate_markdown_artifact(key="doctor", markdown=markdown(findings),
                                    description="Pre-flight checks of the account, the cluster and the pipeline")
    if exit_code(findings):
        raise DoctorFailed("; ".join(f"{f.check}: {f.found}" for f in findings if f.status == "fail"))
    return [f.as_json() for f in findings]
