"""Prefect server objects the flow relies on: global concurrency limits, and the previous run's artifacts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.exceptions import MissingContextError, ObjectAlreadyExists, ObjectNotFound
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

RENEW_AFTER = 0.75  # of the lease, as Prefect's own holders renew


_ENSURED: set[str] = set()


async def ensure_limit(name: str, limit: int) -> None:
    """Create a global concurrency limit unless it exists; an operator's own setting is left as it is.

    `prefect.concurrency` does not limit anything for a name that has no limit,
    so the flow makes sure the ones it depends on exist, once per process (a
    worker runs every flow run in a process of its own).
    """
    if name in _ENSURED:
        return
    async with get_client() as prefect:
        try:
            await prefect.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                await prefect.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
    _ENSURED.add(name)


async def previous_table(key: str) -> list[dict] | None:
    """The rows of the latest table artifact with this key (the previous run's), if any."""
    async with get_client() as prefect:
        artifacts = await prefect.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), limit=1
        )
    if not artifacts or not artifacts[0].data:
        return None
    data = artifacts[0].data
    return json.loads(data) if isinstance(data, str) else data


@contextlib.asynccontextmanager
async def held_slot(name: str, lease_seconds: float) -> AsyncIterator[None]:
    """Hold one slot of a global concurrency limit, under a lease renewed on this event loop until the block ends.

    The same server calls as `prefect.concurrency.asyncio.concurrency`, made on the
    flow run's own API client. Prefect's context manager queues every acquisition
    of a name through one service thread, and gives every holder a thread with a
    new HTTP client (and TLS context) that renews its lease: in a three-component
    run that was about 1 s of CPU, and the third build slot came 0.6 to 1 s after
    the run started. A name with no limit holds nothing, as in Prefect. A lease
    left by a process that died expires after `lease_seconds`.
    """
    async with get_client() as prefect:
        lease = await _acquire(prefect, name, lease_seconds)
        if lease is None:
            yield
            return
        renewing = asyncio.create_task(_keep_renewed(prefect, name, lease, lease_seconds))
        try:
            yield
        finally:
            renewing.cancel()
            await asyncio.shield(prefect.release_concurrency_slots_with_lease(lease))


async def _acquire(prefect: PrefectClient, name: str, lease_seconds: float) -> UUID | None:
    holder = ConcurrencyLeaseHolder(type="flow_run", id=flow_run.id) if flow_run.id else None
    while True:
        try:
            response = await prefect.increment_concurrency_slots_with_lease(
                names=[name], slots=1, mode="concurrency", lease_duration=lease_seconds, holder=holder)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 423:
                raise
            await asyncio.sleep(float(exc.response.headers.get("Retry-After", 1)) * random.uniform(1, 1.2))
            continue
        granted = response.json()
        return UUID(granted["lease_id"]) if granted.get("limits") else None


async def _keep_renewed(prefect: PrefectClient, name: str, lease: UUID, lease_seconds: float) -> None:
    delay = lease_seconds * RENEW_AFTER
    while True:
        await asyncio.sleep(delay)
        try:
            await prefect.renew_concurrency_lease(lease, lease_duration=lease_seconds)
            delay = lease_seconds * RENEW_AFTER
        except httpx.HTTPError as exc:
            delay = min(10.0, lease_seconds * (1 - RENEW_AFTER) / 3)
            _logger().warning("could not renew the lease on a slot of %r (%s); trying again in %.0f s",
                              name, exc, delay)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)
