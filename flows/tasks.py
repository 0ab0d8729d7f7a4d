"""The stages as Prefect tasks: thin wrappers that add retries for transient faults and timeouts.

Blocking work runs in a thread, and every remote call carries its own deadline,
because a task's `timeout_seconds` cannot interrupt a blocking call. Stages that
handle secrets run `carrying_secrets()`, so even DEBUG logging does not print them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from prefect import get_run_logger, task
from prefect.blocks.system import Secret
from prefect.cache_policies import NO_CACHE
from prefect_aws import AwsCredentials
from pydantic import SecretStr

from flows import build, build_run, deploy, package, plan, registry_auth, source, upload, verify
from flows.aws import aws_client
from flows.config import BuildSecretSpec, PipelineConfig, ReleaseSpec
from flows.kube import is_transient_api_error
from flows.secrecy import carrying_secrets


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, BotoConnectionError | asyncio.TimeoutError | ConnectionError):
        return True
    if isinstance(exc, upload.ContextUploadFailed):
        return exc.transient
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status == 429 or exc.response.get("Error", {}).get("Code") == "Throttling"
    return is_transient_api_error(exc) or isinstance(exc, BotoCoreError) and "timeout" in str(exc).lower()


def retry_transient(task, task_run, state) -> bool:
    """Retry only what may pass on its own: network faults, timeouts, throttling, 5xx."""
    return isinstance(state.data, BaseException) and _transient(state.data)


STAGE = dict(cache_policy=NO_CACHE, retry_condition_fn=retry_transient, retry_delay_seconds=[1, 5, 15])
# For stages whose result holds a secret (a registry token, a repository URL that may carry credentials):
# never written to result storage, whatever PREFECT_RESULTS_PERSIST_BY_DEFAULT or a cache policy would do.
NOT_PERSISTED = dict(STAGE, persist_result=False)

# Task run names, so each node of the run graph reads its stage and component (`build weather-mcp (kaniko)`)
# rather than Prefect's default `<task name>-<3 hex of its dynamic key>` (prefect 3.9.1 task_engine.py,
# `_create_task_run_locally`). Prefect formats the template with the call's parameters once, before the first
# attempt, so a retry keeps the name (task_engine.py `start` → `_set_custom_task_run_name`, `_task_name_set`).
# A template names only parameters that hold no secret: never a token, a URL or credentials.


def _source_run_name(parameters: dict) -> str:
    return f"source {parameters['ref']}" if parameters.get("ref") else "source (the pipeline file's ref)"


@task(name="source", task_run_name=_source_run_name, retries=2, timeout_seconds=600, **NOT_PERSISTED)
async def prepare_source(config_path: Path, ref: str | None) -> tuple[PipelineConfig, source.SourceCheckout]:
    """The validated pipeline file and the checkout it names, its paths checked."""
    return await asyncio.to_thread(plan.prepare_source, config_path, ref)


@task(name="package", task_run_name="package {component.name}", timeout_seconds=900, cache_policy=NO_CACHE)
async def package_component(config, component, checkout: source.SourceCheckout) -> package.PackagedContext:
    return await asyncio.to_thread(plan.package_component, config, component, checkout)


@task(name="upload", task_run_name="upload {component}", retries=3, timeout_seconds=900, **STAGE)
async def upload_context(archive: package.PackagedContext, credentials: AwsCredentials, *, bucket: str,
                         prefix: str, component: str) -> upload.StoredContext:
    return await asyncio.to_thread(
        upload.store_context, archive, credentials=credentials, bucket=bucket, prefix=prefix, component=component,
    )


@task(name="registry-auth", task_run_name="registry-auth all components", retries=3, timeout_seconds=60,
      **NOT_PERSISTED)
async def mint_registry_token(credentials: AwsCredentials, registry: str) -> registry_auth.RegistryToken:
    return await asyncio.to_thread(registry_auth.mint_ecr_token, credentials, registry)


@task(name="registry-auth", task_run_name="registry-auth {component}", retries=3, timeout_seconds=60,
      **NOT_PERSISTED)
async def mint_build_token(credentials: AwsCredentials, registry: str, *, component: str,
                           **kwargs) -> registry_auth.RegistryToken:
    """One build's token, from a session of the build role limited to the build's repositories; `component` names
    the task run."""
    return await asyncio.to_thread(functools.partial(registry_auth.mint_build_token, credentials, registry, **kwargs))


@task(name="reuse-unchanged", task_run_name="reuse-unchanged {component}", retries=3, timeout_seconds=60,
      **STAGE)
async def reuse_unchanged(credentials: AwsCredentials, registry: str, image: build.ImageRef,
                          archive_sha256: str, *, component: str) -> build.BuiltImage | None:
    """The image already built from this exact context, tagged for this run; None when there is none, or when its
    config's context-sha256 label does not name this archive (a `ctx-` tag anyone with push rights could move)."""
    digest = await asyncio.to_thread(build_run.existing_image, credentials, registry, image)
    if digest is None:
        return None
    try:
        labels = await asyncio.to_thread(build_run.context_labels, credentials, registry, image, digest)
        refusal = build_run.reuse_refusal(labels, archive_sha256)
    except build_run.UnverifiableImage as exc:
        refusal = str(exc)
    if refusal:
        get_run_logger().warning("not reusing %s:%s (%s): %s; building it instead", image.repository,
                                 image.context_tag, digest, refusal)
        return None
    await asyncio.to_thread(build_run.tag_existing_image, credentials, registry, image, digest)
    return build.BuiltImage(repository=image.repository, tags=image.tags, digest=digest, job=None, reused=True)


@task(name="image-facts", task_run_name="image-facts {component} ({builder})", retries=3, timeout_seconds=60,
      **STAGE)
async def image_facts(credentials: AwsCredentials, registry: str, image: build.BuiltImage, *, component: str,
                      builder: str) -> build_run.ImageFacts:
    """`component` and `builder` name the task run."""
    return await asyncio.to_thread(build_run.image_facts, credentials, registry, image)


@task(name="build-secrets", task_run_name="build-secrets {component}", retries=3, timeout_seconds=60,
      **NOT_PERSISTED)
async def read_build_secrets(credentials: AwsCredentials, secrets: list[BuildSecretSpec], *,
                             component: str) -> dict[str, str]:
    """Values of the build secrets kept in AWS Secrets Manager, for the build's own Kubernetes Secret."""
    wanted = [s for s in secrets if s.aws_secrets_manager]
    if not wanted:
        return {}
    client = aws_client(credentials, "secretsmanager")
    with carrying_secrets():
        return {
            s.id: (await asyncio.to_thread(client.get_secret_value, SecretId=s.aws_secrets_manager))["SecretString"]
            for s in wanted
        }


# `request` holds the presigned URL; the template reads only its `builder`.
@task(name="build", task_run_name="build {component} ({request.builder})", retries=2, **STAGE)
async def run_build(api, *, component: str, request: build.BuildRequest, **kwargs) -> build.BuiltImage:
    """Every Secret, Job and Pod of a build holds the registry token, a build secret or the presigned URL."""
    with carrying_secrets():
        return await build_run.run_build(api, component=component, request=request, **kwargs)


@task(name="release-secrets", task_run_name="release-secrets {component}", retries=2, timeout_seconds=60,
      **NOT_PERSISTED)
async def read_release_secrets(release: ReleaseSpec, *, component: str) -> dict[str, SecretStr]:
    """The release's `set_secret` values, from Prefect Secret blocks."""
    return {key: SecretStr(str((await Secret.aload(block)).get())) for key, block in release.set_secret.items()}


@task(name="deploy", task_run_name="deploy {component}", cache_policy=NO_CACHE)
async def deploy_release(release: ReleaseSpec, *, component: str, **kwargs) -> deploy.DeployedRelease:
    """The objects the rollout check reads may hold what the chart rendered from `set_secret` values."""
    with carrying_secrets() if kwargs.get("secret_values") else contextlib.nullcontext():
        return await deploy.upgrade_release(release, **kwargs)


@task(name="verify", task_run_name="verify {component}", cache_policy=NO_CACHE)
async def verify_release(release: ReleaseSpec, checks: verify.Checks, *, component: str, **kwargs) -> verify.Verification:
    """Run inside `deploy` (the release's lock is held), so a failed check rolls back this run's revision only."""
    return await verify.verify_release(release, checks, **kwargs)
