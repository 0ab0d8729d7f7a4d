"""The `compare-builders` flow: the same commit built by BuildKit and by Kaniko, side by side, nothing deployed.

Teams arriving from Kaniko want proof before they switch. For every selected
component this flow builds the one archive twice, BuildKit first, then Kaniko,
one after the other so that neither build slows the other; different components
build side by side within `max_parallel_builds` and the global `buildkit` limit.
The images are tagged `<commit12>-buildkit` and `<commit12>-kaniko` only, so no
release picks one up. The `builder-comparison` table artifact has one row per
component and builder: build seconds, pushed digest, image size, layer count,
cache steps used, and the BuildKit/Kaniko time ratio.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_table_artifact
from pydantic import BaseModel, Field

from flows import tasks
from flows.build_run import ImageFacts
from flows.config import Builder, ComponentSpec, ConfigError, PipelineConfig
from flows.deployed import pipeline_file
from flows.kube import kube_api
from flows.limits import ensure_limit
from flows.pipeline import (
    BUILDKIT_LIMIT,
    BUILDKIT_LIMIT_DEFAULT,
    LOCAL_CONNECTION,
    Run,
    check_scopable,
    clean_up_run,
    connection,
    deployment_id,
    package_all,
)
from flows.plan import select
from flows.results import RUN_STARTED, ComponentResult, PipelineFailed
from flows.run_timeout import flow_timeout_seconds

COMPARED: tuple[Builder, ...] = ("buildkit", "kaniko")


def check_comparable(config: PipelineConfig, selected: list[ComponentSpec]) -> None:
    """Refuse, before anything remote happens, a component Kaniko cannot build."""
    problems = [f"components[{config.components.index(c)}].{problem}"
                for c in selected for problem in config.kaniko_limits(c)]
    if problems:
        raise ConfigError(problems)


class BuilderRun(BaseModel):
    """One component built by one builder."""

    component: str
    builder: Builder
    build_seconds: float | None = None
    digest: str | None = None
    image: str | None = None
    size_bytes: int | None = None
    layers: int | None = None
    cache_hits: tuple[int, int] | None = None
    error: str | None = None


class Comparison(BaseModel):
    commit: str
    ref: str
    runs: list[BuilderRun]

    def ratio(self, component: str) -> float | None:
        """BuildKit's build seconds over Kaniko's: below 1 when BuildKit is faster."""
        seconds = {r.builder: r.build_seconds for r in self.runs if r.component == component and not r.error}
        if seconds.get("buildkit") is None or not seconds.get("kaniko"):
            return None
        return round(seconds["buildkit"] / seconds["kaniko"], 2)

    @property
    def failed(self) -> list[BuilderRun]:
        return [r for r in self.runs if r.error]


def builder_run(component: str, builder: Builder, result: ComponentResult, facts: ImageFacts | None) -> BuilderRun:
    image = result.image
    return BuilderRun(
        component=component, builder=builder, build_seconds=result.seconds.get("build"),
        digest=image.digest if image else None, image=f"{image.repository}:{image.tags[0]}" if image else None,
        size_bytes=facts.size_bytes if facts else None, layers=facts.layers if facts else None,
        cache_hits=result.cache_hits, error=result.error,
    )


def comparison_rows(comparison: Comparison) -> list[dict]:
    """The table artifact: uniform columns, the ratio on every row of its component."""

    def cache(hits: tuple[int, int] | None) -> str:
        return f"{hits[0]}/{hits[1]} steps" if hits and hits[1] else "none"

    return [
        {
            "component": r.component,
            "builder": r.builder,
            "build_s": r.build_seconds,
            "digest": r.digest or "",
            "size_mb": round(r.size_bytes / 1e6, 1) if r.size_bytes is not None else None,
            "layers": r.layers,
            "cache": cache(r.cache_hits),
            "buildkit_vs_kaniko": comparison.ratio(r.component),
            "error": (r.error or "")[:300],
        }
        for r in comparison.runs
    ]


def format_comparison(comparison: Comparison) -> str:
    lines = [f"{'component':<20} {'builder':<9} {'build s':>8} {'MB':>7} {'layers':>6}  digest"]
    for row in comparison_rows(comparison):
        size = "" if row["size_mb"] is None else row["size_mb"]
        lines.append(f"{row['component']:<20} {row['builder']:<9} {row['build_s'] or '':>8} {size:>7} "
                     f"{row['layers'] or '':>6}  {row['digest'][:19] or 'failed'}")
    for component in dict.fromkeys(r.component for r in comparison.runs):
        if (ratio := comparison.ratio(component)) is not None:
            lines.append(f"{component}: BuildKit takes {ratio:.2f}x Kaniko's build time")
    return "\n".join(lines)


@flow(name="compare-builders", timeout_seconds=flow_timeout_seconds(), on_cancellation=[clean_up_run],
      on_crashed=[clean_up_run])
async def compare_builders(
    config: str,
    components: list[str] | None = None,
    ref: str | None = None,
    no_cache: bool = False,
    max_parallel_builds: Annotated[int, Field(ge=1, le=50)] = 4,
    target: str | None = None,
) -> Comparison:
    """Build the selected components from one commit with BuildKit and with Kaniko, and compare the two.

    Args:
        config: The pipeline file (YAML), relative to the folder of the deployment's own pipeline file;
            a file outside that folder is refused.
        components: Names of the components to compare (`components[].name` in the pipeline file).
            Empty: every component.
        ref: The branch, tag or full commit SHA to build. Empty: the pipeline file's `source.ref`.
        no_cache: Build without the registry cache, so both builders start cold.
        max_parallel_builds: Builds at once in this run (1 to 50); the global `buildkit` concurrency
            limit also caps builds across runs.
        target: The BuildKit Pipeline Target block to build with: the AWS credentials and the cluster.
            Empty: the worker's own AWS credentials and cluster.
    """
    RUN_STARTED.set(time.perf_counter())
    local = LOCAL_CONNECTION.get()
    pipeline, source = await tasks.prepare_source(await pipeline_file(config, deployment_id()), ref)
    selected = select(pipeline, components)
    check_comparable(pipeline, selected)
    packaged = {c.name: ComponentResult(name=c.name) for c in selected}
    archives = await package_all(pipeline, selected, source, packaged)
    builds = {(c.name, builder): ComponentResult(name=c.name) for c in selected for builder in COMPARED}
    await ensure_limit(BUILDKIT_LIMIT, BUILDKIT_LIMIT_DEFAULT)
    async with connection(target, local.aws_credentials, local.kubeconfig, pipeline, local.build_role_arn) as connected:
        check_scopable(pipeline, connected.build_role_arn)
        async with kube_api(connected.kubeconfig) as api:
            run = Run(pipeline, source, archives, packaged, connected.credentials, api, connected.kubeconfig,
                      connected.bucket, False, no_cache, asyncio.Semaphore(max_parallel_builds),
                      build_role_arn=connected.build_role_arn)
            run.warn_if_unscoped()

            async def compare(component) -> None:
                for builder in COMPARED:
                    await run.build_for_comparison(component, builder, builds[component.name, builder])

            await asyncio.gather(*(compare(c) for c in selected))
        facts = {(name, builder): await tasks.image_facts(connected.credentials, pipeline.registry, result.image,
                                                          component=name, builder=builder)
                 for (name, builder), result in builds.items() if result.image}
    comparison = Comparison(commit=source.commit, ref=source.ref, runs=[
        builder_run(name, builder, result, facts.get((name, builder))) for (name, builder), result in builds.items()])
    await acreate_table_artifact(
        key="builder-comparison", table=comparison_rows(comparison),
        description=f"BuildKit and Kaniko on commit {source.commit[:12]}: build seconds, digest, size, layers, cache",
    )
    get_run_logger().info("builder comparison:\n%s", format_comparison(comparison))
    if failed := comparison.failed:
        raise PipelineFailed("; ".join(f"{r.component} ({r.builder}): {r.error}" for r in failed))
    return comparison
