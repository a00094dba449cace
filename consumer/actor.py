"""The consumer as a Ray actor, so consumers scale out on any node of a cluster.

The actor holds no state worth keeping: a consumer that dies loses only its
leases, which another consumer rescues once they expire.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from imagen.settings import Settings

logger = logging.getLogger(__name__)


@ray.remote(num_cpus=0, max_concurrency=64)
class ConsumerActor:
    """Run one `Consumer` in the actor's event loop until `stop` is called."""

    def __init__(self, settings: Settings, dsn: str, log_format: str = "text") -> None:
        from imagen.logs import configure_logging
        from imagen.telemetry import configure_tracing

        configure_logging(settings.log_level, log_format)
        configure_tracing("imagen-consumer")
        self._settings = settings
        self._dsn = dsn
        self._consumer = None

    async def start(self) -> dict[str, Any]:
        """Build the consumer against the deployment's handle and start claiming; returns its status."""
        from consumer.backends import build_backends
        from consumer.metrics import build_observer
        from consumer.storage import build_store
        from consumer.worker import Consumer
        from imagen.cluster import get_handle

        backends = build_backends(self._settings, get_serve_handle=get_handle)
        store = build_store(self._settings)
        self._consumer = Consumer(self._settings, self._dsn, backends, store, observer=build_observer())
        await self._consumer.start()
        return self.status()

    def status(self) -> dict[str, Any]:
        consumer = self._consumer
        if consumer is None:
            return {"started": False}
        listener = consumer.listener
        return {
            "started": consumer.ready.is_set(),
            "consumer_id": consumer.id,
            "listening": bool(listener and listener.connected.is_set()),
            "listen_works": listener.listen_works if listener else None,
            "in_flight": consumer.in_flight,
            "claimed_total": consumer.claimed_total,
        }

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop the consumer gracefully, then flush its spans."""
        from imagen.telemetry import shutdown_tracing

        if self._consumer is not None:
            await self._consumer.stop(grace_s)
        await asyncio.to_thread(shutdown_tracing)
