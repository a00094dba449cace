"""Start and stop the whole service: database, Ray, the deployment and the consumers.

`Service` is what `imagen up` and `imagen demo` run. With no database URL it
starts the embedded PostgreSQL of the data directory and applies the
migrations; with one it uses that server as it is unless asked to migrate.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagen.errors import SettingsError
from imagen.settings import Settings

logger = logging.getLogger(__name__)


def resolve_database_url(settings: Settings) -> tuple[str, bool]:
    """Return the database URL to use and whether this call started the embedded server for it."""
    if settings.database_url:
        return settings.database_url, False
    from imagen.embedded_db import ensure_embedded_database

    return ensure_embedded_database(settings.data_dir)


@dataclass
class Service:
    """The running parts of one `imagen up`."""

    settings: Settings
    dsn: str = ""
    # True when this service started the embedded server, and so stops it.
    started_database: bool = False
    consumers: list[Any] = field(default_factory=list)
    deployment: Any = None
    health_file: Path | None = None

    async def start(self, *, migrate: bool = False, serve: bool = True, progress=None) -> None:
        """Start everything, calling `progress(text)` before each slow step."""
        say = progress or (lambda _text: None)

        say("starting the database")
        self.dsn, self.started_database = await asyncio.to_thread(resolve_database_url, self.settings)
        # Checked before Ray and the model start, which take far longer than a failed connection.
        await check_database(self.dsn, require_schema=False)
        if migrate or not self.settings.database_url:
            from imagen.migrate import migrate as apply_migrations

            applied = await apply_migrations(self.dsn)
            logger.info("migrations applied", extra={"event": "migrations_applied", "count": len(applied)})
        await check_database(self.dsn, require_schema=True)

        from imagen import cluster

        say("starting Ray")
        await asyncio.to_thread(cluster.start_ray, self.settings, dashboard=True)
        if serve:
            say(f"loading model {self.settings.model} on the deployment")
            self.deployment = await asyncio.to_thread(cluster.deploy, self.settings)

        say("starting consumers")
        self.consumers = [self._new_consumer(index) for index in range(self.settings.consumers)]
        statuses = await asyncio.gather(*(actor.start.remote() for actor in self.consumers))
        for status in statuses:
            logger.info("consumer ready", extra={"event": "consumer_ready", **status})
        self.write_health(statuses)

    def _new_consumer(self, index: int):
        from consumer.actor import ConsumerActor
        from imagen import cluster
        from imagen.logs import current_format
        from imagen.telemetry import otel_env_vars

        return ConsumerActor.options(
            name=f"imagen-consumer-{index}", namespace=cluster.NAMESPACE,
            runtime_env={"env_vars": otel_env_vars()},
        ).remote(self.settings, self.dsn, current_format())

    async def consumer_statuses(self) -> list[dict[str, Any]]:
        """Ask every consumer for its status; a consumer that died is replaced and reported not ready."""
        results = await asyncio.gather(*(actor.status.remote() for actor in self.consumers), return_exceptions=True)
        statuses = []
        for index, result in enumerate(results):
            if isinstance(result, Exception):
                logger.warning("consumer %d died, starting a replacement: %s", index, result,
                               extra={"event": "consumer_replaced", "consumer_index": index})
                # Its leases expire and any consumer rescues its jobs; the replacement starts claiming at once.
                self.consumers[index] = self._new_consumer(index)
                try:
                    result = await self.consumers[index].start.remote()
                except Exception as exc:  # noqa: BLE001 - retried at the next health check
                    logger.warning("replacement consumer failed to start: %s", exc,
                                   extra={"event": "consumer_replace_failed", "consumer_index": index})
                    result = {"started": False}
            statuses.append(result)
        return statuses

    def write_health(self, statuses: list[dict[str, Any]]) -> None:
        """Record readiness for the container's HEALTHCHECK (`imagen health`)."""
        path = self.health_file or (self.settings.data_dir / "health.json")
        ready = bool(statuses) and all(status.get("started") and status.get("listening") for status in statuses)
        payload = {"time": time.time(), "deployment_ready": self.deployment is not None,
                   "consumers_ready": ready, "consumers": statuses}
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(".tmp")
        temp.write_text(json.dumps(payload))
        temp.replace(path)

    async def watch_health(self, stop: asyncio.Event, interval_s: float = 5.0) -> None:
        """Refresh the health file until `stop` is set."""
        while not stop.is_set():
            try:
                self.write_health(await self.consumer_statuses())
            except Exception as exc:  # noqa: BLE001 - a failed check makes the service unhealthy, not crash
                logger.warning("health check failed: %s", exc, extra={"event": "health_check_failed"})
                self.write_health([])
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
            except asyncio.TimeoutError:
                pass

    async def stop(self) -> None:
        """Stop consumers gracefully, then the deployment, Ray and the embedded database."""
        logger.info("service stopping", extra={"event": "service_stopping"})
        if self.consumers:
            results = await asyncio.gather(
                *(actor.stop.remote(self.settings.shutdown_grace_s) for actor in self.consumers),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, Exception):
                    logger.warning("consumer did not stop cleanly: %s", result,
                                   extra={"event": "consumer_stop_failed"})
        (self.health_file or (self.settings.data_dir / "health.json")).unlink(missing_ok=True)

        from imagen import cluster

        await asyncio.to_thread(cluster.shutdown)
        if self.started_database:
            from imagen.embedded_db import EmbeddedPostgres

            await asyncio.to_thread(EmbeddedPostgres(self.settings.data_dir).stop)
        logger.info("service stopped", extra={"event": "service_stopped"})


async def check_database(dsn: str, *, require_schema: bool, timeout_s: float = 10.0) -> None:
    """Raise DatabaseError, naming the setting to fix, when the database cannot be reached or is not migrated."""
    import asyncpg

    from imagen.errors import DatabaseError

    try:
        connection = await asyncpg.connect(dsn, timeout=timeout_s)
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseError(
            f"cannot connect to the database ({type(exc).__name__}: {exc}): check IMAGEN_WORKER_DATABASE_URL "
            "and that the server is running"
        ) from None
    try:
        migrated = await connection.fetchval("SELECT to_regclass('imagen.jobs') IS NOT NULL")
    finally:
        await connection.close()
    if require_schema and not migrated:
        raise DatabaseError("the database has no imagen.jobs table: run `imagen migrate` or pass --migrate")


def check_health(settings: Settings, max_age_s: float = 30.0) -> tuple[bool, str]:
    """Read the health file; return whether the service is ready and the reason."""
    path = settings.data_dir / "health.json"
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        return False, f"{path} is missing: the service has not finished starting"
    except ValueError as exc:
        raise SettingsError(f"{path} is not valid JSON: {exc}") from exc
    age_s = time.time() - payload.get("time", 0)
    if age_s > max_age_s:
        return False, f"health was last written {age_s:.0f} s ago: the service is stuck or stopped"
    if not payload.get("deployment_ready"):
        return False, "the deployment has not loaded and warmed the model yet"
    if not payload.get("consumers_ready"):
        return False, "a consumer is not started or not listening"
    return True, "ready"
