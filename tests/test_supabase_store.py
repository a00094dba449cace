"""SupabaseStore against the fake Supabase project, through the real supabase client."""

from __future__ import annotations

import logging

import pytest

from consumer.storage.supabase import PROBE_PREFIX, SupabaseStore, check_service_key, jwt_role
from imagen.errors import SettingsError, StorageError
from tests.fakes.storage_server import FakeSupabase, make_jwt

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
BUCKET = "imagen-generated"
KEY = "2025-01-02/a-red-fox-42.png"



def _store(fake: FakeSupabase, key: str, **options: object) -> SupabaseStore:
    options.setdefault("request_timeout_s", 5.0)
    return SupabaseStore(fake.url, key, BUCKET, **options)  # type: ignore[arg-type]


# put


@pytest.mark.asyncio
async def test_put_uploads_with_content_type(fake_supabase: FakeSupabase, supabase_store: SupabaseStore) -> None:
    await supabase_store.put(KEY, PNG, "image/png")

    stored = fake_supabase.objects[(BUCKET, KEY)]
    assert stored.data == PNG
    assert stored.content_type == "image/png"


@pytest.mark.asyncio
async def test_put_retry_overwrites_one_object(fake_supabase: FakeSupabase, supabase_store: SupabaseStore) -> None:
    await supabase_store.put(KEY, PNG, "image/png")
    await supabase_store.put(KEY, PNG + b"second", "image/png")

    assert [key for (_, key) in fake_supabase.objects] == [KEY]
    assert fake_supabase.object_writes(BUCKET, KEY) == 2
    assert fake_supabase.objects[(BUCKET, KEY)].data == PNG + b"second"


@pytest.mark.asyncio
async def test_put_conflict_is_transient(fake_supabase: FakeSupabase, supabase_store: SupabaseStore) -> None:
    fake_supabase.fail_next("409", path_prefix="/storage/")

    with pytest.raises(StorageError) as caught:
        await supabase_store.put(KEY, PNG, "image/png")

    assert caught.value.transient is True
    assert "already exists" in str(caught.value)
    assert KEY in str(caught.value)


@pytest.mark.asyncio
@pytest.mark.parametrize("status", ["500", "503"])
async def test_put_server_error_is_transient(
    fake_supabase: FakeSupabase, supabase_store: SupabaseStore, status: str
) -> None:
    fake_supabase.fail_next(status, path_prefix="/storage/")

    with pytest.raises(StorageError) as caught:
        await supabase_store.put(KEY, PNG, "image/png")
    assert caught.value.transient is True
    assert status in str(caught.value)

    await supabase_store.put(KEY, PNG, "image/png")
    assert fake_supabase.object_writes(BUCKET, KEY) == 1


@pytest.mark.asyncio
async def test_put_dropped_connection_is_transient(fake_supabase: FakeSupabase, supabase_store: SupabaseStore) -> None:
    fake_supabase.fail_next("disconnect", path_prefix="/storage/")

    with pytest.raises(StorageError) as caught:
        await supabase_store.put(KEY, PNG, "image/png")

    assert caught.value.transient is True
    assert "could not reach Supabase Storage" in str(caught.value)


@pytest.mark.asyncio
async def test_put_timeout_is_transient(fake_supabase: FakeSupabase) -> None:
    store = _store(fake_supabase, fake_supabase.service_key, request_timeout_s=0.2)
    fake_supabase.fail_next("delay", path_prefix="/storage/", delay_s=10.0)
    try:
        with pytest.raises(StorageError) as caught:
            await store.put(KEY, PNG, "image/png")
    finally:
        fake_supabase.release.set()
        await store.close()

    assert caught.value.transient is True
    assert "Timeout" in str(caught.value)


@pytest.mark.asyncio
async def test_put_too_large_is_permanent(fake_supabase: FakeSupabase, supabase_store: SupabaseStore) -> None:
    fake_supabase.buckets[BUCKET].file_size_limit = 16

    with pytest.raises(StorageError) as caught:
        await supabase_store.put(KEY, PNG, "image/png")

    assert caught.value.transient is False
    assert "file size limit" in str(caught.value)
    assert f"{len(PNG)} bytes" in str(caught.value)


@pytest.mark.asyncio
async def test_put_injected_413_is_permanent(fake_supabase: FakeSupabase, supabase_store: SupabaseStore) -> None:
    fake_supabase.fail_next("413", path_prefix="/storage/")

    with pytest.raises(StorageError) as caught:
        await supabase_store.put(KEY, PNG, "image/png")

    assert caught.value.transient is False
    assert "file size limit" in str(caught.value)


@pytest.mark.asyncio
async def test_put_rejected_mime_type_is_permanent(fake_supabase: FakeSupabase, supabase_store: SupabaseStore) -> None:
    with pytest.raises(StorageError) as caught:
        await supabase_store.put(KEY, PNG, "image/jpeg")

    assert caught.value.transient is False
    assert "'image/jpeg'" in str(caught.value)
    assert "allowed MIME types" in str(caught.value)


@pytest.mark.asyncio
async def test_put_missing_bucket_is_permanent(fake_supabase: FakeSupabase) -> None:
    store = SupabaseStore(fake_supabase.url, fake_supabase.service_key, "no-such-bucket")
    try:
        with pytest.raises(StorageError) as caught:
            await store.put(KEY, PNG, "image/png")
    finally:
        await store.close()

    assert caught.value.transient is False
    assert "IMAGEN_STORAGE_BUCKET" in str(caught.value)


@pytest.mark.asyncio
@pytest.mark.parametrize("key", ["../etc/passwd.png", "2025-01-02/../x.png", "/abs.png", "a//b.png", ""])
async def test_put_unsafe_key_rejected(fake_supabase: FakeSupabase, supabase_store: SupabaseStore, key: str) -> None:
    with pytest.raises(StorageError) as caught:
        await supabase_store.put(key, PNG, "image/png")

    assert caught.value.transient is False
    assert fake_supabase.count_requests("POST", "/storage/") == 0


@pytest.mark.asyncio
async def test_put_with_anon_key_names_the_setting(fake_supabase: FakeSupabase) -> None:
    store = _store(fake_supabase, fake_supabase.anon_key)
    try:
        with pytest.raises(StorageError) as caught:
            await store.put(KEY, PNG, "image/png")
    finally:
        await store.close()

    assert caught.value.transient is False
    assert "SUPABASE_SERVICE_KEY" in str(caught.value)


# delete


@pytest.mark.asyncio
async def test_delete_removes_object(fake_supabase: FakeSupabase, supabase_store: SupabaseStore) -> None:
    await supabase_store.put(KEY, PNG, "image/png")

    await supabase_store.delete(KEY)

    assert (BUCKET, KEY) not in fake_supabase.objects


@pytest.mark.asyncio
async def test_delete_missing_object_succeeds(supabase_store: SupabaseStore) -> None:
    await supabase_store.delete("2025-01-02/never-written-1.png")


# check_writable


@pytest.mark.asyncio
async def test_check_writable_leaves_nothing_behind(fake_supabase: FakeSupabase, supabase_store: SupabaseStore) -> None:
    await supabase_store.check_writable()

    probe_uploads = [r for r in fake_supabase.requests if r.method == "POST" and PROBE_PREFIX in r.path]
    assert len(probe_uploads) == 1
    assert b"image/png" in probe_uploads[0].body
    assert fake_supabase.objects == {}
    assert fake_supabase.rows == {"imagen.images": []}


@pytest.mark.asyncio
async def test_check_writable_sends_imagen_profile(fake_supabase: FakeSupabase, supabase_store: SupabaseStore) -> None:
    await supabase_store.check_writable()

    inserts = [r for r in fake_supabase.requests if r.path == "/rest/v1/images"]
    assert len(inserts) == 1
    assert inserts[0].method == "POST"
    assert inserts[0].headers["content-profile"] == "imagen"
    assert inserts[0].body == b"[]"
    assert "return=minimal" in inserts[0].headers["prefer"]


@pytest.mark.asyncio
async def test_check_writable_rejects_anon_key(fake_supabase: FakeSupabase) -> None:
    store = _store(fake_supabase, fake_supabase.anon_key)
    try:
        with pytest.raises(SettingsError) as caught:
            await store.check_writable()
    finally:
        await store.close()

    assert "SUPABASE_SERVICE_KEY contains the anon key" in str(caught.value)
    assert "service_role" in str(caught.value)
    assert fake_supabase.requests == []


@pytest.mark.asyncio
async def test_check_writable_rejects_wrong_signature(fake_supabase: FakeSupabase) -> None:
    forged = make_jwt({"role": "service_role", "exp": 4100000000}, "another-project-secret")
    store = _store(fake_supabase, forged)
    try:
        with pytest.raises(SettingsError) as caught:
            await store.check_writable()
    finally:
        await store.close()

    assert "SUPABASE_SERVICE_KEY" in str(caught.value)
    assert "invalid signature" in str(caught.value)


@pytest.mark.asyncio
async def test_check_writable_rejects_authenticated_role(fake_supabase: FakeSupabase) -> None:
    store = _store(fake_supabase, fake_supabase.key_for("authenticated"))
    try:
        with pytest.raises(SettingsError) as caught:
            await store.check_writable()
    finally:
        await store.close()

    assert "'authenticated'" in str(caught.value)


@pytest.mark.asyncio
async def test_check_writable_schema_not_exposed(fake_supabase: FakeSupabase, supabase_store: SupabaseStore) -> None:
    fake_supabase.exposed_schemas = ("public", "graphql_public")

    with pytest.raises(SettingsError) as caught:
        await supabase_store.check_writable()

    assert "'imagen'" in str(caught.value)
    assert "Exposed schemas" in str(caught.value)


@pytest.mark.asyncio
async def test_check_writable_table_missing(fake_supabase: FakeSupabase, supabase_store: SupabaseStore) -> None:
    fake_supabase.tables = {"imagen": {"jobs"}}

    with pytest.raises(SettingsError) as caught:
        await supabase_store.check_writable()

    assert "imagen.images" in str(caught.value)
    assert "migrations" in str(caught.value)


@pytest.mark.asyncio
async def test_check_writable_storage_down_is_transient(
    fake_supabase: FakeSupabase, supabase_store: SupabaseStore
) -> None:
    fake_supabase.fail_next("503", path_prefix="/storage/")

    with pytest.raises(StorageError) as caught:
        await supabase_store.check_writable()

    assert caught.value.transient is True


@pytest.mark.asyncio
async def test_check_writable_rest_down_is_transient(fake_supabase: FakeSupabase, supabase_store: SupabaseStore) -> None:
    fake_supabase.fail_next("503", path_prefix="/rest/")

    with pytest.raises(StorageError) as caught:
        await supabase_store.check_writable()

    assert caught.value.transient is True
    assert "503" in str(caught.value)


@pytest.mark.asyncio
async def test_check_writable_mime_restricted_bucket(fake_supabase: FakeSupabase, supabase_store: SupabaseStore) -> None:
    fake_supabase.buckets[BUCKET].allowed_mime_types = ("image/png",)

    await supabase_store.check_writable()


# Secrets


@pytest.mark.asyncio
async def test_key_never_in_errors_logs_repr(fake_supabase: FakeSupabase, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="consumer")
    keys = [fake_supabase.service_key, fake_supabase.anon_key, make_jwt({"role": "service_role"}, "wrong-secret")]
    messages = []
    for key in keys:
        store = _store(fake_supabase, key)
        messages.append(repr(store))
        fake_supabase.fail_next("500", path_prefix="/storage/")
        for action in (store.put(KEY, PNG, "image/png"), store.check_writable(), store.put(KEY, PNG, "image/gif")):
            try:
                await action
            except (StorageError, SettingsError) as exc:
                messages.append(str(exc))
                messages.append(repr(exc))
        await store.close()

    messages.extend(record.getMessage() + " " + repr(record.__dict__) for record in caplog.records)
    for key in keys:
        signature = key.rsplit(".", 1)[-1]
        assert not [m for m in messages if signature in m]


# Key roles


def test_jwt_role_reads_claim(fake_supabase: FakeSupabase) -> None:
    assert jwt_role(fake_supabase.service_key) == "service_role"
    assert jwt_role(fake_supabase.anon_key) == "anon"
    assert jwt_role("not-a-jwt") is None
    assert jwt_role("a.%%%.c") is None


def test_check_service_key_new_style_keys() -> None:
    check_service_key("sb_secret_abcdef0123456789")

    with pytest.raises(SettingsError) as caught:
        check_service_key("sb_publishable_abcdef0123456789")
    assert "publishable" in str(caught.value)


def test_store_rejects_bad_construction() -> None:
    with pytest.raises(SettingsError):
        SupabaseStore("ftp://example.invalid", "key")
    with pytest.raises(SettingsError):
        SupabaseStore("http://127.0.0.1:1", " ")
    with pytest.raises(SettingsError):
        SupabaseStore("http://127.0.0.1:1", "key", "")
