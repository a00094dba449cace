"""Consumers as real processes: kill -9, SIGTERM, many consumers, and a database restart."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from imagen.embedded_db import EmbeddedPostgres
from imagen.migrate import migrate
from tests.db_fixtures import insert_job, server_data_dir, wait_for_status, wait_until

pytestmark = pytest.mark.slow


def _consumer_env(dsn: str, tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {
        **os.environ,
        "IMAGEN_WORKER_DATABASE_URL": dsn,
        "IMAGEN_DATA_DIR": str(tmp_path),
        "IMAGEN_OUTPUT_DIR": str(tmp_path / "images"),
        "IMAGEN_LEASE_S": "3",
        "IMAGEN_POLL_INTERVAL_S": "0.5",
        "IMAGEN_RETRY_BASE_DELAY_S": "0.05",
        "IMAGEN_RETRY_MAX_DELAY_S": "0.2",
        "IMAGEN_LISTENER_CHECK_INTERVAL_S": "0.5",
        "IMAGEN_SHUTDOWN_GRACE_S": "5",
        "IMAGEN_LOG_LEVEL": "INFO",
    }
    env.update(overrides)
    return env


def _start_consumer_process(dsn: str, tmp_path: Path, log_name: str, **overrides: str) -> subprocess.Popen:
    log = open(tmp_path / f"{log_name}.log", "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "imagen.cli", "consume", "--no-serve"],
        env=_consumer_env(dsn, tmp_path, **overrides), stdout=log, stderr=subprocess.STDOUT,
    )


async def _running_attempt(db: asyncpg.Connection, job_id: str, attempt: int) -> bool:
    row = await db.fetchrow("SELECT status, attempt FROM imagen.jobs WHERE id = $1", uuid.UUID(job_id))
    return row["status"] == "running" and row["attempt"] == attempt


def _kill(process: subprocess.Popen, signum: int = signal.SIGKILL) -> int:
    process.send_signal(signum)
    return process.wait(timeout=30)


async def test_killed_consumer_job_finished_by_another(dsn, db, tmp_path, start_consumer):
    job_id = await insert_job(db, steps=60)
    crashing = _start_consumer_process(dsn, tmp_path, "crashing", IMAGEN_MOCK_STEP_S="0.5")
    try:
        await wait_until(lambda: _running_attempt(db, job_id, 1), timeout_s=30, what="job running in the process")
    finally:
        _kill(crashing)

    await start_consumer(lease_s=3.0)
    row = await wait_for_status(db, job_id, timeout_s=30)

    assert row["status"] == "done"
    assert row["attempt"] == 2
    assert "lost" in row["error"]
    assert await db.fetchval("SELECT count(*) FROM imagen.images WHERE job_id = $1", uuid.UUID(job_id)) == 1


async def test_repeated_crashes_end_failed_after_max_attempts(dsn, db, tmp_path):
    job_id = await insert_job(db, steps=60, max_attempts=2)
    for attempt in (1, 2):
        process = _start_consumer_process(dsn, tmp_path, f"crash-{attempt}", IMAGEN_MOCK_STEP_S="0.5")
        try:
            await wait_until(lambda attempt=attempt: _running_attempt(db, job_id, attempt), timeout_s=30,
                             what=f"attempt {attempt} running")
        finally:
            _kill(process)

    survivor = _start_consumer_process(dsn, tmp_path, "survivor", IMAGEN_MOCK_STEP_S="0.5")
    try:
        row = await wait_for_status(db, job_id, statuses=("failed", "done"), timeout_s=30)
    finally:
        _kill(survivor, signal.SIGTERM)

    assert row["status"] == "failed"
    assert row["attempt"] == 2
    assert "failed after 2 attempts" in row["error"]
    assert await db.fetchval("SELECT count(*) FROM imagen.images") == 0


async def test_sigterm_during_batch_hands_jobs_back(dsn, db, tmp_path, start_consumer):
    job_ids = [await insert_job(db, prompt=f"slow {n}", steps=60) for n in range(4)]
    process = _start_consumer_process(dsn, tmp_path, "terminated", IMAGEN_MOCK_STEP_S="0.5",
                                      IMAGEN_CONCURRENCY="4", IMAGEN_SHUTDOWN_GRACE_S="0.5")
    await wait_until(lambda: db.fetchval("SELECT count(*) = 4 FROM imagen.jobs WHERE status = 'running'"),
                     timeout_s=30, what="four jobs running")

    exit_code = _kill(process, signal.SIGTERM)

    assert exit_code == 0
    rows = await db.fetch("SELECT status, attempt, lease_owner FROM imagen.jobs")
    assert {row["status"] for row in rows} == {"pending"}
    assert {row["attempt"] for row in rows} == {0}
    assert {row["lease_owner"] for row in rows} == {None}

    await start_consumer(concurrency=4)
    for job_id in job_ids:
        row = await wait_for_status(db, job_id, timeout_s=30)
        assert row["status"] == "done"


async def test_many_consumer_processes_run_each_job_once(dsn, db, tmp_path):
    processes = [_start_consumer_process(dsn, tmp_path, f"many-{n}", IMAGEN_CONCURRENCY="8") for n in range(3)]
    try:
        await db.execute(
            "INSERT INTO imagen.jobs (prompt, backend, width, height) "
            "SELECT 'many ' || n, 'mock', 64, 64 FROM generate_series(1, 300) AS n")
        await wait_until(lambda: db.fetchval("SELECT count(*) = 300 FROM imagen.jobs WHERE status = 'done'"),
                         timeout_s=90, what="300 jobs done")
    finally:
        for process in processes:
            _kill(process, signal.SIGTERM)

    assert await db.fetchval("SELECT max(attempt) FROM imagen.jobs") == 1
    assert await db.fetchval("SELECT count(*) FROM imagen.images") == 300
    assert await db.fetchval("SELECT count(DISTINCT lease_owner) FROM imagen.jobs") >= 2
    assert len(list((tmp_path / "images").rglob("*.png"))) == 300


@pytest.fixture
async def own_server():
    """A PostgreSQL server for this test alone, so restarting it disturbs no other test."""
    data_dir = server_data_dir("restart")
    server = EmbeddedPostgres(data_dir)
    url = server.start()
    await migrate(url)
    yield server, url
    server.stop("immediate")
    shutil.rmtree(data_dir, ignore_errors=True)


async def _insert_with_retry(dsn: str, prompt: str) -> str:
    for _ in range(200):
        try:
            connection = await asyncpg.connect(dsn, timeout=2)
            try:
                return await insert_job(connection, prompt=prompt)
            finally:
                await connection.close()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError):
            await asyncio.sleep(0.05)
    raise AssertionError("the database never came back")


async def test_database_restart_and_terminated_listener_lose_no_job(own_server, start_consumer, tmp_path):
    server, dsn = own_server
    from consumer.backends import build_backends
    from consumer.storage import LocalStore
    from consumer.worker import Consumer
    from tests.consumer_fixtures import fast_settings

    settings = fast_settings(tmp_path, poll_interval_s=0.5)
    consumer = Consumer(settings, dsn, build_backends(settings), LocalStore(settings.local_output_dir))
    await consumer.start()
    job_ids: list[str] = []
    try:
        for n in range(60):
            job_ids.append(await _insert_with_retry(dsn, f"stream {n}"))
            if n == 20:
                admin = await asyncpg.connect(dsn)
                await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE application_name LIKE 'imagen-listener-%'")
                await admin.close()
            if n == 40:
                await asyncio.to_thread(server.restart)
            await asyncio.sleep(0.02)

        db = await asyncpg.connect(dsn)
        try:
            for job_id in job_ids:
                row = await wait_for_status(db, job_id, timeout_s=60)
                assert row["status"] == "done", row["error"]
            assert await db.fetchval("SELECT count(*) FROM imagen.images") == 60

            # Pickup by notification works again after the restart: the poll is an hour away now.
            await wait_until(lambda: consumer.listener.connected.is_set(), timeout_s=30, what="listener back")
            consumer.settings = consumer.settings.replace(poll_interval_s=3600.0)
            for n in range(3):
                job_id = await insert_job(db, prompt=f"after restart {n}")
                row = await wait_for_status(db, job_id, timeout_s=10)
                assert row["status"] == "done"
                # A poll tick comes every 0.5 s at best; a NOTIFY-driven claim comes within milliseconds.
                assert (row["started_at"] - row["created_at"]).total_seconds() < 0.25
        finally:
            await db.close()
    finally:
        await consumer.stop(grace_s=1.0)


async def test_embedded_server_keeps_port_across_restarts(own_server):
    server, url = own_server
    port = server.port
    server.stop("fast")
    assert server.start() == url
    assert server.port == port
    assert server.started is True
    # A second start of a running server starts nothing.
    server.start()
    assert server.started is False


async def test_outage_longer_than_lease_does_not_fail_job(own_server, tmp_path, caplog):
    import logging

    from consumer.backends import BackendRegistry, build_backends
    from consumer.storage import LocalStore
    from consumer.worker import Consumer
    from tests.consumer_fixtures import fast_settings
    from tests.test_consumer import ScriptedBackend

    server, dsn = own_server
    caplog.set_level(logging.WARNING)
    slow = ScriptedBackend("slow", [1.0])
    settings = fast_settings(tmp_path, lease_s=3.0)
    registry = build_backends(settings)
    consumer = Consumer(settings, dsn, BackendRegistry({"mock": registry.get("mock"), "slow": slow}),
                        LocalStore(settings.local_output_dir))
    await consumer.start()
    try:
        connection = await asyncpg.connect(dsn)
        job_id = await insert_job(connection, backend="slow")
        await connection.close()
        await asyncio.wait_for(slow.started.wait(), timeout=10)

        # The database goes away while the job generates and stays away longer than a lease.
        await asyncio.to_thread(server.stop, "fast")
        await wait_until(lambda: any(getattr(r, "event", None) == "job_abandoned" for r in caplog.records),
                         timeout_s=30, what="job left to the lease rescue")
        await asyncio.to_thread(server.start)

        connection = await asyncpg.connect(dsn)
        try:
            row = await wait_for_status(connection, job_id, timeout_s=60)
        finally:
            await connection.close()
    finally:
        await consumer.stop(grace_s=1.0)
    assert row["status"] == "done", row["error"]
    assert row["attempt"] == 2
