"""PostgreSQL fixtures.

One server per test session: the embedded server in a temporary directory,
or the server of `IMAGEN_TEST_DATABASE_URL` when that is set (its role needs
CREATEDB). The migrations are applied once to a template database; each test
gets its own copy, so tests never see each other's jobs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from imagen.embedded_db import EmbeddedPostgres, prepare_data_dir
from imagen.migrate import migrate

TEMPLATE_DB = "imagen_test_template"


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """URL of the session's PostgreSQL server, pointing at its maintenance database."""
    external = os.environ.get("IMAGEN_TEST_DATABASE_URL")
    if external:
        yield external
        return
    data_dir = server_data_dir("session")
    server = EmbeddedPostgres(data_dir)
    url = server.start()
    yield _with_database(url, "postgres")
    server.stop("immediate")
    shutil.rmtree(data_dir, ignore_errors=True)


def server_data_dir(label: str) -> Path:
    """A data directory outside pytest's temporary root.

    Every pytest session resets its temporary root to mode 0700, which would
    lock the server's system user out of a data directory inside it.
    """
    data_dir = Path(tempfile.mkdtemp(prefix=f"imagen-test-pg-{label}-"))
    prepare_data_dir(data_dir)
    return data_dir


@pytest.fixture(scope="session")
async def template_url(pg_server_url) -> str:
    admin = await asyncpg.connect(pg_server_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    finally:
        await admin.close()
    url = _with_database(pg_server_url, TEMPLATE_DB)
    await migrate(url)
    return url


async def create_database_from_template(server_url: str) -> str:
    name = f"imagen_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
    finally:
        await admin.close()
    return _with_database(server_url, name)


async def drop_database(server_url: str, dsn: str) -> None:
    name = urlsplit(dsn).path.lstrip("/")
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def dsn(pg_server_url, template_url) -> AsyncIterator[str]:
    """A fresh, migrated database for one test."""
    url = await create_database_from_template(pg_server_url)
    yield url
    await drop_database(pg_server_url, url)


@pytest.fixture
async def db(dsn) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection to the test's database."""
    connection = await asyncpg.connect(dsn)
    yield connection
    await connection.close()


async def insert_job(connection: asyncpg.Connection, prompt: str = "a red fox in snow", **columns) -> str:
    """Insert one job with plain SQL and return its id."""
    columns = {"prompt": prompt, "backend": "mock", "width": 64, "height": 64, **columns}
    names = ", ".join(columns)
    placeholders = ", ".join(f"${index}" for index in range(1, len(columns) + 1))
    job_id = await connection.fetchval(
        f"INSERT INTO imagen.jobs ({names}) VALUES ({placeholders}) RETURNING id", *columns.values()
    )
    return str(job_id)


async def wait_for_status(connection: asyncpg.Connection, job_id: str, statuses=("done", "failed", "cancelled"),
                          timeout_s: float = 30.0) -> asyncpg.Record:
    """Poll the job row until its status is one of `statuses`; fail the test after `timeout_s`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        row = await connection.fetchrow("SELECT * FROM imagen.jobs WHERE id = $1", uuid.UUID(job_id))
        if row is not None and row["status"] in statuses:
            return row
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"job {job_id} still {row['status'] if row else 'missing'} after {timeout_s} s")
        await asyncio.sleep(0.02)


async def wait_until(condition: Callable[[], object], timeout_s: float = 30.0, what: str = "condition") -> None:
    """Await `condition()` (sync or async) until it is truthy."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached after {timeout_s} s")
        await asyncio.sleep(0.02)
