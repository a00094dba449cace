"""Consumers running in the test's event loop, against the test's database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from consumer.backends import Backend, BackendRegistry, build_backends
from consumer.storage import LocalStore
from consumer.worker import Consumer
from imagen.settings import Settings

FAST_SETTINGS = dict(poll_interval_s=0.5, lease_s=3.0, retry_base_delay_s=0.05, retry_max_delay_s=0.2,
                     listener_check_interval_s=0.5, reconnect_max_delay_s=0.5, shutdown_grace_s=5.0,
                     progress_interval_s=0.0)


def fast_settings(tmp_path: Path, **overrides) -> Settings:
    """Settings with short intervals so failure paths play out in seconds."""
    values = {**FAST_SETTINGS, "data_dir": tmp_path, "output_dir": tmp_path / "images", **overrides}
    return Settings(**values)


@pytest.fixture
async def start_consumer(dsn, tmp_path) -> AsyncIterator:
    """Start consumers with the mock backend (plus any `extra_backends`); all are stopped after the test."""
    started: list[Consumer] = []

    async def start(extra_backends: dict[str, Backend] | None = None, **overrides) -> Consumer:
        settings = fast_settings(tmp_path, **overrides)
        registry = build_backends(settings)
        if extra_backends:
            registry = BackendRegistry({**{name: registry.get(name) for name in registry.names()}, **extra_backends})
        consumer = Consumer(settings, dsn, registry, LocalStore(settings.local_output_dir))
        await consumer.start()
        started.append(consumer)
        return consumer

    yield start
    for consumer in started:
        await consumer.stop(grace_s=1.0)
