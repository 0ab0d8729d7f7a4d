"""Slot leases across a restart of the Prefect server: the one test that starts (and restarts) a server of its own.

The session's server cannot be restarted, so this test runs `prefect server start` on SQLite with a PREFECT_HOME
and database of its own, which the restarts keep.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows import limits
from flows.limits import LeaseLost, SlotTimeout, ensure_limit, held_slot
from tests.conftest import run_logs

PREFECT = Path(sys.executable).with_name("prefect")
# prefect/server/concurrency/lease_storage/filesystem.py (Prefect 3.9.1): leases kept under PREFECT_HOME
FILESYSTEM_LEASES = "prefect.server.concurrency.lease_storage.filesystem"


class OwnServer:
    """`prefect server start` on 127.0.0.1, its database and home kept across `restart()`."""

    def __init__(self, home: Path):
        self.home = home
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.process: subprocess.Popen | None = None

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(self.home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{self.home / 'prefect.db'}", **extra)
        return env

    def start(self, lease_storage: str | None = None) -> None:
        extra = {"PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": lease_storage} if lease_storage else {}
        log = open(self.home / "server.log", "ab")
        self.process = subprocess.Popen(
            [str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(self.port), "--no-services",
             "--no-ui"], env=self.env(**extra), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.home / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError("the Prefect server did not start in 180 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def restart(self, lease_storage: str | None = None) -> None:
        self.stop()
        self.start(lease_storage)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(PREFECT), *args], env=self.env(PREFECT_API_URL=self.url), capture_output=True,
                              text=True, timeout=60)


@pytest.fixture
def own_server(tmp_path):
    server = OwnServer(tmp_path)
    try:
        server.start()
        with temporary_settings({PREFECT_API_URL: server.url}):
            yield server
    finally:
        server.stop()


async def active_slots(name: str) -> int:
    async with get_client() as prefect:
        return (await prefect.read_global_concurrency_limit_by_name(name)).active_slots


def test_a_server_restart_loses_the_lease_the_holder_says_so_and_the_next_run_is_told_what_to_do(
        own_server, monkeypatch):
    """A run holds a release lock; the server restarts with in-memory lease storage.

    The holder's renewal is answered 410: it reports the lost lock in its run log and refuses to start the
    work the lock guards. The count stays taken in the database, so the next acquisition times out, naming
    the run on record as the holder, then (once that run let go) the leaked slot and the command that frees
    it, which works. With filesystem lease storage the next restart keeps the lease.
    """
    # renewed every 3 s of a 10 min lease: the lease outlasts even a slow restart, so the holder meets the 410
    monkeypatch.setattr(limits, "RENEW_AFTER", 0.005)
    lock = "helm-release-apps-web"
    held, let_go = asyncio.Event(), asyncio.Event()
    slots = []

    @flow(name="holds-the-release-lock")
    async def holder() -> str:
        async with held_slot(lock, lease_seconds=600, when_lost="Not starting helm") as slot:
            slots.append(slot)
            held.set()
            await let_go.wait()
            slot.ensure_held()
            return "helm ran"

    async def acquire(timeout: float) -> str:
        async with held_slot(lock, lease_seconds=60, timeout=timeout):
            return "acquired"

    async def until_lost(slot) -> None:
        while slot.lost is None:
            await asyncio.sleep(0.1)

    async def scenario():
        await ensure_limit(lock, 1)
        run = asyncio.create_task(holder(return_state=True))
        await asyncio.wait_for(held.wait(), 30)
        taken_before = await active_slots(lock)

        await asyncio.to_thread(own_server.restart, FILESYSTEM_LEASES)
        taken_after_restart = await active_slots(lock)
        with pytest.raises(SlotTimeout) as while_held:
            await asyncio.wait_for(acquire(timeout=2), 30)
        await asyncio.wait_for(until_lost(slots[0]), 40)

        let_go.set()
        state = await asyncio.wait_for(run, 30)
        with pytest.raises(SlotTimeout) as after_holder:
            await asyncio.wait_for(acquire(timeout=1), 30)
        return taken_before, taken_after_restart, while_held.value, state, after_holder.value

    taken_before, taken_after_restart, while_held, state, after_holder = asyncio.run(scenario())

    assert (taken_before, taken_after_restart) == (1, 1)
    assert state.is_failed()
    with pytest.raises(LeaseLost, match="lost the slot of the global concurrency limit 'helm-release-apps-web'"):
        state.result()
    # the run's log records go through Prefect's log worker in batches: run_logs sends what is queued first
    log = "\n".join(run_logs(state.state_details.flow_run_id))
    assert "answered HTTP 410 to renewing its lease" in log and "Not starting helm" in log, log

    assert "1 of 1 taken, by flow run" in str(while_held)
    assert str(state.state_details.flow_run_id) in str(while_held)
    assert "1 of them held by no run on record" in str(after_holder)
    assert f"prefect gcl update {lock} --active-slots 0" in str(after_holder)

    freed = own_server.cli("gcl", "update", lock, "--active-slots", "0")
    assert freed.returncode == 0, freed.stdout + freed.stderr

    async def durable():
        """The server now keeps leases in files under its PREFECT_HOME: a restart keeps the lease."""
        assert await active_slots(lock) == 0
        async with held_slot(lock, lease_seconds=600, timeout=5) as slot:
            await asyncio.to_thread(own_server.restart, FILESYSTEM_LEASES)
            await asyncio.sleep(7.0)  # two renewals
            assert slot.lost is None
            assert await active_slots(lock) == 1
        return await active_slots(lock)

    assert asyncio.run(durable()) == 0
