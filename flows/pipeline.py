"""The `build-and-deploy` flow: source → package → queue (with upload and registry auth) → build → deploy → report.

Every component is packaged first (a bad context stops the run before anything
remote happens). Its archive is uploaded and the run's registry token minted
while it waits for a build slot. Components build concurrently, at most
`max_parallel_builds` at once in this run and at most the global `buildkit`
concurrency limit across runs; one component's failure does not stop the
others. A release waits for the releases named in its `after:` and is skipped
when one of them failed. The run fails, naming the failed components, unless
every selected component was built (or reused) and deployed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Annotated, AsyncIterator, Iterator

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.context import FlowRunContext
from prefect.events import emit_event
from prefect.logging.loggers import flow_run_logger
from prefect.runtime import deployment, flow_run
from prefect_aws import AwsCredentials
from pydantic import Field

from blocks.target import BuildKitPipelineTarget
from flows import tasks
from flows.aws import aws_client, credentials_lasting
from flows.build_run import delete_run_objects
from flows.builders import log_reader
from flows.config import ECR_HOST, Builder, ComponentSpec, ConfigError, PipelineConfig, load_config
from flows.deployed import pipeline_file
from flows.diagnose import explain_failure
from flows.kube import kube_api
from flows.limits import ensure_limit, held_slot, previous_table
from flows.package import PackagedContext
from flows.plan import cache_repository, plan_component, select
from flows.progress import step_table
from flows.registry_auth import RegistryToken, check_role_arn, session_name
from flows.report import format_timing, timeline_markdown, timing_rows
from flows.results import (
    RUN_STARTED,
    ComponentResult,
    PipelineFailed,
    PipelineResult,
    record_span,
    timed,
)
from flows.run_timeout import flow_timeout_seconds
from flows.source import SourceCheckout
from flows.upload import StoredContext, presign
from flows.verify import (
    Verification,
    VerificationFailed,
    has_checks,
    planned_checks,
    release_test_hooks,
    warm_mcp_client,
)

BUILDKIT_LIMIT, BUILDKIT_LIMIT_DEFAULT = "buildkit", 10


@dataclass(frozen=True)
class Connection:
    credentials: AwsCredentials
    kubeconfig: str | None
    bucket: str
    build_role_arn: str | None = None


@dataclass(frozen=True)
class LocalConnection:
    """AWS credentials, a kubeconfig and the build role given by the process that starts a run itself."""

    aws_credentials: AwsCredentials | None = None
    kubeconfig: str | None = None
    build_role_arn: str | None = None


LOCAL_CONNECTION: ContextVar[LocalConnection] = ContextVar("local_connection", default=LocalConnection())


@contextmanager
def connected_locally(aws_credentials: AwsCredentials | None = None, kubeconfig: str | None = None,
                      build_role_arn: str | None = None) -> Iterator[None]:
    """Runs started inside this block (the CLI's `run --kubeconfig`/`--sandbox`, the tests) use these.

    They are not flow parameters, so a deployment's run form cannot name a file or
    an identity on the worker: a deployment's runs connect through their `target`
    block, else the worker's own default chain. A ContextVar reaches the flow run,
    its tasks and its hooks in this process, and nothing in a worker's.
    """
    token = LOCAL_CONNECTION.set(LocalConnection(aws_credentials, kubeconfig, check_role_arn(build_role_arn)))
    try:
        yield
    finally:
        LOCAL_CONNECTION.reset(token)


def check_scopable(config: PipelineConfig, build_role_arn: str | None) -> None:
    """Scoped tokens need repository ARNs, which only an ECR registry has."""
    if build_role_arn and not ECR_HOST.match(config.registry):
        raise ConfigError([f"registry: {config.registry!r} is not an ECR registry "
                           "(<account>.dkr.ecr.<region>.amazonaws.com), so build_role_arn cannot scope its tokens"])


def deployment_id():
    """The deployment this flow run was started from; None for a run started in this process."""
    context = FlowRunContext.get()
    return context.flow_run.deployment_id if context and context.flow_run else None


@contextlib.asynccontextmanager
async def connection(
    target: str | None, aws_credentials: AwsCredentials | None, kubeconfig: str | None, config: PipelineConfig,
    build_role_arn: str | None = None,
) -> AsyncIterator[Connection]:
    """AWS credentials, a kubeconfig path, the context bucket and the build role: given directly, from a target
    block, or the pipeline file's."""
    if target:
        block = await BuildKitPipelineTarget.aload(target)
        bucket = block.context_bucket.bucket_name if block.context_bucket else config.aws.bucket
        async with block.kubeconfig() as path:
            yield Connection(aws_credentials or block.aws_credentials, kubeconfig or path, bucket,
                             build_role_arn or block.build_role_arn)
    else:
        yield Connection(aws_credentials or AwsCredentials(region_name=config.aws.region), kubeconfig,
                         config.aws.bucket, build_role_arn)


async def package_all(
    config: PipelineConfig, selected: list[ComponentSpec], source: SourceCheckout, results: dict[str, ComponentResult]
) -> dict[str, PackagedContext]:
    """Package every selected component before anything remote happens.

    A context that cannot be packaged (an escaping symlink, a special file, an
    oversize archive) stops the run with nothing uploaded and no Job created.
    """

    async def package(component: ComponentSpec) -> PackagedContext:
        with timed(results[component.name], "package"):
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


@dataclass
class Run:
    """One flow run's shared state: what to build, where, and how far each component got."""

    config: PipelineConfig
    source: SourceCheckout
    archives: dict[str, PackagedContext]
    results: dict[str, ComponentResult]
    credentials: AwsCredentials
    api: object
    kubeconfig: str | None
    bucket: str
    skip_unchanged: bool
    no_cache: bool
    build_slots: asyncio.Semaphore
    finished: dict[str, asyncio.Event] = field(default_factory=dict)
    token: RegistryToken | None = None
    token_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    build_role_arn: str | None = None

    @property
    def run_id(self) -> str:
        return str(flow_run.id or "local")

    async def component(self, component: ComponentSpec, deploy: bool) -> None:
        result = self.results[component.name]
        try:
            await self.build(component, result)
            if deploy and component.release:
                await self.deploy(component, result)
        except Exception as exc:  # noqa: BLE001 - one component's failure must not stop the others
            result.outcome, result.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            self.finished[component.name].set()

    async def build(self, component: ComponentSpec, result: ComponentResult) -> None:
        """upload and registry auth while queueing for a slot → build; or reuse the image of an identical context."""
        logger = get_run_logger()
        archive = self.archives[component.name]
        if self.skip_unchanged:
            image = plan_component(self.config, component, self.source, archive, run_id=self.run_id).image
            with timed(result, "build"):
                result.image = await tasks.reuse_unchanged(self.credentials, self.config.registry, image,
                                                           archive.sha256, component=component.name)
            if result.image:
                result.outcome = "unchanged"
                logger.info("%s: context unchanged, reusing %s@%s", component.name, image.repository,
                            result.image.digest)
                return
        await self.build_in_cluster(component, result)
        result.outcome = "built"
        logger.info("%s: pushed %s@%s", component.name, result.image.repository, result.image.digest)
        emit_event(
            event="buildkit.image.pushed",
            resource={"prefect.resource.id": f"ecr.image.{result.image.repository}@{result.image.digest}",
                      "prefect.resource.name": f"{result.image.repository}:{result.image.tags[0]}"},
            payload={"component": component.name, "digest": result.image.digest, "tags": result.image.tags,
                     "commit": self.source.commit},
        )

    @contextlib.asynccontextmanager
    async def build_slot(self, result: ComponentResult) -> AsyncIterator[None]:
        """Hold one of this run's build slots and one of the global `buildkit` limit; the wait is the `queue` stage."""
        async with contextlib.AsyncExitStack() as held:
            with timed(result, "queue"):
                await held.enter_async_context(self.build_slots)
                await held.enter_async_context(held_slot(
                    BUILDKIT_LIMIT, lease_seconds=600, timeout=3 * self.config.build.timeout_seconds,
                    when_lost="A build already running goes on; its Job's activeDeadlineSeconds still bounds it"))
            yield

    def warn_if_unscoped(self) -> None:
        if not self.build_role_arn:
            get_run_logger().warning(
                "build_role_arn is not set: every build's ECR token carries all the ECR rights of the flow's AWS "
                "credentials, so a compromised build can push over other components' tags and caches. Set "
                "build_role_arn on the target block (README, 'Pointing it at a real EKS cluster', IAM) to mint "
                "each build's token from a session limited to its component's repositories")

    async def registry_token(self, component: ComponentSpec, held: RegistryToken | None = None) -> RegistryToken:
        """The ECR token for a build of `component`, lasting past the build's deadline.

        With `build_role_arn`: `held` while it lasts, else a new token of a new session of the build role limited
        to the component's image and cache repositories. Without: one token for the run's builds, minted with the
        flow's credentials, again whenever it could expire before a build's deadline."""
        lasting = self.config.build.timeout_seconds + 600
        if self.build_role_arn:
            if held is not None and self._lasts(held, lasting):
                return held
            repositories = [r for r in (self.config.image_repository(component),
                                        cache_repository(self.config, component)) if r]
            return await tasks.mint_build_token(
                self.credentials, self.config.registry, component=component.name, role_arn=self.build_role_arn,
                repositories=repositories, session=session_name(component.name, self.run_id), lasting_seconds=lasting)
        if self._lasts(self.token, lasting):
            return self.token
        async with self.token_lock:
            if not self._lasts(self.token, lasting):
                self.token = await tasks.mint_registry_token(self.credentials, self.config.registry)
            return self.token

    @staticmethod
    def _lasts(token: RegistryToken | None, seconds: int) -> bool:
        return token is not None and token.expires_at >= datetime.now(timezone.utc) + timedelta(seconds=seconds)

    async def _store_and_authenticate(self, component: ComponentSpec, result: ComponentResult):
        async def store() -> StoredContext:
            with timed(result, "upload"):
                return await tasks.upload_context(self.archives[component.name], self.credentials, bucket=self.bucket,
                                                  prefix=self.config.aws.prefix, component=component.name)

        async def authenticate() -> RegistryToken:
            with timed(result, "registry-auth"):
                return await self.registry_token(component)

        return await asyncio.gather(store(), authenticate())

    async def build_for_comparison(self, component: ComponentSpec, builder: Builder, result: ComponentResult) -> None:
        """Build with the given builder into `<commit12>-<builder>`, whatever the pipeline file chose."""
        try:
            await self.build_in_cluster(component, result, builder=builder, comparison=True)
            result.outcome = "built"
        except Exception as exc:  # noqa: BLE001 - the other builder and the other components go on
            result.outcome, result.error = "failed", f"{type(exc).__name__}: {exc}"

    async def build_in_cluster(self, component: ComponentSpec, result: ComponentResult, *,
                               builder: Builder | None = None, comparison: bool = False) -> None:
        """Upload and registry auth while waiting for a build slot; then, holding it, the build Job.

        The URL is signed and the token checked once the slot is held, so both
        are fresh when the Job starts, however long the queue was.
        """
        staged = asyncio.ensure_future(self._store_and_authenticate(component, result))
        try:
            async with self.build_slot(result):
                stored, token = await staged
                await self._build_job(component, result, stored, token, builder=builder, comparison=comparison)
        finally:
            if not staged.done():
                staged.cancel()
                await asyncio.gather(staged, return_exceptions=True)

    async def _build_job(self, component: ComponentSpec, result: ComponentResult, stored: StoredContext,
                         token: RegistryToken, *, builder: Builder | None, comparison: bool) -> None:
        logger = get_run_logger()
        config, archive = self.config, self.archives[component.name]
        result.context_uploaded = stored.uploaded
        uploaded = presign(self.credentials, stored, config.aws.presign_ttl_seconds)
        logger.info("%s: context %s (%s bytes), its URL valid until %s", component.name, stored.describe(),
                    archive.bytes, f"{uploaded.expires_at:%Y-%m-%d %H:%M:%S}Z")
        plan = plan_component(config, component, self.source, archive, run_id=self.run_id,
                              context_url=uploaded.url.get_secret_value(), no_cache=self.no_cache,
                              builder=builder, comparison=comparison)
        result.builder = plan.request.builder
        token = await self.registry_token(component, token)
        from_aws = [s for s in component.secrets if s.aws_secrets_manager]
        secret_values = (await tasks.read_build_secrets(self.credentials, from_aws, component=component.name)
                         if from_aws else {})
        progress = log_reader(plan.request.builder)

        def log_line(line: str) -> None:
            for readable in progress.feed(line):
                logger.info("%s | %s", component.name, readable)

        with timed(result, "build"):
            try:
                result.image = await tasks.run_build(
                    self.api, component=component.name, request=plan.request, token=token,
                    secret_values=secret_values, on_log_line=log_line, explain=explain_failure,
                )
            finally:
                result.steps, result.cache_hits = step_table(progress.steps()), progress.cache_hits()
                if result.steps:
                    await acreate_table_artifact(
                        key=f"build-steps-{component.name}" + (f"-{result.builder}" if comparison else ""),
                        table=result.steps,
                        description=f"{result.builder} steps of {component.name}: seconds, cache hits, errors",
                    )

    async def deploy(self, component: ComponentSpec, result: ComponentResult) -> None:
        """Upgrade the release with the image just built, after the releases it comes after."""
        owners = {c.release.name: c.name for c in self.config.components if c.release and c.name in self.results}
        dependencies = [owners[name] for name in component.release.after if name in owners]
        for name in dependencies:
            await self.finished[name].wait()
        blocked = [name for name in dependencies if self.results[name].outcome != "deployed"]
        if blocked:
            result.outcome, result.error = "skipped", f"not deployed because {', '.join(blocked)} did not deploy"
            return
        release = component.release
        started, verifying = time.perf_counter(), []

        async def verify(installed: dict, helm) -> Verification | None:
            hooks = release_test_hooks(installed)
            if not has_checks(release.verify, hooks):
                return None
            verifying.append(time.perf_counter())
            try:
                return await self.verify(component, installed["version"], hooks, helm)
            finally:
                verifying.append(time.perf_counter())

        try:
            secret_values = (await tasks.read_release_secrets(release, component=component.name)
                             if release.set_secret else {})
            result.release = await tasks.deploy_release(
                release, component=component.name, api=self.api, repo_root=self.source.path,
                image_repository=result.image.repository, image_tag=result.image.pinned_tag,
                kubeconfig=self.kubeconfig, secret_values=secret_values, verify=verify,
            )
        finally:
            # verify's seconds are the checks; what follows them (a rollback after a failed check, releasing the
            # release's lock, ending the task) is the deploy stage's, in its seconds though not in its span
            ended = time.perf_counter()
            record_span(result, "deploy", started, verifying[0] if verifying else ended)
            if verifying:
                checked = verifying[1] if len(verifying) > 1 else ended
                record_span(result, "verify", verifying[0], checked)
                result.seconds["deploy"] = round(result.seconds["deploy"] + ended - checked, 3)
        result.outcome = "deployed"
        emit_event(
            event="helm.release.upgraded",
            resource={"prefect.resource.id": f"helm.release.{result.release.namespace}.{result.release.name}",
                      "prefect.resource.name": result.release.name},
            payload={"component": component.name, "revision": result.release.revision,
                     "image": result.release.image, "commit": self.source.commit},
        )


    async def verify(self, component: ComponentSpec, revision: int, hooks: list[str], helm) -> Verification:
        """The release's checks, as the `verify` stage; its events either way."""
        release = component.release
        resource = {"prefect.resource.id": f"helm.release.{release.namespace}.{release.name}",
                    "prefect.resource.name": release.name}
        payload = {"component": component.name, "revision": revision, "commit": self.source.commit}
        try:
            checks = planned_checks(release.verify, hooks)
            verification = await tasks.verify_release(release, checks, component=component.name, helm=helm,
                                                      api=self.api)
        except VerificationFailed as exc:
            emit_event(event="helm.release.verification-failed", resource=resource,
                       payload={**payload, "failure": exc.summary})
            raise
        get_run_logger().info("%s: verified release %s/%s revision %d: %s", component.name, release.namespace,
                              release.name, revision, verification.describe())
        emit_event(event="helm.release.verified", resource=resource,
                   payload={**payload, **verification.model_dump(mode="json")})
        return verification


def release_order(config: PipelineConfig) -> dict[str, list[str]]:
    """Component name -> the components whose releases it deploys after."""
    owners = {c.release.name: c.name for c in config.components if c.release}
    return {c.name: [owners[r] for r in (c.release.after if c.release else [])] for c in config.components}


def timing_key() -> str:
    return f"build-and-deploy-timing-{deployment.name}" if deployment.name else "build-and-deploy-timing"


async def report(result: PipelineResult, config: PipelineConfig, previous: list[dict] | None) -> None:
    """Timing table and critical-path chart as artifacts, compared with the previous run of this deployment."""
    key = timing_key()
    await asyncio.gather(
        acreate_table_artifact(key=key, table=timing_rows(result),
                               description=f"Seconds per component and stage, commit {result.commit[:12]}"),
        acreate_markdown_artifact(key=key.replace("timing", "critical-path"),
                                  markdown=timeline_markdown(result, release_order(config), previous),
                                  description="Critical path of the run, and the change since the last run"),
    )
    get_run_logger().info("stage timing:\n%s", format_timing(result))


async def clean_up_run(flow, flow_run, state) -> None:
    """Delete the build Jobs and Secrets of a cancelled or crashed run, so nothing keeps building for nobody.

    Prefect calls hooks two ways, so the parameters have its names and order:
    the runner of a worker or `serve`, which runs the cancellation and crash
    hooks once the flow process is gone, by keyword
    (`hook(flow=flow, flow_run=flow_run, state=state)`, prefect 3.9
    runner/_hook_runner.py), and the engine of an in-process run positionally
    (`hook(flow, flow_run, state)`, prefect 3.9 flow_engine.py).
    """
    parameters, local = flow_run.parameters or {}, LOCAL_CONNECTION.get()
    try:
        config = load_config(await pipeline_file(parameters["config"], flow_run.deployment_id))
    except (KeyError, ConfigError):
        return
    async with connection(parameters.get("target"), local.aws_credentials, local.kubeconfig, config,
                          local.build_role_arn) as connected:
        async with kube_api(connected.kubeconfig) as api:
            deleted = await delete_run_objects(api, config.build.namespace, str(flow_run.id))
    flow_run_logger(flow_run, flow).info("deleted %d build objects of run %s", deleted, flow_run.name)


@flow(name="build-and-deploy", timeout_seconds=flow_timeout_seconds(), on_cancellation=[clean_up_run],
      on_crashed=[clean_up_run])
async def build_and_deploy(
    config: str,
    components: list[str] | None = None,
    ref: str | None = None,
    skip_unchanged: bool = False,
    no_cache: bool = False,
    deploy: bool = True,
    dry_run: bool = False,
    max_parallel_builds: Annotated[int, Field(ge=1, le=50)] = 4,
    target: str | None = None,
) -> PipelineResult:
    """Build every selected component with BuildKit in the cluster and roll out its helm release.

    Args:
        config: The pipeline file (YAML), relative to the folder of the deployment's own pipeline file;
            a file outside that folder is refused.
        components: Names of the components to build and deploy (`components[].name` in the pipeline
            file). Empty: every component.
        ref: The branch, tag or full commit SHA to build. Empty: the pipeline file's `source.ref`.
        skip_unchanged: Reuse the image already pushed for an identical build context (its `ctx-` tag)
            instead of building it again.
        no_cache: Build without importing the registry cache.
        deploy: Roll out each component's helm release after its build. Off: build and push only.
        dry_run: Check the pipeline file, fetch the commit and package the contexts; upload, build and
            deploy nothing.
        max_parallel_builds: Builds at once in this run (1 to 50); the global `buildkit` concurrency
            limit also caps builds across runs.
        target: The BuildKit Pipeline Target block to build and deploy with: the AWS credentials and
            the cluster. Empty: the worker's own AWS credentials and cluster.
    """
    started = time.perf_counter()
    RUN_STARTED.set(started)
    local = LOCAL_CONNECTION.get()
    config_path = await pipeline_file(config, deployment_id())
    (pipeline, source), previous_timing = await asyncio.gather(tasks.prepare_source(config_path, ref),
                                                              previous_table(timing_key()))
    selected = select(pipeline, components)
    results = {c.name: ComponentResult(name=c.name) for c in selected}
    if dry_run:
        await package_all(pipeline, selected, source, results)
        for component in selected:
            results[component.name].outcome = "planned"
    else:
        async with (connection(target, local.aws_credentials, local.kubeconfig, pipeline,
                               local.build_role_arn) as connected,
                    kube_api(connected.kubeconfig) as api):
            check_scopable(pipeline, connected.build_role_arn)
            archives, _, _ = await asyncio.gather(
                package_all(pipeline, selected, source, results),
                asyncio.to_thread(aws_client, connected.credentials, "s3"),
                # before anything is uploaded: credentials that cannot outlast a context URL fail the run here
                asyncio.to_thread(credentials_lasting, connected.credentials, pipeline.aws.presign_ttl_seconds))
            await ensure_limit(BUILDKIT_LIMIT, BUILDKIT_LIMIT_DEFAULT)
            run = Run(pipeline, source, archives, results, connected.credentials, api, connected.kubeconfig,
                      connected.bucket, skip_unchanged, no_cache, asyncio.Semaphore(max_parallel_builds),
                      finished={c.name: asyncio.Event() for c in selected}, build_role_arn=connected.build_role_arn)
            run.warn_if_unscoped()
            warming = warm_mcp_client(selected) if deploy else None
            try:
                await asyncio.gather(*(run.component(c, deploy) for c in selected))
            finally:
                if warming is not None:
                    await asyncio.gather(warming, return_exceptions=True)
    result = PipelineResult(commit=source.commit, ref=source.ref, components=list(results.values()),
                            seconds={"total": round(time.perf_counter() - started, 3)})
    await report(result, pipeline, previous_timing)
    if failed := result.failed:
        raise PipelineFailed("; ".join(f"{c.name}: {c.error}" for c in failed))
    return result
