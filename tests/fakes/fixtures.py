"""Pytest fixtures that start the fakes on 127.0.0.1 and build clients pointed at them.

Import the fixtures a test module uses by name, e.g.
`from tests.fakes.fixtures import fake_supabase, supabase_store`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from consumer.backends.replicate import REPLICATE_MODELS, ReplicateBackend
from consumer.storage.supabase import SupabaseStore
from tests.fakes.replicate_server import FakeReplicate
from tests.fakes.storage_server import FakeSupabase


@pytest.fixture
def fake_supabase() -> Iterator[FakeSupabase]:
    fake = FakeSupabase().start()
    yield fake
    fake.stop()


@pytest_asyncio.fixture
async def supabase_store(fake_supabase: FakeSupabase) -> AsyncIterator[SupabaseStore]:
    store = SupabaseStore(fake_supabase.url, fake_supabase.service_key, request_timeout_s=5.0)
    yield store
    await store.close()


@pytest.fixture
def fake_replicate() -> Iterator[FakeReplicate]:
    fake = FakeReplicate().start()
    yield fake
    fake.stop()


def make_replicate_backend(fake: FakeReplicate, backend_name: str, **options: object) -> ReplicateBackend:
    """Build a backend against `fake` that polls fast, for tests."""
    options.setdefault("poll_interval_s", 0.01)
    options.setdefault("max_poll_interval_s", 0.05)
    options.setdefault("timeout_s", 10.0)
    return ReplicateBackend(REPLICATE_MODELS[backend_name], fake.api_token, base_url=fake.url, **options)  # type: ignore[arg-type]
