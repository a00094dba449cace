"""The SQL contract: migrations, constraints, the NOTIFY trigger and row level security."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
import pytest

from imagen.migrate import load_migrations, migrate
from tests.db_fixtures import insert_job

OWNER_A = str(uuid.uuid4())
OWNER_B = str(uuid.uuid4())


async def _schema_snapshot(connection: asyncpg.Connection) -> list:
    return [tuple(row) for row in await connection.fetch(
        "SELECT table_name, column_name, data_type, column_default FROM information_schema.columns "
        "WHERE table_schema = 'imagen' ORDER BY table_name, column_name")]


async def test_migrate_second_run_changes_nothing(dsn, db):
    before = await _schema_snapshot(db)
    applied = await migrate(dsn)
    after = await _schema_snapshot(db)
    assert applied == []
    assert before == after
    recorded = await db.fetchval("SELECT count(*) FROM imagen.schema_migrations")
    assert recorded == len(load_migrations())


async def test_migrate_empty_database(pg_server_url):
    from tests.db_fixtures import _with_database

    name = f"imagen_empty_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_server_url)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        url = _with_database(pg_server_url, name)
        applied = await migrate(url)
        assert applied == [m.version for m in load_migrations()]
        assert await migrate(url) == []
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


async def test_migrate_rejects_edited_migration(dsn, db, tmp_path):
    for migration in load_migrations():
        (tmp_path / f"{migration.version}_{migration.name}.sql").write_text(migration.sql + "\n-- edited\n")
    (tmp_path / "compat").mkdir()
    from imagen.migrate import migrations_dir

    (tmp_path / "compat" / "supabase_compat.sql").write_text(
        (migrations_dir() / "compat" / "supabase_compat.sql").read_text())
    from imagen.errors import MigrationError

    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(dsn, tmp_path)


async def test_job_defaults(db):
    job_id = await db.fetchval("INSERT INTO imagen.jobs (prompt) VALUES ('a cat') RETURNING id")
    row = await db.fetchrow("SELECT * FROM imagen.jobs WHERE id = $1", job_id)
    assert row["status"] == "pending"
    assert row["backend"] == "flux-schnell-local"
    assert (row["width"], row["height"]) == (1024, 1024)
    assert row["seed"] is None
    assert row["attempt"] == 0


@pytest.mark.parametrize(
    ("columns", "constraint"),
    [
        ({"width": 1000}, "jobs_width_multiple_of_16_from_64_to_2048"),
        ({"width": 32}, "jobs_width_multiple_of_16_from_64_to_2048"),
        ({"height": 4096}, "jobs_height_multiple_of_16_from_64_to_2048"),
        ({"prompt": ""}, "jobs_prompt_length_from_1_to_2000"),
        ({"prompt": "   \n\t"}, "jobs_prompt_not_blank"),
        ({"prompt": "x" * 2001}, "jobs_prompt_length_from_1_to_2000"),
        ({"status": "paused"}, "jobs_status_is_known"),
        ({"steps": 0}, "jobs_steps_from_1_to_100"),
        ({"guidance": float("nan")}, "jobs_guidance_from_0_to_30"),
        ({"seed": -1}, "jobs_seed_not_negative"),
        ({"max_attempts": 0}, "jobs_max_attempts_from_1_to_10"),
        ({"backend": "Flux Local"}, "jobs_backend_name_is_lowercase_slug"),
        ({"status": "done"}, "jobs_done_has_image"),
        ({"status": "running"}, "jobs_running_has_lease"),
    ],
)
async def test_jobs_check_constraint_names_rule(db, columns, constraint):
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await insert_job(db, **columns)
    assert caught.value.constraint_name == constraint


async def test_insert_trigger_sends_only_job_id(dsn, db):
    listener = await asyncpg.connect(dsn)
    received: asyncio.Queue = asyncio.Queue()
    await listener.add_listener("imagen_jobs", lambda *args: received.put_nowait(args[3]))
    try:
        job_id = await insert_job(db, prompt="a secret prompt")
        payload = await asyncio.wait_for(received.get(), timeout=5)
        assert payload == job_id
    finally:
        await listener.close()


async def _as_owner(connection: asyncpg.Connection, owner: str) -> None:
    await connection.execute("SET ROLE authenticated")
    await connection.execute("SELECT set_config('request.jwt.claims', $1, false)",
                             json.dumps({"sub": owner, "role": "authenticated"}))


@pytest.fixture
async def owner_a(dsn):
    connection = await asyncpg.connect(dsn)
    await _as_owner(connection, OWNER_A)
    yield connection
    await connection.close()


async def test_rls_owner_inserts_own_job_with_default_owner(owner_a, db):
    job_id = await owner_a.fetchval("INSERT INTO imagen.jobs (prompt) VALUES ('mine') RETURNING id")
    assert str(await db.fetchval("SELECT owner_user_id FROM imagen.jobs WHERE id = $1", job_id)) == OWNER_A


async def test_rls_owner_cannot_read_other_owners_rows(owner_a, db):
    theirs = await insert_job(db, owner_user_id=uuid.UUID(OWNER_B))
    await insert_job(db, owner_user_id=uuid.UUID(OWNER_A))
    await db.execute(
        "INSERT INTO imagen.images (owner_user_id, job_id, prompt, backend, model, width, height, seed, steps, "
        "storage_bucket, storage_key, byte_size) VALUES ($1, $2, 'p', 'mock', 'm', 64, 64, 1, 1, 'b', 'k', 10)",
        uuid.UUID(OWNER_B), uuid.UUID(theirs))
    visible = await owner_a.fetch("SELECT owner_user_id FROM imagen.jobs")
    assert [str(row["owner_user_id"]) for row in visible] == [OWNER_A]
    assert await owner_a.fetchval("SELECT count(*) FROM imagen.images") == 0


async def test_rls_owner_cannot_insert_for_other_owner(owner_a):
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await owner_a.execute("INSERT INTO imagen.jobs (prompt, owner_user_id) VALUES ('x', $1)", uuid.UUID(OWNER_B))


@pytest.mark.parametrize("column", ["status", "error", "image_id", "lease_owner", "attempt"])
async def test_rls_owner_cannot_insert_worker_columns(owner_a, column):
    value = {"status": "'done'", "error": "'x'", "image_id": "gen_random_uuid()", "lease_owner": "'me'",
             "attempt": "5"}[column]
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await owner_a.execute(f"INSERT INTO imagen.jobs (prompt, {column}) VALUES ('x', {value})")


async def test_rls_owner_cannot_set_status_done_or_error(owner_a):
    job_id = await owner_a.fetchval("INSERT INTO imagen.jobs (prompt) VALUES ('mine') RETURNING id")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await owner_a.execute("UPDATE imagen.jobs SET error = 'x' WHERE id = $1", job_id)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await owner_a.execute("UPDATE imagen.jobs SET status = 'done' WHERE id = $1", job_id)


async def test_rls_owner_can_cancel_own_pending_job(owner_a, db):
    mine = await owner_a.fetchval("INSERT INTO imagen.jobs (prompt) VALUES ('mine') RETURNING id")
    theirs = await insert_job(db, owner_user_id=uuid.UUID(OWNER_B))
    assert await owner_a.execute("UPDATE imagen.jobs SET status = 'cancelled' WHERE id = $1", mine) == "UPDATE 1"
    assert await owner_a.execute("UPDATE imagen.jobs SET status = 'cancelled' WHERE id = $1",
                                 uuid.UUID(theirs)) == "UPDATE 0"
    row = await db.fetchrow("SELECT status, finished_at FROM imagen.jobs WHERE id = $1", mine)
    assert row["status"] == "cancelled"
    assert row["finished_at"] is not None


async def test_rls_owner_cannot_cancel_finished_job(owner_a, db):
    job_id = await owner_a.fetchval("INSERT INTO imagen.jobs (prompt) VALUES ('mine') RETURNING id")
    await db.execute("UPDATE imagen.jobs SET status = 'failed', error = 'x' WHERE id = $1", job_id)
    assert await owner_a.execute("UPDATE imagen.jobs SET status = 'cancelled' WHERE id = $1", job_id) == "UPDATE 0"


async def test_anon_cannot_read_jobs(dsn, db):
    await insert_job(db)
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute("SET ROLE anon")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await connection.fetch("SELECT * FROM imagen.jobs")
    finally:
        await connection.close()


@pytest.mark.parametrize("prompt", ["\u200b", " \u00a0\u3000", "\ufeff\u2060", "\t\r\n"])
async def test_jobs_reject_invisible_prompt(db, prompt):
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await insert_job(db, prompt=prompt)
    assert caught.value.constraint_name == "jobs_prompt_not_blank"


@pytest.mark.parametrize(
    ("columns", "constraint"),
    [
        ({"attempt": 6, "max_attempts": 3}, "jobs_attempt_within_max_attempts"),
        ({"status": "running", "lease_owner": "x", "lease_expires_at": "infinity"}, "jobs_lease_expires_at_finite"),
        ({"run_after": "infinity"}, "jobs_run_after_finite"),
    ],
)
async def test_jobs_reject_worker_values_that_strand_jobs(db, columns, constraint):
    placeholders = []
    params = []
    for value in columns.values():
        if value == "infinity":
            placeholders.append("'infinity'::timestamptz")
        else:
            params.append(value)
            placeholders.append(f"${len(params) + 1}")
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await db.execute(
            f"INSERT INTO imagen.jobs (prompt, {', '.join(columns)}) VALUES ($1, {', '.join(placeholders)})",
            "x", *params)
    assert caught.value.constraint_name == constraint


async def test_migration_publishes_jobs_to_supabase_realtime(pg_server_url):
    from tests.db_fixtures import _with_database

    name = f"imagen_realtime_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_server_url)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        url = _with_database(pg_server_url, name)
        connection = await asyncpg.connect(url)
        try:
            # As on Supabase, the publication exists before imagen's migrations run.
            await connection.execute("CREATE PUBLICATION supabase_realtime")
            await migrate(url)
            published = await connection.fetchval(
                "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'supabase_realtime' "
                "AND schemaname = 'imagen' AND tablename = 'jobs'")
            assert published == 1
        finally:
            await connection.close()
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()
