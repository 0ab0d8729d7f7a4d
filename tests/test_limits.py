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
    once the server no longer has it (410), the holder says so once, stops renewing, and `ensure_held` refuses."""
    monkeypatch.setattr(limits, "RENEW_AFTER", 0.005)
    renewals = []
    renew = PrefectClient.renew_concurrency_lease

    async def counting_renew(self, *args, **kwargs):
        renewals.append(time.monotonic())
        return await renew(self, *args, **kwargs)

    monkeypatch.setattr(PrefectClient, "renew_concurrency_lease", counting_renew)

    def complaints() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    async def scenario():
        await ensure_limit("test-renewed", 1)
        async with held_slot("test-renewed", lease_seconds=60, when_lost="Stopping here") as slot:
            await asyncio.sleep(1.0)
            while_valid = complaints()
            slot.ensure_held()
            async with get_client() as prefect:
                await prefect.release_concurrency_slots_with_lease(slot.lease)
            await asyncio.sleep(1.0)
            renewed_when_lost = len(renewals)
            await asyncio.sleep(1.0)
            with pytest.raises(limits.LeaseLost):
                slot.ensure_held()
        return while_valid, renewed_when_lost

    with caplog.at_level(logging.WARNING):
        while_valid, renewed_when_lost = asyncio.run(scenario())
    assert while_valid == []
    assert [r.levelname for r in caplog.records if r.levelno >= logging.WARNING] == ["ERROR"]
    assert "lost the slot of the global concurrency limit 'test-renewed'" in complaints()[0]
    assert "answered HTTP 410" in complaints()[0] and complaints()[0].endswith("Stopping here")
    assert len(renewals) == renewed_when_lost


def test_an_acquisition_that_times_out_names_the_holder_and_what_to_do(prefect_server):
    async def scenario():
        await ensure_limit("test-timeout", 1)
        async with held_slot("test-timeout", lease_seconds=60):
            started = time.monotonic()
            with pytest.raises(limits.SlotTimeout) as timed_out:
                async with held_slot("test-timeout", lease_seconds=60, timeout=1.5):
                    pass
            waited = time.monotonic() - started
        return str(timed_out.value), waited, await active_slots("test-timeout")

    message, waited, after = asyncio.run(scenario())
    assert 1.5 <= waited < 5
    assert message.startswith("no slot of the global concurrency limit 'test-timeout' came free in 2 s: 1 of 1 taken, "
                              "by a process outside a flow run since ")
    assert "held by no run on record" not in message
    assert "Wait for them, or cancel their flow runs" in message and "prefect gcl" not in message
    assert after == 0


def test_a_holder_record_left_by_a_run_that_ended_is_not_named_and_is_removed(prefect_server):
    """A process killed while holding a slot leaves its `slot-holder-<lease>` Variable behind (its lease expires)."""
    from prefect import flow
    from prefect.client.schemas.actions import VariableCreate

    @flow(name="ended-holder")
    def ended() -> str:
        return "done"

    run_id = ended(return_state=True).state_details.flow_run_id

    async def scenario():
        await ensure_limit("test-stale", 1)
        async with get_client() as prefect:
            await prefect.create_variable(VariableCreate(
                name=f"{limits.HOLDER_PREFIX}00000000-0000-4000-8000-000000000001", tags=[limits.HOLDER_TAG],
                value={"limit": "test-stale", "flow_run": str(run_id), "since": "2026-01-01T00:00:00+00:00"}))
        async with held_slot("test-stale", lease_seconds=60):
            with pytest.raises(limits.SlotTimeout) as timed_out:
                async with held_slot("test-stale", lease_seconds=60, timeout=1):
                    pass
        async with get_client() as prefect:
            left = await prefect.read_variable_by_name(f"{limits.HOLDER_PREFIX}00000000-0000-4000-8000-000000000001")
        return str(timed_out.value), left

    message, left = asyncio.run(scenario())
    assert "1 of 1 taken, by a process outside a flow run since " in message
    assert str(run_id) not in message and "held by no run on record" not in message
    assert left is None
