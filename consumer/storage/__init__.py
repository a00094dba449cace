"""Stores for finished images: the local disk, Supabase Storage, or both."""

from __future__ import annotations

import asyncio

from consumer.storage.base import ObjectStore, object_key, slugify
from consumer.storage.local import LocalStore
from imagen.settings import Settings

__all__ = ["ObjectStore", "LocalStore", "MirroredStore", "build_store", "object_key", "slugify"]


class MirroredStore:
    """Write every object to a primary store and keep a copy in a second one.

    The images row records the primary (Supabase Storage). The local copy is
    written first, so a failed upload leaves no remote object without a local one.
    """

    def __init__(self, primary: ObjectStore, copy: ObjectStore) -> None:
        self.primary = primary
        self.copy = copy
        self.kind = primary.kind
        self.bucket = primary.bucket

    async def check_writable(self) -> None:
        await self.copy.check_writable()
        await self.primary.check_writable()

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        await self.copy.put(key, data, content_type)
        await self.primary.put(key, data, content_type)

    async def delete(self, key: str) -> None:
        await asyncio.gather(self.primary.delete(key), self.copy.delete(key))

    async def close(self) -> None:
        await asyncio.gather(self.primary.close(), self.copy.close())


def build_store(settings: Settings) -> ObjectStore:
    """Pick the store the settings describe: local files unless Supabase is configured."""
    local = LocalStore(settings.local_output_dir)
    if not settings.uses_supabase_storage:
        return local

    from consumer.storage.supabase import SupabaseStore

    remote = SupabaseStore.from_settings(settings)
    return MirroredStore(remote, local) if settings.keep_local_copy else remote
