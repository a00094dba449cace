"""Every database call of the consumer, over one asyncpg pool.

The statements live in queries.sql; this module runs them and maps rows to
Python objects. Connection failures become `DatabaseError`s that the caller
retries: the database going away for a while is expected, not fatal.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from consumer.queries import query
from imagen.errors import DatabaseError

logger = logging.getLogger(__name__)

# Errors after which the same statement may succeed on a fresh connection.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    # Raised when a connection was left mid-operation by a cancelled call.
    asyncpg.InternalClientError,
    OSError,
    asyncio.TimeoutError,
)

STATEMENT_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class ClaimedJob:
    """A job this consumer holds: its row as claimed, plus the attempt it claimed."""

    id: str
    owner_user_id: str | None
    prompt: str
    style: str | None
    backend: str
    width: int
    height: int
    steps: int | None
    guidance: float | None
    seed: int
    attempt: int
    max_attempts: int
    prediction_id: str | None
    traceparent: str | None
    tracestate: str | None
    created_at: datetime
    queued_s: float

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> ClaimedJob:
        values = dict(row)
        values["id"] = str(values["id"])
        if values["owner_user_id"] is not None:
            values["owner_user_id"] = str(values["owner_user_id"])
        return cls(**values)


@dataclass(frozen=True)
class ImageRecord:
    """Fields of the images and usage rows of a finished job."""

    prompt: str
    backend: str
    model: str
    width: int
    height: int
    seed: int
    steps: int
    guidance: float | None
    storage_bucket: str
    storage_key: str
    byte_size: int
    wall_s: float
    gpu_s: float | None
    predict_time_s: float | None
    estimated_cost_usd: float | None
    prediction_id: str | None
    batch_size: int | None = None
    content_type: str = "image/png"


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Skip asyncpg's reset of a released connection (RESET ALL, UNLISTEN *, ...).

    The pool's connections never change session state: no SET, LISTEN,
    advisory lock or cursor outlives a statement, and an open transaction is
    rolled back by asyncpg before release. Skipping the reset saves a round
    trip per statement.
    """
    return None


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """Open a pool of connections; raises DatabaseError with the cause when the server is unreachable."""
    try:
        return await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            command_timeout=STATEMENT_TIMEOUT_S,
            server_settings={"application_name": "imagen-consumer"},
            reset=_keep_session,
        )
    except CONNECTION_ERRORS as exc:
        raise DatabaseError(f"cannot connect to the database: {type(exc).__name__}: {exc}") from exc


class JobRepository:
    """The queue's statements, bound to one consumer id."""

    def __init__(self, pool: asyncpg.Pool, consumer_id: str) -> None:
        self.pool = pool
        self.consumer_id = consumer_id

    async def claim(self, limit: int, lease_s: float) -> list[ClaimedJob]:
        rows = await self._fetch("claim_jobs", self.consumer_id, limit, lease_s)
        return [ClaimedJob.from_row(row) for row in rows]

    async def renew_leases(self, held: list[tuple[str, int]], lease_s: float) -> set[str]:
        """Extend the leases of `held` (id, attempt) pairs; returns the ids still held."""
        if not held:
            return set()
        ids = [job_id for job_id, _ in held]
        attempts = [attempt for _, attempt in held]
        rows = await self._fetch("renew_leases", self.consumer_id, ids, attempts, lease_s)
        return {str(row["id"]) for row in rows}

    async def rescue_expired(self, base_delay_s: float, max_delay_s: float) -> list[asyncpg.Record]:
        return await self._fetch("rescue_expired_leases", base_delay_s, max_delay_s)

    @asynccontextmanager
    async def completing(self, job: ClaimedJob, record: ImageRecord, fallback_owner: str | None
                         ) -> AsyncIterator[str | None]:
        """Record job `job` as done inside a transaction that commits when the block exits.

        Yields the new image id, or None when this consumer has lost the job's
        lease (nothing is written then). The block stores the object, and an
        exception inside it rolls everything back.
        """
        try:
            async with self.pool.acquire() as connection, connection.transaction():
                image_id = await connection.fetchval(
                    query("complete_job"),
                    job.id, self.consumer_id, job.attempt, fallback_owner,
                    record.prompt, record.backend, record.model, record.width, record.height, record.seed,
                    record.steps, record.guidance, record.storage_bucket, record.storage_key,
                    record.content_type, record.byte_size, record.wall_s, record.gpu_s, record.predict_time_s,
                    record.estimated_cost_usd, record.prediction_id, record.batch_size, record.steps,
                )
                yield None if image_id is None else str(image_id)
        except CONNECTION_ERRORS as exc:
            raise DatabaseError(f"completing job {job.id} failed: {type(exc).__name__}: {exc}") from exc

    async def fail(self, job: ClaimedJob, error: str) -> bool:
        return await self._fetchval("fail_job", job.id, self.consumer_id, job.attempt, error) is not None

    async def retry(self, job: ClaimedJob, error: str, delay_s: float) -> bool:
        return await self._fetchval("retry_job", job.id, self.consumer_id, job.attempt, error, delay_s) is not None

    async def release(self, job_ids: list[str]) -> list[str]:
        if not job_ids:
            return []
        rows = await self._fetch("release_jobs", self.consumer_id, job_ids)
        return [str(row["id"]) for row in rows]

    async def save_prediction_id(self, job: ClaimedJob, prediction_id: str) -> bool:
        return await self._fetchval("save_prediction_id", job.id, self.consumer_id, job.attempt,
                                    prediction_id) is not None

    async def update_progress(self, job: ClaimedJob, step: int, total: int) -> None:
        await self._execute("update_progress", job.id, self.consumer_id, job.attempt, step, total)

    async def job_state(self, job_id: str) -> asyncpg.Record | None:
        rows = await self._fetch("job_state", job_id)
        return rows[0] if rows else None

    async def queue_depth(self) -> asyncpg.Record:
        rows = await self._fetch("queue_depth")
        return rows[0]

    async def _fetch(self, name: str, *args: Any) -> list[asyncpg.Record]:
        try:
            return await self.pool.fetch(query(name), *args)
        except CONNECTION_ERRORS as exc:
            raise DatabaseError(f"query {name} failed: {type(exc).__name__}: {exc}") from exc

    async def _fetchval(self, name: str, *args: Any) -> Any:
        try:
            return await self.pool.fetchval(query(name), *args)
        except CONNECTION_ERRORS as exc:
            raise DatabaseError(f"query {name} failed: {type(exc).__name__}: {exc}") from exc

    async def _execute(self, name: str, *args: Any) -> None:
        try:
            await self.pool.execute(query(name), *args)
        except CONNECTION_ERRORS as exc:
            raise DatabaseError(f"query {name} failed: {type(exc).__name__}: {exc}") from exc
