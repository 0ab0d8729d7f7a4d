"""Prefect servers for the benchmarks: `prefect server start` on 127.0.0.1, on SQLite or on PostgreSQL.

A production Prefect server keeps its state in PostgreSQL (the prefect-server
helm chart installs one). On SQLite, a concurrency-slot request whose read and
update straddle another write fails with `database is locked`, and the client
retries it 2 s later; the benchmarks measure the flow on both.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        sys.exit("PostgreSQL is not installed: run scripts/install-postgres.sh (Debian's postgresql package)")
    return Path(found[-1]).parent


@contextmanager
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1; yields Prefect's connection URL for it.

    PostgreSQL refuses to run as root, so under root it runs as the `postgres`
    user, in a folder of its own. Commits are not flushed to disk one by one
    (`synchronous_commit=off`), like Prefect's SQLite in WAL mode with
    `synchronous=NORMAL`.
    """
    bindir, port = _postgres_bin(), free_port()
    root = Path(tempfile.mkdtemp(prefix="buildkit-pipeline-postgres-"))
    data = root / "data"
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_owner:
        shutil.chown(root, "postgres")
    try:
        subprocess.run([*as_owner, bindir / "initdb", "-D", data, "-U", "prefect", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True)
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c synchronous_commit=off"
        subprocess.run([*as_owner, bindir / "pg_ctl", "-D", data, "-l", root / "postgres.log", "-w", "-o", options,
                        "start"], check=True, capture_output=True)
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_owner, bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def sqlite(workdir: Path) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{workdir / 'prefect.db'}"


@contextmanager
def prefect_server(database_url: str, workdir: Path, startup_timeout: float = 180) -> Iterator[str]:
    """`prefect server start` with this database, its own PREFECT_HOME and no UI; yields the API URL once healthy."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(workdir / "prefect-home"), "PREFECT_SERVER_UI_ENABLED": "false",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url}
    api = f"http://127.0.0.1:{port}/api"
    with (workdir / "prefect-server.log").open("w") as log:
        server = subprocess.Popen([Path(sys.executable).parent / "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + startup_timeout
        while not _healthy(api):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Prefect server did not start; see {workdir / 'prefect-server.log'}")
            time.sleep(0.5)
        yield api
    finally:
        server.terminate()
        server.wait(30)


def _healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
