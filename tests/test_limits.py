"""Build slots and release locks (`flows.limits.held_slot`) against the session's real Prefect server."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from prefect.client.orchestration import PrefectClient, get_client

from flows import limits
from flows.limits import ensure_limit, held_slot


async def active_slots(name: str) -> int:
    async with get_client() as prefect:
        return (await prefect.read_global_concurrency_limit_by_name(name)).active_slots


def test_a_slot_is_held_inside_the_block_and_released_after_it(prefect_server):
    async def scenario():
        await ensure_limit("test-held", 2)
        async with held_slot("test-held", lease_seconds=60):
            inside = await active_slots("test-held")
        return inside, await active_slots("test-held")

    assert asyncio.run(scenario()) == (1, 0)


def test_a_second_holder_waits_until_the_first_releases_the_only_slot(prefect_server):
    events: list[tuple[str, str, float]] = []

    async def hold(who: str, seconds: float) -> None:
        async with held_slot("test-one-at-a-time", lease_seconds=60):
            events.append((who, "in", time.monotonic()))
            await asyncio.sleep(seconds)
            events.append((who, "out", time.monotonic()))

    async def scenario():
        await ensure_limit("test-one-at-a-time", 1)
        first = asyncio.create_task(hold("first", 1.0))
        while not events:
            await asyncio.sleep(0.01)
        await asyncio.gather(first, hold("second", 0))

    asyncio.run(scenario())
    assert [(who, what) for who, what, _ in events] == [("first", "in"), ("first", "out"),
                                                        ("second", "in"), ("second", "out")]


def test_the_slot_is_released_when_the_block_fails_or_is_cancelled(prefect_server):
    async def fail():
        async with held_slot("test-released", lease_seconds=60):
            raise RuntimeError("the build failed")

    async def cancelled():
        async with held_slot("test-released", lease_seconds=60):
            await asyncio.sleep(60)

    async def scenario():
        await ensure_limit("test-released", 1)
        with pytest.raises(RuntimeError):
            await fail()
        after_failure = await active_slots("test-released")
        task = asyncio.create_task(cancelled())
        while await active_slots("test-released") == 0:
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return after_failure, await active_slots("test-released")

    assert asyncio.run(scenario()) == (0, 0)


def test_a_name_without_a_limit_holds_nothing_and_does_not_fail(prefect_server):
    async def scenario():
        async with held_slot("test-no-such-limit", lease_seconds=60):
            return "ran"

    assert asyncio.run(scenario()) == "ran"


def test_the_lease_is_renewed_while_held_and_a_lost_lease_is_reported(prefect_server, monkeypatch, caplog):
    """Renewed every 0.3 s here (instead of every 45 s of a 60 s lease): no complaint while the lease is valid;
    once the server no longer has it, the holder says so."""
    monkeypatch.setattr(limits, "RENEW_AFTER", 0.005)
    leases = []
    increment = PrefectClient.increment_concurrency_slots_with_lease

    async def recording_increment(self, *args, **kwargs):
        response = await increment(self, *args, **kwargs)
        leases.append(response.json()["lease_id"])
        return response

    monkeypatch.setattr(PrefectClient, "increment_concurrency_slots_with_lease", recording_increment)

    def complaints() -> list[str]:
        return [r.getMessage() for r in caplog.records if "could not renew" in r.getMessage()]

    async def scenario():
        await ensure_limit("test-renewed", 1)
        async with held_slot("test-renewed", lease_seconds=60):
            await asyncio.sleep(1.0)
            while_valid = complaints()
            async with get_client() as prefect:
                await prefect.release_concurrency_slots_with_lease(leases[0])
            await asyncio.sleep(1.0)
        return while_valid

    with caplog.at_level(logging.WARNING):
        while_valid = asyncio.run(scenario())
    assert while_valid == []
    assert complaints() and "'test-renewed'" in complaints()[0]
