"""Supabase Storage as the image store, through the async `supabase` client.

Only the service key is used. At startup `check_writable()` proves that the
key can write both places a finished job touches: it uploads and deletes a
probe PNG under `_imagen-probe/` in the bucket, and sends PostgREST an insert
of zero rows into `imagen.images`. PostgreSQL checks the INSERT privilege when
it plans that statement, so a key without insert rights fails while nothing is
written.

Keys, tokens and signed URLs never appear in messages, logs or `repr()`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx
from postgrest.exceptions import APIError
from storage3.exceptions import StorageApiError
from storage3.utils import StorageException
from supabase import AsyncClient, AsyncClientOptions

from imagen.errors import SettingsError, StorageError
from imagen.settings import Settings

logger = logging.getLogger(__name__)

PROBE_PREFIX = "_imagen-probe"
DEFAULT_REQUEST_TIMEOUT_S = 30.0
DEFAULT_CACHE_CONTROL_S = 3600

# A 1x1 transparent PNG. The probe is a real PNG because a bucket may only
# accept image/png.
_PROBE_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)

_KEY_FIX = "set SUPABASE_SERVICE_KEY to the service_role key from the Supabase dashboard (Project Settings > API Keys)"


class SupabaseStore:
    """Image store writing PNGs to one Supabase Storage bucket, where `put` overwrites (upsert)."""

    kind = "supabase"

    def __init__(
        self,
        url: str,
        service_key: str,
        bucket: str = "imagen-generated",
        *,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        schema: str = "imagen",
        images_table: str = "images",
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise SettingsError(f"SUPABASE_URL must start with https:// (or http:// for a local stack), got {url!r}")
        if not service_key.strip():
            raise SettingsError(f"SUPABASE_SERVICE_KEY is empty: {_KEY_FIX}")
        if not bucket.strip():
            raise SettingsError("IMAGEN_STORAGE_BUCKET is empty: set it to the bucket name, e.g. imagen-generated")
        if request_timeout_s <= 0:
            raise SettingsError(f"request_timeout_s must be > 0, got {request_timeout_s}")

        self.bucket = bucket
        self.url = url.rstrip("/")
        self.schema = schema
        self.images_table = images_table
        self._service_key = service_key
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(request_timeout_s), follow_redirects=True)
        self._client = AsyncClient(
            self.url,
            service_key,
            AsyncClientOptions(schema=schema, httpx_client=self._http, auto_refresh_token=False, persist_session=False),
        )

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> SupabaseStore:
        """Build the store from SUPABASE_URL, SUPABASE_SERVICE_KEY and IMAGEN_STORAGE_BUCKET.

        `options` are passed to the constructor (`request_timeout_s`, `schema`, `images_table`).
        """
        if not settings.supabase_url or not settings.supabase_service_key:
            raise SettingsError("SUPABASE_URL and SUPABASE_SERVICE_KEY must both be set to store images in Supabase Storage")
        return cls(settings.supabase_url, settings.supabase_service_key, settings.storage_bucket, **options)

    def __repr__(self) -> str:
        return f"SupabaseStore(url={self.url!r}, bucket={self.bucket!r})"

    @property
    def _host(self) -> str:
        return urlsplit(self.url).netloc

    # Startup check.

    async def check_writable(self) -> None:
        """Verify the key is a service key and can write the bucket and the images table.

        Raises SettingsError when the configuration is wrong, and a transient
        StorageError when Supabase could not be reached, so the caller may try again.
        """
        check_service_key(self._service_key)
        await self._check_bucket_writable()
        await self._check_images_insertable()
        logger.info(
            "Supabase Storage bucket and images table are writable",
            extra={"event": "storage_check_passed", "bucket": self.bucket, "host": self._host},
        )

    async def _check_bucket_writable(self) -> None:
        probe_key = f"{PROBE_PREFIX}/{uuid.uuid4().hex}.png"
        try:
            await self._upload(probe_key, _PROBE_PNG, "image/png")
        except StorageError as exc:
            if exc.transient:
                raise
            raise SettingsError(f"the startup probe upload failed: {exc}") from None

        try:
            await self.delete(probe_key)
        except StorageError as exc:
            # Writing works, which is all a job needs, so the consumer may start.
            logger.warning(
                "could not delete the startup probe object",
                extra={"event": "storage_probe_not_deleted", "bucket": self.bucket, "key": probe_key, "error": str(exc)},
            )

    async def _check_images_insertable(self) -> None:
        table = f"{self.schema}.{self.images_table}"
        try:
            await self._client.table(self.images_table).insert([], returning="minimal").execute()
        except APIError as exc:
            code = exc.code or ""
            if code == "429" or (len(code) == 3 and code.startswith("5")):
                # A body that is not PostgREST JSON (a proxy error page) leaves the HTTP status as the code.
                raise StorageError(
                    f"the write check on {table} got HTTP {code} from the Supabase REST API at {self._host}, "
                    "so try again later",
                    transient=True,
                ) from None
            raise SettingsError(_describe_postgrest_error(exc, table, self.schema)) from None
        except httpx.TransportError as exc:
            raise StorageError(
                f"could not reach the Supabase REST API at {self._host} ({type(exc).__name__}): check SUPABASE_URL "
                "and the network",
                transient=True,
            ) from None

    # Object operations.

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Upload `data` to `key`, replacing any object already there."""
        _check_key(key)
        await self._upload(key, data, content_type)
        logger.info(
            "stored object",
            extra={"event": "storage_object_stored", "bucket": self.bucket, "key": key, "bytes": len(data)},
        )

    async def _upload(self, key: str, data: bytes, content_type: str) -> None:
        options = {"content-type": content_type, "upsert": "true", "cache-control": str(DEFAULT_CACHE_CONTROL_S)}
        try:
            await self._client.storage.from_(self.bucket).upload(key, data, options)
        except StorageApiError as exc:
            raise _describe_storage_error(exc, "upload", key, self.bucket, size=len(data), content_type=content_type) from None
        except httpx.TransportError as exc:
            raise self._unreachable("upload", key, exc) from None
        except (StorageException, ValueError) as exc:
            raise StorageError(f"upload of {key!r} to bucket {self.bucket!r} failed: {exc}", transient=False) from None

    async def delete(self, key: str) -> None:
        """Delete `key`. A key that does not exist is not an error."""
        _check_key(key)
        try:
            await self._client.storage.from_(self.bucket).remove([key])
        except StorageApiError as exc:
            raise _describe_storage_error(exc, "delete", key, self.bucket) from None
        except httpx.TransportError as exc:
            raise self._unreachable("delete", key, exc) from None
        logger.info("deleted object", extra={"event": "storage_object_deleted", "bucket": self.bucket, "key": key})

    def _unreachable(self, action: str, key: str, exc: httpx.TransportError) -> StorageError:
        logger.warning(
            "Supabase Storage request failed",
            extra={"event": "storage_request_failed", "action": action, "bucket": self.bucket, "key": key,
                   "error_type": type(exc).__name__},
        )
        return StorageError(
            f"{action} of {key!r} failed: could not reach Supabase Storage at {self._host} ({type(exc).__name__})",
            transient=True,
        )

    async def close(self) -> None:
        await self._http.aclose()


def check_service_key(key: str) -> None:
    """Raise SettingsError when `key` is an anon, publishable or other non-service key.

    Legacy keys are JWTs whose `role` claim is read without verifying the
    signature. New-style keys are recognised by their `sb_secret_` and
    `sb_publishable_` prefixes.
    """
    if key.startswith("sb_publishable_"):
        raise SettingsError(f"SUPABASE_SERVICE_KEY contains a publishable key, which has only anon rights: {_KEY_FIX}")
    if key.startswith("sb_secret_"):
        return
    role = jwt_role(key)
    if role is None:
        # NOTE: a key in an unknown format is let through; the probe upload then shows whether it works.
        logger.warning(
            "SUPABASE_SERVICE_KEY is neither a JWT nor an sb_secret_ key, so its role is unknown",
            extra={"event": "storage_key_role_unknown"},
        )
        return
    if role == "anon":
        raise SettingsError(f"SUPABASE_SERVICE_KEY contains the anon key, but it must be the service_role key: {_KEY_FIX}")
    if role != "service_role":
        raise SettingsError(f"SUPABASE_SERVICE_KEY has role {role!r}, not service_role: {_KEY_FIX}")


def jwt_role(token: str) -> str | None:
    """Return the `role` claim of a JWT without verifying it, or None when `token` is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        return None
    role = claims.get("role") if isinstance(claims, dict) else None
    return role if isinstance(role, str) else None


def _check_key(key: str) -> None:
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
        raise StorageError(
            f"object key {key!r} is invalid: use slash-separated names without empty, '.' or '..' parts",
            transient=False,
        )


def _describe_storage_error(
    exc: StorageApiError, action: str, key: str, bucket: str, *, size: int | None = None, content_type: str | None = None
) -> StorageError:
    """Turn a Storage API error into a StorageError that names the cause and the fix."""
    status = str(exc.status)
    code = str(exc.code or "")
    message = str(exc.message or "")
    lowered = f"{code} {message}".lower()
    prefix = f"{action} of {key!r} to bucket {bucket!r} failed"

    if status == "413" or "payload too large" in lowered or "exceeded the maximum" in lowered:
        shown_size = f" ({size} bytes)" if size is not None else ""
        error = StorageError(
            f"{prefix}: the object{shown_size} is larger than the bucket's file size limit. Raise the "
            "limit in the bucket settings or the project's global upload limit",
            transient=False,
        )
    elif status == "415" or "mime" in lowered:
        error = StorageError(
            f"{prefix}: the bucket rejects content type {content_type!r}. Add it to the bucket's allowed MIME types",
            transient=False,
        )
    elif status == "409" or code == "Duplicate":
        # With upsert on, Storage reports a conflict only while another upload of the
        # same key is in flight, so a retry overwrites the object.
        error = StorageError(f"{prefix}: the key already exists and was not overwritten ({message})", transient=True)
    elif status in ("401", "403") or "unauthorized" in lowered or "jwt" in lowered or "signature" in lowered:
        error = StorageError(f"{prefix}: Supabase Storage rejected SUPABASE_SERVICE_KEY ({message}). To fix it, {_KEY_FIX}", transient=False)
    elif status == "404" and "bucket" in lowered:
        error = StorageError(
            f"{prefix}: the bucket was not found. Create it in Supabase Storage or set IMAGEN_STORAGE_BUCKET",
            transient=False,
        )
    elif status == "429" or status.startswith("5") or code == "InternalError":
        error = StorageError(f"{prefix}: Supabase Storage returned {status} ({_short(message)}), a retry may succeed", transient=True)
    else:
        error = StorageError(f"{prefix}: Supabase Storage returned {status} {code} ({_short(message)})", transient=False)

    log = logger.warning  # the consumer logs the job's terminal failure once, at ERROR
    log(
        "Supabase Storage request failed",
        extra={"event": "storage_request_failed", "action": action, "bucket": bucket, "key": key,
               "status": status, "code": code, "transient": error.transient},
    )
    return error


def _describe_postgrest_error(exc: APIError, table: str, schema: str) -> str:
    code = exc.code or ""
    message = exc.message or ""
    if code == "PGRST106":
        return (
            f"schema {schema!r} is not exposed by the Supabase REST API ({message}); add it under "
            "Project Settings > API > Exposed schemas"
        )
    if code == "PGRST205" or code == "42P01":
        return f"table {table} was not found by the Supabase REST API ({message}); apply the imagen migrations"
    if code == "42501":
        return (
            f"SUPABASE_SERVICE_KEY may not insert into {table} ({message}); {_KEY_FIX}, and grant insert "
            f"on {table} to service_role"
        )
    if code.startswith("PGRST30"):
        return f"the Supabase REST API rejected SUPABASE_SERVICE_KEY ({message}); {_KEY_FIX}"
    return f"the write check on {table} failed with {code or 'an error'} ({_short(message)})"


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
