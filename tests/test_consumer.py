"""The consumer against a real PostgreSQL server, with in-process backends."""

from __future__ import annotations

import asyncio
import io
import logging
import uuid

import asyncpg
from PIL import Image

from consumer.backends import BackendOutput, BackendSpec, JobContext
from consumer.backends.mock import MockBackend
from imagen.errors import BackendError, InvalidJobError
from serve_app.requests import GenerationRequest
from tests.db_fixtures import insert_job, wait_for_status, wait_until


class ScriptedBackend:
    """A backend whose behaviour per call comes from a list: an exception to raise, a delay, or success."""

    def __init__(self, name: str, script: list, *, spec_overrides: dict | None = None) -> None:
        self.spec = BackendSpec(name=name, kind="mock", model=f"{name}-model", default_steps=1,
                                **(spec_overrides or {}))
        self.script = list(script)
        self.calls = 0
        self.started = asyncio.Event()
        self._mock = MockBackend()

    async def generate(self, request: GenerationRequest, context: JobContext) -> BackendOutput:
        self.calls += 1
        self.started.set()
        action = self.script.pop(0) if self.script else None
        if isinstance(action, Exception):
            raise action
        if isinstance(action, (int, float)):
            await asyncio.sleep(action)
        output = await self._mock.generate(request, context)
        return output

    async def close(self) -> None:
        return None


async def test_job_inserted_with_sql_ends_done_with_png(start_consumer, db, tmp_path):
    consumer = await start_consumer()
    job_id = await insert_job(db, prompt="a red fox in snow", width=96, height=64, seed=42)

    row = await wait_for_status(db, job_id)

    assert row["status"] == "done", row["error"]
    assert row["image_id"] is not None
    assert row["finished_at"] is not None
    image = await db.fetchrow("SELECT * FROM imagen.images WHERE id = $1", row["image_id"])
    assert str(image["job_id"]) == job_id
    assert (image["width"], image["height"], image["seed"]) == (96, 64, 42)
    assert image["storage_key"].endswith("/a-red-fox-in-snow-42.png")
    path = consumer.store.path_for(image["storage_key"])
    with Image.open(io.BytesIO(path.read_bytes())) as png:
        assert png.size == (96, 64)
    assert path.stat().st_size == image["byte_size"]
    usage = await db.fetchrow("SELECT * FROM imagen.usage WHERE job_id = $1", uuid.UUID(job_id))
    assert usage["backend"] == "mock"
    assert usage["wall_s"] > 0


async def test_claim_picks_seed_and_stores_it(start_consumer, db):
    await start_consumer()
    job_id = await insert_job(db)
    row = await wait_for_status(db, job_id)
    assert row["seed"] is not None
    image_seed = await db.fetchval("SELECT seed FROM imagen.images WHERE id = $1", row["image_id"])
    assert image_seed == row["seed"]


async def test_failed_job_records_error_and_next_job_succeeds(start_consumer, db):
    broken = ScriptedBackend("broken", [BackendError("the model rejected the prompt", transient=False)])
    await start_consumer(extra_backends={"broken": broken})

    failing = await insert_job(db, backend="broken")
    failed = await wait_for_status(db, failing)
    good = await insert_job(db)
    done = await wait_for_status(db, good)

    assert failed["status"] == "failed"
    assert "the model rejected the prompt" in failed["error"]
    assert "attempt 1 of 3" in failed["error"]
    assert failed["image_id"] is None
    assert done["status"] == "done"


async def test_unknown_backend_fails_with_known_list(start_consumer, db):
    await start_consumer()
    job_id = await insert_job(db, backend="flux-ultra")
    row = await wait_for_status(db, job_id)
    assert row["status"] == "failed"
    assert "flux-ultra" in row["error"]
    assert "mock" in row["error"]
    assert row["attempt"] == 1


async def test_backend_limit_fails_before_generation(start_consumer, db):
    small = ScriptedBackend("small", [], spec_overrides={"max_size": 512})
    await start_consumer(extra_backends={"small": small})
    job_id = await insert_job(db, backend="small", width=1024)
    row = await wait_for_status(db, job_id)
    assert row["status"] == "failed"
    assert "width 1024" in row["error"]
    assert "512" in row["error"]
    assert small.calls == 0


async def test_transient_error_retries_then_succeeds(start_consumer, db):
    flaky = ScriptedBackend("flaky", [BackendError("503 from upstream", transient=True)])
    await start_consumer(extra_backends={"flaky": flaky})
    job_id = await insert_job(db, backend="flaky")
    row = await wait_for_status(db, job_id)
    assert row["status"] == "done"
    assert row["attempt"] == 2
    assert flaky.calls == 2
    # The last error of a retried job stays visible.
    assert "503 from upstream" in row["error"]
    assert await db.fetchval("SELECT count(*) FROM imagen.images WHERE job_id = $1", uuid.UUID(job_id)) == 1


async def test_transient_errors_fail_after_max_attempts(start_consumer, db):
    error = BackendError("connection reset", transient=True)
    flaky = ScriptedBackend("flaky", [error, error, error])
    await start_consumer(extra_backends={"flaky": flaky})
    job_id = await insert_job(db, backend="flaky", max_attempts=2)
    row = await wait_for_status(db, job_id)
    assert row["status"] == "failed"
    assert "attempt 2 of 2" in row["error"]
    assert "connection reset" in row["error"]
    assert flaky.calls == 2


async def test_permanent_error_fails_at_once(start_consumer, db):
    picky = ScriptedBackend("picky", [InvalidJobError("prompt rejected by the safety checker")])
    await start_consumer(extra_backends={"picky": picky})
    job_id = await insert_job(db, backend="picky", max_attempts=5)
    row = await wait_for_status(db, job_id)
    assert row["status"] == "failed"
    assert row["attempt"] == 1
    assert picky.calls == 1


async def test_backend_timeout_is_retried(start_consumer, db):
    slow = ScriptedBackend("slow", [30.0])
    await start_consumer(extra_backends={"slow": slow}, backend_timeout_s=0.3)
    job_id = await insert_job(db, backend="slow")
    row = await wait_for_status(db, job_id)
    assert row["status"] == "done"
    assert row["attempt"] == 2
    assert "timed out after 0.3 s" in row["error"]


async def test_claim_is_exclusive_across_consumers(start_consumer, db):
    consumers = [await start_consumer(concurrency=4) for _ in range(3)]
    await db.execute(
        "INSERT INTO imagen.jobs (prompt, backend, width, height) "
        "SELECT 'job ' || n, 'mock', 64, 64 FROM generate_series(1, 200) AS n")

    await wait_until(lambda: db.fetchval("SELECT count(*) = 200 FROM imagen.jobs WHERE status = 'done'"),
                     timeout_s=60, what="200 jobs done")

    assert await db.fetchval("SELECT max(attempt) FROM imagen.jobs") == 1
    assert await db.fetchval("SELECT count(*) FROM imagen.images") == 200
    assert await db.fetchval("SELECT count(DISTINCT storage_key) FROM imagen.images") == 200
    assert sum(consumer.claimed_total for consumer in consumers) == 200
    files = list(consumers[0].store.root.rglob("*.png"))
    assert len(files) == 200


async def test_backlog_present_at_start_is_drained(start_consumer, db):
    await db.execute(
        "INSERT INTO imagen.jobs (prompt, backend, width, height) "
        "SELECT 'backlog ' || n, 'mock', 64, 64 FROM generate_series(1, 30) AS n")
    await start_consumer(poll_interval_s=60.0, concurrency=2)
    await wait_until(lambda: db.fetchval("SELECT count(*) = 30 FROM imagen.jobs WHERE status = 'done'"),
                     timeout_s=30, what="backlog drained")


async def test_notify_wakes_consumer_without_poll(start_consumer, db):
    consumer = await start_consumer(poll_interval_s=3600.0)
    assert consumer.listener.listen_works is True
    job_id = await insert_job(db)
    # Far below the hour-long poll: only the NOTIFY can have woken the consumer.
    row = await wait_for_status(db, job_id, timeout_s=5.0)
    assert row["status"] == "done"


async def test_fairness_interleaves_owners(start_consumer, db):
    owner_a, owner_b = uuid.uuid4(), uuid.uuid4()
    await db.execute(
        "INSERT INTO imagen.jobs (prompt, backend, width, height, owner_user_id, created_at) "
        "SELECT 'burst ' || n, 'mock', 64, 64, $1, now() - interval '1 hour' + n * interval '1 ms' "
        "FROM generate_series(1, 300) AS n", owner_a)
    single = await insert_job(db, owner_user_id=owner_b)
    await start_consumer(concurrency=1)

    row = await wait_for_status(db, single, timeout_s=30)

    earlier = await db.fetchval(
        "SELECT count(*) FROM imagen.jobs WHERE owner_user_id = $1 AND started_at < $2", owner_a, row["started_at"])
    # The single job of owner B is claimed right after owner A's oldest job, not after all 300.
    assert earlier <= 1
    order = await db.fetch(
        "SELECT prompt FROM imagen.jobs WHERE owner_user_id = $1 AND started_at IS NOT NULL "
        "ORDER BY started_at, attempt LIMIT 5", owner_a)
    assert [r["prompt"] for r in order] == [f"burst {n}" for n in range(1, len(order) + 1)]


async def test_cancelled_pending_job_is_never_claimed(start_consumer, db):
    job_id = await insert_job(db)
    await db.execute("UPDATE imagen.jobs SET status = 'cancelled' WHERE id = $1", uuid.UUID(job_id))
    consumer = await start_consumer()
    follower = await insert_job(db)
    await wait_for_status(db, follower)
    row = await db.fetchrow("SELECT * FROM imagen.jobs WHERE id = $1", uuid.UUID(job_id))
    assert row["status"] == "cancelled"
    assert row["attempt"] == 0
    assert consumer.claimed_total == 1


async def test_cancel_running_job_stops_it_and_writes_nothing(start_consumer, db):
    slow = ScriptedBackend("slow", [30.0])
    consumer = await start_consumer(extra_backends={"slow": slow}, lease_s=30.0)
    job_id = await insert_job(db, backend="slow")
    await asyncio.wait_for(slow.started.wait(), timeout=10)

    await db.execute("UPDATE imagen.jobs SET status = 'cancelled' WHERE id = $1", uuid.UUID(job_id))

    # The cancel notification stops the job long before its 30 s run or lease renewal.
    await wait_until(lambda: consumer.in_flight == 0, timeout_s=5, what="job task stopped")
    row = await db.fetchrow("SELECT * FROM imagen.jobs WHERE id = $1", uuid.UUID(job_id))
    assert row["status"] == "cancelled"
    assert row["image_id"] is None
    assert await db.fetchval("SELECT count(*) FROM imagen.images") == 0
    assert list(consumer.store.root.rglob("*.png")) == []


async def test_result_after_lease_taken_over_is_discarded(start_consumer, db):
    slow = ScriptedBackend("slow", [1.0])
    consumer = await start_consumer(extra_backends={"slow": slow}, lease_s=30.0)
    job_id = await insert_job(db, backend="slow")
    await asyncio.wait_for(slow.started.wait(), timeout=10)

    # Another consumer takes the job over, as a rescue after an expired lease would.
    await db.execute("UPDATE imagen.jobs SET lease_owner = 'other-consumer', attempt = attempt + 1 WHERE id = $1",
                     uuid.UUID(job_id))

    await wait_until(lambda: consumer.in_flight == 0, timeout_s=10, what="stale attempt finished")
    row = await db.fetchrow("SELECT * FROM imagen.jobs WHERE id = $1", uuid.UUID(job_id))
    assert row["status"] == "running"
    assert row["lease_owner"] == "other-consumer"
    assert await db.fetchval("SELECT count(*) FROM imagen.images") == 0
    assert list(consumer.store.root.rglob("*.png")) == []


async def test_stray_notifications_are_ignored(start_consumer, db, dsn):
    consumer = await start_consumer(poll_interval_s=3600.0)
    for payload in ["", "garbage", "' OR 1=1 --", str(uuid.uuid4()), "x" * 7000]:
        await db.execute("SELECT pg_notify('imagen_jobs', $1)", payload)
        await db.execute("SELECT pg_notify('imagen_job_cancels', $1)", payload)
    job_id = await insert_job(db)
    row = await wait_for_status(db, job_id, timeout_s=5.0)
    assert row["status"] == "done"
    assert consumer.listener.connected.is_set()


async def test_listener_reconnects_after_backend_terminated(start_consumer, db):
    consumer = await start_consumer(poll_interval_s=3600.0)
    reconnects_before = consumer.listener.reconnects
    terminated = await db.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE 'imagen-listener-%'")
    assert terminated == 1

    await wait_until(lambda: consumer.listener.reconnects > reconnects_before, timeout_s=10,
                     what="listener reconnected")
    job_id = await insert_job(db)
    row = await wait_for_status(db, job_id, timeout_s=5.0)
    assert row["status"] == "done"


async def test_jobs_inserted_while_listener_down_are_picked_up(start_consumer, db):
    consumer = await start_consumer(poll_interval_s=3600.0, listener_check_interval_s=0.2)
    await db.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE 'imagen-listener-%'")
    # Inserted while no connection listens, so only the scan after reconnecting finds them.
    job_ids = [await insert_job(db, prompt=f"missed {n}") for n in range(5)]
    for job_id in job_ids:
        row = await wait_for_status(db, job_id, timeout_s=15.0)
        assert row["status"] == "done"
    assert consumer.listener.reconnects >= 2


async def test_listen_probe_failure_falls_back_to_poll(start_consumer, db, monkeypatch, caplog):
    from consumer.listener import Listener

    # Drop every notification, as a transaction-mode pooler does.
    monkeypatch.setattr(Listener, "_handle", lambda *args: None)
    caplog.set_level(logging.ERROR)
    consumer = await start_consumer(poll_interval_s=0.3)
    assert consumer.listener.listen_works is False
    assert any(getattr(record, "event", None) == "listen_unavailable" for record in caplog.records)
    assert any("IMAGEN_WORKER_DATABASE_URL" in record.getMessage() for record in caplog.records)
    job_id = await insert_job(db)
    row = await wait_for_status(db, job_id, timeout_s=10.0)
    assert row["status"] == "done"


async def test_expired_lease_is_rescued_by_another_consumer(start_consumer, db):
    job_id = await insert_job(db)
    # A consumer claimed the job and died: its lease ran out a minute ago.
    await db.execute(
        "UPDATE imagen.jobs SET status = 'running', attempt = 1, seed = 7, lease_owner = 'dead-consumer', "
        "lease_expires_at = now() - interval '1 minute', started_at = now() WHERE id = $1", uuid.UUID(job_id))
    await start_consumer(lease_s=3.0)
    row = await wait_for_status(db, job_id, statuses=("done", "failed"), timeout_s=15.0)
    assert row["status"] == "done"
    assert row["attempt"] == 2
    assert "dead-consumer" in row["error"]
    assert row["seed"] == 7


async def test_expired_lease_on_last_attempt_fails_job(start_consumer, db):
    job_id = await insert_job(db, max_attempts=2)
    await db.execute(
        "UPDATE imagen.jobs SET status = 'running', attempt = 2, lease_owner = 'dead-consumer', "
        "lease_expires_at = now() - interval '1 minute' WHERE id = $1", uuid.UUID(job_id))
    await start_consumer(lease_s=3.0)
    row = await wait_for_status(db, job_id, statuses=("failed",), timeout_s=15.0)
    assert "failed after 2 attempts" in row["error"]
    assert "lost" in row["error"]


async def test_stop_hands_unfinished_jobs_back(start_consumer, db):
    slow = ScriptedBackend("slow", [30.0, 30.0])
    consumer = await start_consumer(extra_backends={"slow": slow}, lease_s=30.0)
    job_id = await insert_job(db, backend="slow")
    await asyncio.wait_for(slow.started.wait(), timeout=10)

    await consumer.stop(grace_s=0.2)

    row = await db.fetchrow("SELECT * FROM imagen.jobs WHERE id = $1", uuid.UUID(job_id))
    assert row["status"] == "pending"
    assert row["attempt"] == 0
    assert row["lease_owner"] is None


async def test_stop_waits_for_jobs_within_grace(start_consumer, db):
    slow = ScriptedBackend("slow", [0.5])
    consumer = await start_consumer(extra_backends={"slow": slow})
    job_id = await insert_job(db, backend="slow")
    await asyncio.wait_for(slow.started.wait(), timeout=10)

    await consumer.stop(grace_s=10.0)

    row = await db.fetchrow("SELECT * FROM imagen.jobs WHERE id = $1", uuid.UUID(job_id))
    assert row["status"] == "done"


async def test_progress_is_written_to_job_row(start_consumer, db):
    await start_consumer(mock_step_s=0.05, progress_interval_s=0.0)
    job_id = await insert_job(db, steps=6)
    seen: set[int] = set()

    async def progressed() -> bool:
        row = await db.fetchrow("SELECT status, progress_step, progress_total FROM imagen.jobs WHERE id = $1",
                                uuid.UUID(job_id))
        if row["progress_step"] is not None:
            seen.add(row["progress_step"])
            assert row["progress_total"] == 6
        return row["status"] == "done"

    await wait_until(progressed, timeout_s=10, what="job done")
    assert len(seen) >= 2
    assert await db.fetchval("SELECT progress_step FROM imagen.jobs WHERE id = $1", uuid.UUID(job_id)) == 6


async def test_same_prompt_and_seed_get_distinct_objects(start_consumer, db):
    consumer = await start_consumer()
    first = await insert_job(db, prompt="twin", seed=5)
    second = await insert_job(db, prompt="twin", seed=5)
    rows = [await wait_for_status(db, job_id) for job_id in (first, second)]
    keys = await db.fetch("SELECT storage_key FROM imagen.images ORDER BY created_at")
    assert all(row["status"] == "done" for row in rows)
    assert len({row["storage_key"] for row in keys}) == 2
    assert all(consumer.store.path_for(row["storage_key"]).exists() for row in keys)


async def test_database_rejects_nul_in_prompt(db):
    try:
        await insert_job(db, prompt="bad\x00prompt")
    except (asyncpg.PostgresError, asyncpg.DataError, ValueError, UnicodeError):
        return
    raise AssertionError("a prompt with a NUL byte was accepted")


async def test_local_store_recreates_removed_folder(tmp_path):
    import shutil

    from consumer.storage import LocalStore
    from imagen.errors import StorageError

    store = LocalStore(tmp_path / "images")
    await store.put("2026-01-01/a-1.png", b"\x89PNG first", "image/png")
    shutil.rmtree(tmp_path / "images" / "2026-01-01")

    try:
        await store.put("2026-01-01/a-2.png", b"\x89PNG second", "image/png")
    except StorageError as exc:
        assert exc.transient
    # A retry of the write succeeds once the cached folder was dropped.
    await store.put("2026-01-01/a-2.png", b"\x89PNG second", "image/png")
    assert (tmp_path / "images" / "2026-01-01" / "a-2.png").read_bytes() == b"\x89PNG second"


async def test_local_store_rejects_escaping_key(tmp_path):
    import pytest

    from consumer.storage import LocalStore
    from imagen.errors import StorageError

    store = LocalStore(tmp_path / "images")
    with pytest.raises(StorageError, match="must stay inside"):
        await store.put("../outside.png", b"x", "image/png")


async def test_local_store_file_readable_by_others(tmp_path):
    import stat

    from consumer.storage import LocalStore

    store = LocalStore(tmp_path / "images")
    await store.put("2026-01-01/a-1.png", b"\x89PNG data", "image/png")
    mode = (tmp_path / "images" / "2026-01-01" / "a-1.png").stat().st_mode
    assert mode & stat.S_IROTH
    assert not mode & stat.S_IWOTH
