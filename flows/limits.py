"""Prefect server objects the flow relies on: global concurrency limits, and the previous run's artifacts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, VariableCreate
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.exceptions import MissingContextError, ObjectAlreadyExists, ObjectNotFound
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

RENEW_AFTER = 0.75  # of the lease, as Prefect's own holders renew
# prefect/server/api/concurrency_limits_v2.py (3.9.1) `renew_concurrency_lease` answers 410 for a lease it does not
# have (expired, revoked, or lost with in-memory lease storage on restart); a 404 says the same of the lease's path
LEASE_GONE = (404, 410)
HOLDER_PREFIX = "slot-holder-"
HOLDER_TAG = "buildkit-pipeline/slot-holder"


_ENSURED: set[str] = set()


async def ensure_limit(name: str, limit: int) -> None:
    """Create a global concurrency limit unless it exists; an operator's own setting is left as it is.

    `prefect.concurrency` does not limit anything for a name that has no limit,
    so the flow makes sure the ones it depends on exist, once per process (a
    worker runs every flow run in a process of its own).
    """
    if name in _ENSURED:
        return
    await create_missing_limit(name, limit)
    _ENSURED.add(name)


async def create_missing_limit(name: str, limit: int) -> bool:
    """Create the global concurrency limit `name` unless it exists (then it is left as it is); whether it did."""
    async with get_client() as prefect:
        try:
            await prefect.read_global_concurrency_limit_by_name(name)
            return False
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                await prefect.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
                return True
    return False


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


@dataclass
class Slot:
    """One held slot; `lost` says why the server no longer counts it, once it does not."""

    name: str
    lease: UUID | None
    lost: str | None = None

    def ensure_held(self) -> None:
        """Raise `LeaseLost` if the lease is gone: for work that must not start without the slot."""
        if self.lost:
            raise LeaseLost(self.lost)


class LeaseLost(RuntimeError):
    """The server no longer knows the lease on a slot this run thought it held."""


class SlotTimeout(TimeoutError):
    """No slot came free in time; the message names who holds them and what to do."""


@contextlib.asynccontextmanager
async def held_slot(name: str, lease_seconds: float, *, timeout: float | None = None,
                    when_lost: str = "") -> AsyncIterator[Slot]:
    """Hold one slot of a global concurrency limit, under a lease renewed on this event loop until the block ends.

    The same server calls as `prefect.concurrency.asyncio.concurrency`, made on the
    flow run's own API client. Prefect's context manager queues every acquisition
    of a name through one service thread, and gives every holder a thread with a
    new HTTP client (and TLS context) that renews its lease: in a three-component
    run that was about 1 s of CPU, and the third build slot came 0.6 to 1 s after
    the run started. A name with no limit holds nothing, as in Prefect. A lease
    left by a process that died expires after `lease_seconds`.

    Waiting longer than `timeout` raises `SlotTimeout` naming the holders. A
    lease the server no longer has (404/410 on renewal, or no renewal got
    through before it expired) is logged as an error with `when_lost`, what
    the holder does about it, and renewal stops; the block goes on, and
    `Slot.ensure_held()` raises `LeaseLost` from then on. The server keeps
    lease holders to itself (no API lists them for a global limit), so each
    holder also keeps a Prefect Variable `slot-holder-<lease>` naming its
    flow run while it holds the slot.
    """
    async with get_client() as prefect:
        lease = await _acquire(prefect, name, lease_seconds, timeout)
        slot = Slot(name, lease)
        if lease is None:
            yield slot
            return
        recorded = asyncio.create_task(_record_holder(prefect, slot))
        renewing = asyncio.create_task(_keep_renewed(prefect, slot, lease_seconds, when_lost))
        try:
            yield slot
        finally:
            renewing.cancel()
            await asyncio.shield(_release(prefect, slot, recorded))


async def _acquire(prefect: PrefectClient, name: str, lease_seconds: float, timeout: float | None) -> UUID | None:
    holder = ConcurrencyLeaseHolder(type="flow_run", id=flow_run.id) if flow_run.id else None
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            response = await prefect.increment_concurrency_slots_with_lease(
                names=[name], slots=1, mode="concurrency", lease_duration=lease_seconds, holder=holder)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 423:
                raise
            wait = float(exc.response.headers.get("Retry-After", 1)) * random.uniform(1, 1.2)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SlotTimeout(await _describe_holders(prefect, name, timeout)) from None
                wait = min(wait, left)
            await asyncio.sleep(wait)
            continue
        granted = response.json()
        return UUID(granted["lease_id"]) if granted.get("limits") else None


async def _keep_renewed(prefect: PrefectClient, slot: Slot, lease_seconds: float, when_lost: str) -> None:
    """Renew at 3/4 of the lease; a transient failure is retried until the lease would have run out."""
    delay = lease_seconds * RENEW_AFTER
    valid_until = time.monotonic() + lease_seconds
    while True:
        await asyncio.sleep(delay)
        asked = time.monotonic()
        try:
            await prefect.renew_concurrency_lease(slot.lease, lease_duration=lease_seconds)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code in LEASE_GONE:
                return _lost(slot, f"the Prefect server answered HTTP {exc.response.status_code} to renewing "
                                   f"its lease {slot.lease}: it no longer has that lease", when_lost)
            problem = f"HTTP {exc.response.status_code}"
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        else:
            valid_until = asked + lease_seconds
            delay = lease_seconds * RENEW_AFTER
            continue
        left = valid_until - time.monotonic()
        if left <= 0:
            return _lost(slot, f"no renewal of its lease {slot.lease} got through before it expired ({problem})",
                         when_lost)
        delay = min(10.0, lease_seconds * RENEW_AFTER, lease_seconds * (1 - RENEW_AFTER) / 3, left)
        run_logger().warning("could not renew the lease on a slot of %r (%s); trying again in %.0f s", slot.name,
                          problem, delay)


def _lost(slot: Slot, why: str, when_lost: str) -> None:
    slot.lost = (f"lost the slot of the global concurrency limit {slot.name!r}: {why}. The limit no longer counts "
                 f"this run, so more holders than it allows may run at once; a Prefect server restart with "
                 f"in-memory lease storage does this and leaves the slot taken for good (README: \"Slot leases "
                 f"and server restarts\")")
    run_logger().error("%s%s", slot.lost, f". {when_lost}" if when_lost else "")


async def _release(prefect: PrefectClient, slot: Slot, recorded: asyncio.Task) -> None:
    async def forget() -> None:
        if await recorded:
            with contextlib.suppress(ObjectNotFound, httpx.HTTPError):
                await prefect.delete_variable_by_name(HOLDER_PREFIX + str(slot.lease))

    # One after the other: sent at once, the two writes contend for a SQLite server's database lock, and the
    # second waited 1.7 to 2 s (measured on every release of a two-component run; 35 ms for both in turn).
    try:
        await prefect.release_concurrency_slots_with_lease(slot.lease)
    finally:
        await forget()


async def _record_holder(prefect: PrefectClient, slot: Slot) -> bool:
    """Keep `slot-holder-<lease>` = {limit, flow run, since} while the slot is held; False if it could not."""
    value = {"limit": slot.name, "flow_run": flow_run.id,
             "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        await prefect.create_variable(VariableCreate(name=HOLDER_PREFIX + str(slot.lease), value=value,
                                                     tags=[HOLDER_TAG]))
        return True
    except (ObjectAlreadyExists, httpx.HTTPError) as exc:
        run_logger().debug("could not record the holder of a slot of %r: %s", slot.name, exc)
        return False


async def _describe_holders(prefect: PrefectClient, name: str, waited: float) -> str:
    """`no slot of 'x' came free in 600 s: 1 of 1 taken, by flow run 'a' (…, Running) since …` and what to do."""
    limit = await prefect.read_global_concurrency_limit_by_name(name)
    response = await prefect.request("POST", "/variables/filter", json={
        "variables": {"name": {"like_": HOLDER_PREFIX}, "tags": {"all_": [HOLDER_TAG]}}, "limit": 200})
    records = {v["name"]: v["value"] for v in response.json()
               if isinstance(v.get("value"), dict) and v["value"].get("limit") == name}
    runs = {}
    ids = [UUID(r["flow_run"]) for r in records.values() if r.get("flow_run")]
    if ids:
        runs = {str(run.id): run for run in await prefect.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))}
    held = []
    for variable, record in records.items():
        run = runs.get(str(record.get("flow_run")))
        if run and run.state and run.state.is_final():
            # left by a process that ended without letting go: its lease has expired (or was lost with the slot)
            with contextlib.suppress(ObjectNotFound, httpx.HTTPError):
                await prefect.delete_variable_by_name(variable)
            continue
        who = (f"flow run {run.name!r} ({run.id}, {run.state_name})" if run
               else f"flow run {record['flow_run']}" if record.get("flow_run") else "a process outside a flow run")
        held.append(f"{who} since {record.get('since')}")
    text = (f"no slot of the global concurrency limit {name!r} came free in {waited:.0f} s: "
            f"{limit.active_slots} of {limit.limit} taken")
    if held:
        text += f", by {'; '.join(held)}. Wait for them, or cancel their flow runs"
    unknown = limit.active_slots - len(held)
    if unknown > 0:
        text += (f". {unknown} of them held by no run on record: most likely leaked by a Prefect server restart "
                 f"with in-memory lease storage (the count is kept in the database, the leases are not); free "
                 f"them with `prefect gcl update {name} --active-slots {len(held)}`")
    return text


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow or task run's logger, so a message reaches the run log; this module's outside a run."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)
