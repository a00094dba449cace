"""Apply the SQL files of `migrations/` once each, in name order.

Files are named `<timestamp>_<name>.sql` as Supabase's migration tooling
expects. Applied versions are recorded in `imagen.schema_migrations` with a
checksum, so an edited migration is reported instead of silently skipped.
Versions Supabase's own tooling recorded in `supabase_migrations` count as
applied too. On a server without Supabase's roles and `auth.uid()`, the
compatibility file `compat/supabase_compat.sql` runs first.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import asyncpg

from imagen.errors import MigrationError

logger = logging.getLogger(__name__)

_FILE_NAME = re.compile(r"^(?P<version>\d{14})_(?P<name>[a-z0-9_]+)\.sql$")

# Serialises concurrent `imagen migrate` runs; the number is arbitrary but fixed.
_ADVISORY_LOCK_ID = 7_241_190_351

_TRACKING_TABLE = """
CREATE SCHEMA IF NOT EXISTS imagen;
CREATE TABLE IF NOT EXISTS imagen.schema_migrations (
    version     text PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
"""


@dataclass(frozen=True)
class Migration:
    """One migration file."""

    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations_dir() -> Path:
    """Return the folder holding the migration files, inside a wheel or a checkout."""
    packaged = resources.files("imagen") / "migrations"
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parent.parent / "migrations"
    if checkout.is_dir():
        return checkout
    raise MigrationError("the migrations folder is missing from this installation: reinstall imagen")


def load_migrations(folder: Path | None = None) -> list[Migration]:
    """Read every `<timestamp>_<name>.sql` file of `folder`, oldest first."""
    folder = folder or migrations_dir()
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(
                f"migration file name {path.name!r} is invalid: use <14-digit timestamp>_<lowercase_name>.sql"
            )
        found.append(Migration(match["version"], match["name"], path.read_text(encoding="utf-8")))
    return found


def compat_sql(folder: Path | None = None) -> str:
    return ((folder or migrations_dir()) / "compat" / "supabase_compat.sql").read_text(encoding="utf-8")


async def needs_compat(connection: asyncpg.Connection) -> bool:
    """True when the server lacks Supabase's roles or auth.uid()."""
    roles = await connection.fetchval(
        "SELECT count(*) FROM pg_roles WHERE rolname IN ('anon', 'authenticated', 'service_role')"
    )
    has_uid = await connection.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'auth' AND p.proname = 'uid')"
    )
    return roles < 3 or not has_uid


async def migrate(dsn: str, folder: Path | None = None) -> list[str]:
    """Apply pending migrations and return the versions applied now."""
    migrations = load_migrations(folder)
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute("SELECT pg_advisory_lock($1)", _ADVISORY_LOCK_ID)
        try:
            return await _apply_pending(connection, migrations, folder)
        finally:
            await connection.execute("SELECT pg_advisory_unlock($1)", _ADVISORY_LOCK_ID)
    finally:
        await connection.close()


async def _apply_pending(connection: asyncpg.Connection, migrations: list[Migration], folder: Path | None) -> list[str]:
    if await needs_compat(connection):
        logger.info("applying Supabase compatibility step", extra={"event": "migrate_compat"})
        async with connection.transaction():
            await connection.execute(compat_sql(folder))

    await connection.execute(_TRACKING_TABLE)
    recorded = {
        row["version"]: row["checksum"]
        for row in await connection.fetch("SELECT version, checksum FROM imagen.schema_migrations")
    }
    applied_by_supabase = await _supabase_versions(connection)

    applied_now = []
    for migration in migrations:
        if migration.version in recorded:
            if recorded[migration.version] != migration.checksum:
                raise MigrationError(
                    f"migration {migration.version}_{migration.name}.sql changed after it was applied: "
                    "restore the original file and add a new migration for the change"
                )
            continue
        await _apply_one(connection, migration, skip_sql=migration.version in applied_by_supabase)
        applied_now.append(migration.version)
    return applied_now


async def _apply_one(connection: asyncpg.Connection, migration: Migration, skip_sql: bool) -> None:
    extra = {"event": "migration_applied", "version": migration.version, "migration": migration.name}
    async with connection.transaction():
        if not skip_sql:
            try:
                await connection.execute(migration.sql)
            except asyncpg.PostgresError as exc:
                raise MigrationError(
                    f"migration {migration.version}_{migration.name}.sql failed: {exc}"
                ) from exc
        await connection.execute(
            "INSERT INTO imagen.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            migration.version,
            migration.name,
            migration.checksum,
        )
    if skip_sql:
        extra["event"] = "migration_recorded"
    logger.info("migration %s_%s %s", migration.version, migration.name,
                "recorded (applied by Supabase)" if skip_sql else "applied", extra=extra)


async def _supabase_versions(connection: asyncpg.Connection) -> set[str]:
    exists = await connection.fetchval("SELECT to_regclass('supabase_migrations.schema_migrations') IS NOT NULL")
    if not exists:
        return set()
    return {row["version"] for row in await connection.fetch("SELECT version FROM supabase_migrations.schema_migrations")}
