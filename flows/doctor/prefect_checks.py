"""Pre-flight checks: the Prefect server a run reports to, the `buildkit` concurrency limit, the deployments' work pool.

The server is the one this process talks to (PREFECT_API_URL, or the temporary
one a CLI run starts without it). A server that does not answer makes the
other two checks meaningless, so they are left out then.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from flows.aio import within
from flows.doctor import Subject
from flows.doctor.findings import Finding, failed, passed, warned
from flows.limits import create_missing_limit
from flows.pipeline import BUILDKIT_LIMIT, BUILDKIT_LIMIT_DEFAULT

PREFECT_YAML = Path(__file__).resolve().parents[2] / "prefect.yaml"
# README "Operating it": the deployments run on a process work pool; a Kubernetes pool is the in-cluster variant.
WORK_POOL_TYPE = "process"
SERVER_SECONDS = 20.0


def work_pools(prefect_yaml: Path = PREFECT_YAML) -> list[str]:
    """The work pools prefect.yaml's deployments name, in order (YAML anchors resolved)."""
    document = yaml.safe_load(prefect_yaml.read_text()) or {}
    names = [(d.get("work_pool") or {}).get("name") for d in document.get("deployments") or []]
    return list(dict.fromkeys(n for n in names if n))


async def server(api_url: str) -> Finding:
    async with get_client() as prefect:
        try:
            problem = await within(prefect.api_healthcheck(), SERVER_SECONDS)
            version = None if problem else await within(prefect.api_version(), SERVER_SECONDS)
        except asyncio.TimeoutError:
            problem = f"no answer within {SERVER_SECONDS:.0f} s"
    if problem:
        return failed("prefect.server", f"the Prefect API at {api_url} does not answer: {problem}",
                      "start a server (`prefect server start`) or point this process at yours:\n"
                      "prefect config set PREFECT_API_URL=http://<host>:4200/api")
    return passed("prefect.server", f"the Prefect API at {api_url} answers (server {version})")


async def _found(read):
    """What a Prefect read answers; None when the server has no such object."""
    try:
        return await read
    except ObjectNotFound:
        return None


async def concurrency_limit() -> Finding:
    check = "prefect.concurrency-limit"
    async with get_client() as prefect:
        limit = await _found(prefect.read_global_concurrency_limit_by_name(BUILDKIT_LIMIT))
    if limit is None:
        # flows/pipeline.py creates it at the start of a run (ensure_limit), so a missing one costs nothing yet;
        # until then, nothing bounds how many build Jobs several runs start at once.
        return warned(check, f"no global concurrency limit {BUILDKIT_LIMIT!r}: the first run creates it with "
                      f"{BUILDKIT_LIMIT_DEFAULT} slots",
                      f"prefect gcl create {BUILDKIT_LIMIT} --limit {BUILDKIT_LIMIT_DEFAULT}",
                      repair=lambda: create_missing_limit(BUILDKIT_LIMIT, BUILDKIT_LIMIT_DEFAULT))
    state = "active" if limit.active else "inactive (it limits nothing)"
    if not limit.active:
        return warned(check, f"the global concurrency limit {BUILDKIT_LIMIT!r} is {state}",
                      f"prefect gcl enable {BUILDKIT_LIMIT}")
    return passed(check, f"the global concurrency limit {BUILDKIT_LIMIT!r} allows {limit.limit} builds at once")


async def create_work_pool(name: str) -> None:
    """What `prefect work-pool create NAME --type process` does (prefect 3.9.1 cli/work_pool.py `create`): the
    worker type's default base job template; an existing pool is left as it is."""
    from prefect.workers.process import ProcessWorker

    pool = WorkPoolCreate(name=name, type=WORK_POOL_TYPE,
                          base_job_template=ProcessWorker.get_default_base_job_template())
    async with get_client() as prefect:
        try:
            await prefect.create_work_pool(pool)
        except ObjectAlreadyExists:
            pass


async def work_pool(name: str) -> Finding:
    check = "prefect.work-pool"
    async with get_client() as prefect:
        pool = await _found(prefect.read_work_pool(name))
    if pool is None:
        # `buildkit-pipeline run` needs no pool; a deployment's runs stay Scheduled until one exists with a worker.
        return warned(check, f"no work pool {name!r}: `run` works, but runs of the deployments in prefect.yaml "
                      "wait until it exists and a worker polls it",
                      f"prefect work-pool create {name} --type {WORK_POOL_TYPE}\n"
                      f"(or --type kubernetes for flow runs in the cluster, README \"Operating it\")",
                      repair=lambda: create_work_pool(name))
    paused = ", paused: runs wait until it is resumed" if pool.is_paused else ""
    if pool.is_paused:
        return warned(check, f"the work pool {name!r} ({pool.type}) exists{paused}", f"prefect work-pool resume {name}")
    return passed(check, f"the work pool {name!r} ({pool.type}) exists")


async def checks(subject: Subject) -> list[Finding]:
    async with get_client() as prefect:
        api_url = str(prefect.api_url).rstrip("/")
    found = await server(api_url)
    if found.status != "pass":
        return [found]
    return [found, await concurrency_limit(), *[await work_pool(name) for name in work_pools()]]
