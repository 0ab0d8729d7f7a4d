"""Prefect server objects the flow relies on: global concurrency limits, and the previous run's artifacts."""

from __future__ import annotations

import contextlib
import json

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound


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
