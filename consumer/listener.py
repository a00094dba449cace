"""The LISTEN connection: wakes the consumer when a job is inserted or cancelled.

asyncpg delivers notifications on one dedicated connection, which can die
without a sound: a server restart, `pg_terminate_backend`, or a half-open TCP
socket. The listener therefore pings its connection every
`check_interval_s` with a timeout, reconnects with jittered backoff when the
ping fails, LISTENs again and wakes the consumer so it scans for jobs whose
notifications were lost meanwhile. It never gives up: the consumer keeps
working from its poll while the database is away.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Callable

import asyncpg

from consumer.repository import CONNECTION_ERRORS

logger = logging.getLogger(__name__)

JOBS_CHANNEL = "imagen_jobs"
CANCELS_CHANNEL = "imagen_job_cancels"
PROBE_PREFIX = "probe:"
PROBE_TIMEOUT_S = 3.0
CONNECT_TIMEOUT_S = 10.0


class Listener:
    """Keep a LISTEN connection alive and turn notifications into callbacks.

    `on_job(job_id)` runs for every payload on the jobs channel that parses as a
    UUID, `on_cancel(job_id)` likewise for cancellations, and `on_reconnect()`
    after each new connection. Other payloads are ignored.
    """

    def __init__(
        self,
        dsn: str,
        *,
        consumer_id: str,
        on_job: Callable[[str], None],
        on_cancel: Callable[[str], None],
        on_reconnect: Callable[[], None],
        check_interval_s: float,
        reconnect_max_delay_s: float,
    ) -> None:
        self._dsn = dsn
        self._consumer_id = consumer_id
        self._on_job = on_job
        self._on_cancel = on_cancel
        self._on_reconnect = on_reconnect
        self._check_interval_s = check_interval_s
        self._reconnect_max_delay_s = reconnect_max_delay_s
        self._connection: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._probe_token: str | None = None
        self._probe_received = asyncio.Event()
        self.listen_works: bool | None = None
        self.connected = asyncio.Event()
        self.reconnects = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Hold the connection until `stop` is set, reconnecting as often as needed."""
        failures = 0
        while not stop.is_set():
            try:
                await self._connect()
                failures = 0
                await self._watch(stop)
            except CONNECTION_ERRORS as exc:
                failures += 1
                delay_s = min(self._reconnect_max_delay_s, 0.2 * 2 ** min(failures, 10)) * random.uniform(0.5, 1.0)
                logger.warning(
                    "listener connection lost, reconnecting in %.1f s: %s: %s", delay_s, type(exc).__name__, exc,
                    extra={"event": "listener_reconnect_wait", "consumer_id": self._consumer_id,
                           "failures": failures},
                )
                await sleep_unless(stop, delay_s)
            finally:
                await self._close()

    async def _connect(self) -> None:
        self.connected.clear()
        self._lost.clear()
        connection = await asyncpg.connect(
            self._dsn, timeout=CONNECT_TIMEOUT_S,
            server_settings={"application_name": f"imagen-listener-{self._consumer_id}"},
        )
        self._connection = connection
        connection.add_termination_listener(lambda _connection: self._lost.set())
        await connection.add_listener(JOBS_CHANNEL, self._handle)
        await connection.add_listener(CANCELS_CHANNEL, self._handle)
        if self.reconnects:
            logger.info("listener reconnected", extra={"event": "listener_reconnected",
                                                        "consumer_id": self._consumer_id,
                                                        "reconnects": self.reconnects})
        self.reconnects += 1
        self.connected.set()

        # Jobs inserted while no connection listened got no notification we heard.
        self._on_reconnect()

    async def _watch(self, stop: asyncio.Event) -> None:
        """Ping the connection until it fails or `stop` is set."""
        while not stop.is_set():
            lost = asyncio.ensure_future(self._lost.wait())
            stopped = asyncio.ensure_future(stop.wait())
            done, pending = await asyncio.wait({lost, stopped}, timeout=self._check_interval_s,
                                               return_when=asyncio.FIRST_COMPLETED)
            for future in pending:
                future.cancel()
            if stopped in done:
                return
            if lost in done:
                raise ConnectionResetError("the server closed the listener connection")

            # A half-open socket raises nothing until a query times out.
            await self._connection.fetchval("SELECT 1", timeout=self._check_interval_s)

    async def probe(self, pool: asyncpg.Pool) -> bool:
        """Send a NOTIFY from another connection and report whether this listener hears it.

        Behind a transaction-mode pooler, LISTEN registers on a server
        connection the pooler hands to other clients, so the probe never
        arrives.
        """
        await asyncio.wait_for(self.connected.wait(), timeout=CONNECT_TIMEOUT_S)
        self._probe_token = f"{PROBE_PREFIX}{self._consumer_id}:{uuid.uuid4().hex}"
        self._probe_received.clear()
        await pool.execute("SELECT pg_notify($1, $2)", JOBS_CHANNEL, self._probe_token)
        try:
            await asyncio.wait_for(self._probe_received.wait(), timeout=PROBE_TIMEOUT_S)
            self.listen_works = True
        except asyncio.TimeoutError:
            self.listen_works = False
        return self.listen_works

    def _handle(self, _connection: asyncpg.Connection, _pid: int, channel: str, payload: str) -> None:
        if payload == self._probe_token:
            self._probe_received.set()
            return
        job_id = _parse_uuid(payload)
        if job_id is None:
            # Anyone may NOTIFY on these channels; a payload that is not a job id is noise.
            logger.debug("ignored notification", extra={"event": "notification_ignored", "channel": channel})
            return
        if channel == CANCELS_CHANNEL:
            self._on_cancel(job_id)
        else:
            self._on_job(job_id)

    async def _close(self) -> None:
        connection, self._connection = self._connection, None
        self.connected.clear()
        if connection is None:
            return
        try:
            await asyncio.wait_for(connection.close(), timeout=2.0)
        except Exception:  # noqa: BLE001 - a dead connection may fail to close in many ways
            connection.terminate()


def _parse_uuid(payload: str) -> str | None:
    if len(payload) != 36:
        return None
    try:
        return str(uuid.UUID(payload))
    except ValueError:
        return None


async def sleep_unless(stop: asyncio.Event, delay_s: float) -> None:
    """Sleep `delay_s` seconds, or less when `stop` is set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=delay_s)
    except asyncio.TimeoutError:
        pass
