"""doctor's Prefect checks against the session's Prefect server: it answers, the `buildkit` limit, the work pool."""

from __future__ import annotations

import asyncio
import socket

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

from flows.doctor.flow import check_target
from flows.pipeline import BUILDKIT_LIMIT

POOL = "buildkit-pipeline"


def doctor(app, **kwargs) -> dict:
    findings = asyncio.run(check_target(app.pipeline_file, **app.flow_kwargs, **kwargs, say=lambda _: None))
    return {f.check: f for f in findings if f.check.startswith("prefect.")}


async def _limit():
    async with get_client() as prefect:
        try:
            return await prefect.read_global_concurrency_limit_by_name(BUILDKIT_LIMIT)
        except ObjectNotFound:
            return None


async def _pool():
    async with get_client() as prefect:
        try:
            return await prefect.read_work_pool(POOL)
        except ObjectNotFound:
            return None


async def _remove_limit_and_pool():
    """Both gone; what was there, to put back."""
    limit, pool = await _limit(), await _pool()
    async with get_client() as prefect:
        if limit is not None:
            await prefect.delete_global_concurrency_limit_by_name(BUILDKIT_LIMIT)
        if pool is not None:
            await prefect.delete_work_pool(POOL)
    return limit


async def _restore_limit(limit):
    async with get_client() as prefect:
        if limit is not None and await _limit() is None:
            await prefect.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=BUILDKIT_LIMIT, limit=limit.limit))


def test_a_missing_limit_and_work_pool_warn_and_fix_creates_them_once(prefect_server, example_app):
    before = asyncio.run(_remove_limit_and_pool())
    try:
        found = doctor(example_app)
        assert found["prefect.server"].status == "pass"
        limit, pool = found["prefect.concurrency-limit"], found["prefect.work-pool"]
        assert (limit.status, limit.fix) == ("warn", "prefect gcl create buildkit --limit 10")
        assert (pool.status, pool.fix.splitlines()[0]) == ("warn", "prefect work-pool create buildkit-pipeline "
                                                                   "--type process")
        assert limit.repair is not None and pool.repair is not None

        said = []
        found = asyncio.run(check_target(example_app.pipeline_file, **example_app.flow_kwargs, fix=True,
                                         say=said.append))
        found = {f.check: f for f in found if f.check.startswith("prefect.")}
        assert [found[c].status for c in ("prefect.concurrency-limit", "prefect.work-pool")] == ["pass", "pass"]
        assert "fixing prefect.concurrency-limit: prefect gcl create buildkit --limit 10" in said
        created_limit, created_pool = asyncio.run(_limit()), asyncio.run(_pool())
        assert (created_limit.limit, created_limit.active) == (10, True)
        assert created_pool.type == "process" and created_pool.base_job_template["job_configuration"]

        # a second repair changes nothing
        asyncio.run(limit.repair())
        asyncio.run(pool.repair())
        again_limit, again_pool = asyncio.run(_limit()), asyncio.run(_pool())
        assert (again_limit.id, again_limit.limit, again_limit.updated) == (created_limit.id, 10, created_limit.updated)
        assert (again_pool.id, again_pool.updated) == (created_pool.id, created_pool.updated)
    finally:
        asyncio.run(_restore_limit(before))


def test_an_existing_limit_and_pool_pass(prefect_server, example_app):
    from flows.doctor import prefect_checks
    from flows.limits import create_missing_limit

    asyncio.run(create_missing_limit(BUILDKIT_LIMIT, 10))
    asyncio.run(prefect_checks.create_work_pool(POOL))
    found = doctor(example_app)
    assert [f.status for f in found.values()] == ["pass", "pass", "pass"], found
    assert found["prefect.server"].found.startswith("the Prefect API at http://127.0.0.1:")
    assert "allows" in found["prefect.concurrency-limit"].found
    assert found["prefect.work-pool"].found == "the work pool 'buildkit-pipeline' (process) exists"


def test_a_server_that_does_not_answer_fails_with_where_to_point(prefect_server, example_app):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{port}/api", PREFECT_CLIENT_MAX_RETRIES: 0}):
        found = doctor(example_app)
    assert list(found) == ["prefect.server"]
    assert found["prefect.server"].status == "fail"
    assert found["prefect.server"].found.startswith(f"the Prefect API at http://127.0.0.1:{port}/api does not answer")
    assert "prefect config set PREFECT_API_URL=" in found["prefect.server"].fix


async def _set(active: bool, paused: bool) -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate, WorkPoolUpdate

    async with get_client() as prefect:
        await prefect.update_global_concurrency_limit(BUILDKIT_LIMIT, GlobalConcurrencyLimitUpdate(active=active))
        await prefect.update_work_pool(POOL, WorkPoolUpdate(is_paused=paused))


def test_an_inactive_limit_and_a_paused_pool_warn_and_repair_leaves_an_operators_limit(prefect_server, example_app):
    from flows.doctor import prefect_checks
    from flows.limits import create_missing_limit

    asyncio.run(create_missing_limit(BUILDKIT_LIMIT, 10))
    asyncio.run(prefect_checks.create_work_pool(POOL))
    assert asyncio.run(create_missing_limit(BUILDKIT_LIMIT, 3)) is False
    assert asyncio.run(_limit()).limit == 10
    asyncio.run(_set(active=False, paused=True))
    try:
        found = doctor(example_app)
        assert (found["prefect.concurrency-limit"].status, found["prefect.concurrency-limit"].fix) == (
            "warn", "prefect gcl enable buildkit")
        assert (found["prefect.work-pool"].status, found["prefect.work-pool"].fix) == (
            "warn", "prefect work-pool resume buildkit-pipeline")
    finally:
        asyncio.run(_set(active=True, paused=False))
