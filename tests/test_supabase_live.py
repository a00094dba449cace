"""SupabaseStore against a real Supabase project.

Skipped unless IMAGEN_LIVE_SUPABASE_URL and IMAGEN_LIVE_SUPABASE_SERVICE_KEY
are set. IMAGEN_LIVE_SUPABASE_BUCKET picks the bucket (default
imagen-generated). The test writes one object under `_imagen-live-test/` and
deletes it again.
"""

from __future__ import annotations

import io
import os
import uuid

import httpx
import pytest
from PIL import Image

from consumer.storage.supabase import SupabaseStore

LIVE_URL = os.environ.get("IMAGEN_LIVE_SUPABASE_URL", "").strip()
LIVE_KEY = os.environ.get("IMAGEN_LIVE_SUPABASE_SERVICE_KEY", "").strip()
LIVE_BUCKET = os.environ.get("IMAGEN_LIVE_SUPABASE_BUCKET", "").strip() or "imagen-generated"

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(
        not (LIVE_URL and LIVE_KEY),
        reason="set IMAGEN_LIVE_SUPABASE_URL and IMAGEN_LIVE_SUPABASE_SERVICE_KEY to run against a real project",
    ),
]


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.asyncio
async def test_live_upload_and_delete() -> None:
    store = SupabaseStore(LIVE_URL, LIVE_KEY, LIVE_BUCKET)
    key = f"_imagen-live-test/{uuid.uuid4().hex}.png"
    png = _png()
    try:
        await store.put(key, png, "image/png")
        await store.put(key, png, "image/png")  # a retry overwrites

        async with httpx.AsyncClient(timeout=30.0) as client:
            response = await client.get(
                f"{store.url}/storage/v1/object/info/{LIVE_BUCKET}/{key}",
                headers={"apikey": LIVE_KEY, "Authorization": f"Bearer {LIVE_KEY}"},
            )
        assert response.status_code == 200
    finally:
        await store.delete(key)
        await store.close()


@pytest.mark.asyncio
async def test_live_check_writable() -> None:
    """Needs the imagen schema exposed and the imagen migrations applied in that project."""
    store = SupabaseStore(LIVE_URL, LIVE_KEY, LIVE_BUCKET)
    try:
        await store.check_writable()
    finally:
        await store.close()
