"""The `build-and-deploy` flow: source → package → upload → registry auth → build → deploy → report.

Components build concurrently; a release waits for the releases named in its
`after:`, and is skipped when one of them failed. The run fails, naming the
failed components, unless every selected component was built and deployed.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_table_artifact
from prefect.runtime import flow_run
from prefect_aws import AwsCredentials
from pydantic import BaseModel

from flows import tasks
from flows.build import BuiltImage
from flows.build_run import delete_run_objects
from flows.config import ComponentSpec, ConfigError, PipelineConfig, load_config
from flows.deploy import DeployedRelease
from flows.kube import kube_api
from flows.package import PackagedContext
from flows.diagnose import explain_failure
from flows.plan import plan_component, prepare_source, select
from flows.progress import ProgressTracker, step_table
from flows.source import SourceCheckout

STAGES = ("package", "upload", "registry-auth", "build", "deploy")


class ComponentResult(BaseModel):
    name: str
    outcome: Literal["deployed", "built", "unchanged", "failed", "skipped"] = "failed"
    archive_sha256: str | None = None
    context_uploaded: bool | None = None
    image: BuiltImage | None = None
    release: DeployedRelease | None = None
    seconds: dict[str, float] = {}
    error: str | None = None
    steps: list[dict] = []
    cache_hits: tuple[int, int] | None = None


class PipelineResult(BaseModel):
    commit: str
    ref: str
    components: list[ComponentResult]
    seconds: dict[str, float] = {}

    @property
    def failed(self) -> list[ComponentResult]:
        return [c for c in self.components if c.outcome in ("failed", "skipped")]


class PipelineFailed(RuntimeError):
    pass


@contextmanager
def timed(seconds: dict[str, float], stage: str):
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = round(time.perf_counter() - started, 3)


async def _aws_credentials(given: AwsCredentials | None, config: PipelineConfig) -> AwsCredentials:
    if given is not None:
        return given
    try:
        return await AwsCredentials.aload("buildkit-pipeline")
    except ValueError:
        return AwsCredentials(region_name=config.aws.region)


async def package_all(
    config: PipelineConfig, selected: list[ComponentSpec], source: SourceCheckout, results: dict[str, ComponentResult]
) -> dict[str, PackagedContext]:
    """Package every selected component before anything remote happens.

    A context that cannot be packaged (an escaping symlink, a special file, an
    oversize archive) stops the run with nothing uploaded and no Job created.
    """

    async def package(component: ComponentSpec) -> PackagedContext:
        with timed(results[component.name].seconds, "package"):
            archive = await tasks.package_component(config, component, source)
        results[component.name].archive_sha256 = archive.sha256
        return archive

    archives = await asyncio.gather(*(package(c) for c in selected), return_exceptions=True)
    problems = [
        f"components[{config.components.index(c)}].context: {archive}"
        for c, archive in zip(selected, archives) if isinstance(archive, Exception)
    ]
    if problems:
        raise ConfigError(problems)
    return {c.name: archive for c, archive in zip(selected, archives)}


async def build_component(
    config: PipelineConfig,
    component: ComponentSpec,
    source: SourceCheckout,
    archive: PackagedContext,
    *,
    credentials: AwsCredentials,
    api,
    result: ComponentResult,
    skip_unchanged: bool = False,
    no_cache: bool = False,
) -> None:
    """upload → registry auth → build, for one packaged component; or reuse the image of an identical context."""
    logger = get_run_logger()
    run_id = str(flow_run.id or "local")
    if skip_unchanged:
        image = plan_component(config, component, source, archive, run_id=run_id).image
        with timed(result.seconds, "build"):
            result.image = await tasks.reuse_unchanged(credentials, config.registry, image)
        if result.image:
            result.outcome = "unchanged"
            logger.info("%s: context unchanged, reusing %s@%s", component.name, image.repository, result.image.digest)
            return
    with timed(result.seconds, "upload"):
        uploaded = await tasks.upload_context(
            archive, credentials, bucket=config.aws.bucket, prefix=config.aws.prefix,
            component=component.name, ttl_seconds=config.aws.presign_ttl_seconds,
        )
    result.context_uploaded = uploaded.uploaded
    logger.info("%s: context %s (%s bytes)", component.name, uploaded.describe(), archive.bytes)
    plan = plan_component(config, component, source, archive, run_id=run_id,
                          context_url=uploaded.url.get_secret_value(), no_cache=no_cache)
    with timed(result.seconds, "registry-auth"):
        token = await tasks.mint_registry_token(credentials, config.registry)
    secret_values = await tasks.read_build_secrets(credentials, component.secrets)
    progress = ProgressTracker()

    def log_line(line: str) -> None:
        for readable in progress.feed(line):
            logger.info("%s | %s", component.name, readable)

    with timed(result.seconds, "build"):
        try:
            result.image = await tasks.run_build(
                api, component=component.name, request=plan.request, token=token, secret_values=secret_values,
                on_log_line=log_line, explain=explain_failure,
            )
        finally:
            result.steps = step_table(progress.steps())
            result.cache_hits = progress.cache_hits()
            if result.steps:
                await acreate_table_artifact(
                    key=f"build-steps-{component.name}", table=result.steps,
                    description=f"BuildKit steps of {component.name}: seconds, cache hits, errors",
                )
    result.outcome = "built"
    logger.info("%s: pushed %s@%s", component.name, plan.image.repository, result.image.digest)


async def deploy_component(
    component: ComponentSpec,
    source: SourceCheckout,
    *,
    dependencies: list[ComponentResult],
    api,
    kubeconfig: str | None,
    result: ComponentResult,
) -> None:
    """Upgrade the component's release with the image it just built, unless a release it comes after failed."""
    blocked = [d.name for d in dependencies if d.outcome != "deployed"]
    if blocked:
        result.outcome, result.error = "skipped", f"not deployed because {', '.join(blocked)} did not deploy"
        return
    with timed(result.seconds, "deploy"):
        secret_values = await tasks.read_release_secrets(component.release)
        result.release = await tasks.deploy_release(
            component.release, api=api, repo_root=source.path, image_repository=result.image.repository,
            image_tag=result.image.pinned_tag, kubeconfig=kubeconfig, secret_values=secret_values,
        )
    result.outcome = "deployed"


async def _report(result: PipelineResult) -> None:
    rows = [
        {"component": c.name, "outcome": c.outcome, **{s: c.seconds.get(s, "") for s in STAGES},
         "digest": c.image.digest if c.image else "", "revision": c.release.revision if c.release else ""}
        for c in result.components
    ]
    await acreate_table_artifact(key="build-and-deploy-timing", table=rows,
                                 description=f"Per-stage seconds for commit {result.commit[:12]}")
    get_run_logger().info("stage timing:\n%s", format_timing(result))


def format_timing(result: PipelineResult) -> str:
    header = ["component", *STAGES, "outcome"]
    lines = [header] + [
        [c.name, *(f"{c.seconds[s]:.2f}" if s in c.seconds else "-" for s in STAGES), c.outcome]
        for c in result.components
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


async def clean_up_run(flow, run, state) -> None:
    """Delete the build Jobs and Secrets of a cancelled or crashed run, so nothing keeps building for nobody."""
    parameters = run.parameters or {}
    try:
        config = load_config(Path(parameters["config"]))
    except (KeyError, ConfigError):
        return
    async with kube_api(parameters.get("kubeconfig")) as api:
        deleted = await delete_run_objects(api, config.build.namespace, str(run.id))
    get_run_logger().info("deleted %d build objects of run %s", deleted, run.name)


@flow(name="build-and-deploy", on_cancellation=[clean_up_run], on_crashed=[clean_up_run])
async def build_and_deploy(
    config: str,
    ref: str | None = None,
    components: list[str] | None = None,
    deploy: bool = True,
    skip_unchanged: bool = False,
    no_cache: bool = False,
    aws_credentials: AwsCredentials | None = None,
    kubeconfig: str | None = None,
) -> PipelineResult:
    """Build every selected component with BuildKit in the cluster and roll out its helm release."""
    started = time.perf_counter()
    pipeline, source = await asyncio.to_thread(prepare_source, Path(config), ref)
    selected = select(pipeline, components)
    results = {c.name: ComponentResult(name=c.name) for c in selected}
    archives = await package_all(pipeline, selected, source, results)
    credentials = await _aws_credentials(aws_credentials, pipeline)
    finished = {c.name: asyncio.Event() for c in selected}
    owner = {c.release.name: c.name for c in selected if c.release}

    async def run_component(component: ComponentSpec) -> None:
        result = results[component.name]
        try:
            await build_component(pipeline, component, source, archives[component.name],
                                  credentials=credentials, api=api, result=result,
                                  skip_unchanged=skip_unchanged, no_cache=no_cache)
            if deploy and component.release:
                dependencies = [owner[name] for name in component.release.after if name in owner]
                for name in dependencies:
                    await finished[name].wait()
                await deploy_component(
                    component, source, dependencies=[results[name] for name in dependencies],
                    api=api, kubeconfig=kubeconfig, result=result,
                )
        except Exception as exc:  # noqa: BLE001 - one component's failure must not stop the others
            result.outcome, result.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            finished[component.name].set()

    async with kube_api(kubeconfig) as api:
        await asyncio.gather(*(run_component(c) for c in selected))
    result = PipelineResult(commit=source.commit, ref=source.ref, components=list(results.values()),
                            seconds={"total": round(time.perf_counter() - started, 3)})
    await _report(result)
    if failed := result.failed:
        raise PipelineFailed("; ".join(f"{c.name}: {c.error}" for c in failed))
    return result
