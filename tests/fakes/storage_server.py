"""A fake Supabase project: the Storage object API and the PostgREST insert used at startup.

It speaks enough of both protocols for the real `supabase` client:

- Storage (`/storage/v1`): upload (`POST /object/{bucket}/{key}` with
  `x-upsert`), update (`PUT`), download, `GET /object/info/...`,
  `POST /object/list/{bucket}`, `DELETE /object/{bucket}` with `prefixes`.
  Errors carry the JSON body Storage sends (`statusCode`, `error`, `message`).
  Like older Storage versions, the fake sends most 4xx errors as HTTP 400 with
  the real code in `statusCode`, so a client must read the body.
- PostgREST (`/rest/v1`): `POST /{table}` with `Content-Profile` selecting the
  schema; a JSON array is inserted as rows.

Keys are HS256 JWTs signed with `jwt_secret`; the `role` claim decides what a
request may do, as it does on Supabase: `service_role` bypasses row level
security, `anon` gets the errors a private bucket and a table without grants
give. Failures can be injected with `fail_next`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import unquote

from tests.fakes._http import DropConnection, LoopbackServer, Request, Response

FAILURE_KINDS = ("500", "503", "413", "409", "mime", "delay", "disconnect")

_KEY_PATTERN = re.compile(r"^[\w/!.*'() &$@=;:+,?-]+$")


def make_jwt(claims: dict, secret: str) -> str:
    """Sign `claims` as an HS256 JWT."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64url(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class StoredObject:
    data: bytes
    content_type: str
    cache_control: str
    created_at: str
    updated_at: str
    writes: int = 1


@dataclass
class Bucket:
    name: str
    public: bool = False
    allowed_mime_types: tuple[str, ...] | None = None
    file_size_limit: int | None = None


@dataclass
class _Failure:
    kind: str
    remaining: int
    path_prefix: str
    delay_s: float


@dataclass
class FakeSupabase:
    """State and behaviour of the fake project; `start()` serves it on 127.0.0.1."""

    jwt_secret: str = "fake-project-jwt-secret-0123456789"
    exposed_schemas: tuple[str, ...] = ("public", "graphql_public", "imagen")
    tables: dict[str, set[str]] = field(default_factory=lambda: {"imagen": {"images", "jobs"}})
    buckets: dict[str, Bucket] = field(default_factory=dict)
    objects: dict[tuple[str, str], StoredObject] = field(default_factory=dict)
    rows: dict[str, list[dict]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: deque[_Failure] = deque()
        self._server: LoopbackServer | None = None
        self.release = threading.Event()  # set to end every injected delay at once
        self.delayed = threading.Event()  # set when a request starts an injected delay
        if not self.buckets:
            self.add_bucket("imagen-generated", allowed_mime_types=("image/png",), file_size_limit=50 * 1024 * 1024)

    # Set-up used by tests.

    def add_bucket(self, name: str, **options: object) -> Bucket:
        bucket = Bucket(name, **options)  # type: ignore[arg-type]
        self.buckets[name] = bucket
        return bucket

    def key_for(self, role: str, *, secret: str | None = None) -> str:
        """Return an API key with `role`, signed with the project secret unless `secret` is given."""
        claims = {"iss": "supabase", "ref": "fakeproject", "role": role, "iat": 1700000000, "exp": 4100000000}
        return make_jwt(claims, secret or self.jwt_secret)

    @property
    def service_key(self) -> str:
        return self.key_for("service_role")

    @property
    def anon_key(self) -> str:
        return self.key_for("anon")

    def fail_next(self, kind: str, count: int = 1, *, path_prefix: str = "", delay_s: float = 30.0) -> None:
        """Make the next `count` requests whose path starts with `path_prefix` fail as `kind`.

        Kinds: "500", "503" (server errors), "413" (object too large), "409"
        (key already exists), "mime" (content type rejected), "delay" (hold the
        request until `release` is set or `delay_s` passes, then serve it),
        "disconnect" (close the connection without a response).
        """
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}: use one of {', '.join(FAILURE_KINDS)}")
        with self._lock:
            self._failures.append(_Failure(kind, count, path_prefix, delay_s))

    def object_writes(self, bucket: str, key: str) -> int:
        stored = self.objects.get((bucket, key))
        return stored.writes if stored else 0

    def count_requests(self, method: str, path_prefix: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.method == method and r.path.startswith(path_prefix))

    # Server life cycle.

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeSupabase is not started")
        return self._server.url

    def start(self) -> FakeSupabase:
        self._server = LoopbackServer(self.handle)
        self._server.start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.stop()

    # Request handling.

    def handle(self, request: Request) -> Response:
        with self._lock:
            self.requests.append(request)
            failure = self._take_failure(request.path)
        if failure is not None:
            injected = self._injected_response(failure)
            if injected is not None:
                return injected

        role_or_error = self._authorize(request)
        if isinstance(role_or_error, Response):
            return role_or_error
        role = role_or_error

        if request.path.startswith("/storage/v1/"):
            return self._storage(request, request.path.removeprefix("/storage/v1"), role)
        if request.path.startswith("/rest/v1/"):
            return self._postgrest(request, request.path.removeprefix("/rest/v1/"), role)
        return Response.json(404, {"message": "no route matched"})

    def _take_failure(self, path: str) -> _Failure | None:
        for failure in self._failures:
            if path.startswith(failure.path_prefix):
                failure.remaining -= 1
                if failure.remaining <= 0:
                    self._failures.remove(failure)
                return failure
        return None

    def _injected_response(self, failure: _Failure) -> Response | None:
        if failure.kind == "delay":
            self.delayed.set()
            self.release.wait(failure.delay_s)
            return None
        if failure.kind == "disconnect":
            raise DropConnection
        if failure.kind in ("500", "503"):
            return Response(int(failure.kind), b"upstream connect error", {"Content-Type": "text/plain"})
        if failure.kind == "413":
            return _storage_error(413, "413", "Payload too large", "The object exceeded the maximum allowed size")
        if failure.kind == "409":
            return _storage_error(400, "409", "Duplicate", "The resource already exists")
        return _storage_error(400, "415", "invalid_mime_type", "mime type image/png is not supported")

    def _authorize(self, request: Request) -> str | Response:
        token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        api_key = request.headers.get("apikey", "")
        is_rest = request.path.startswith("/rest/")
        if not token or not api_key:
            if is_rest:
                return Response.json(401, {"message": "No API key found in request", "hint": "No `apikey` request header or url param was found."})
            return _storage_error(400, "403", "Unauthorized", "headers must have required property 'authorization'")
        parts = token.split(".")
        if len(parts) != 3:
            return _auth_failure(is_rest, "jwt malformed", "PGRST301", "Expected 3 parts in JWT; got " + str(len(parts)))
        expected = hmac.new(self.jwt_secret.encode(), f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _b64url_decode(parts[2])):
            return _auth_failure(is_rest, "invalid signature", "PGRST301", "JWSError JWSInvalidSignature")
        claims = json.loads(_b64url_decode(parts[1]))
        if claims.get("exp", 0) < time.time():
            return _auth_failure(is_rest, "jwt expired", "PGRST303", "JWT expired")
        return str(claims.get("role", ""))

    # Storage.

    def _storage(self, request: Request, path: str, role: str) -> Response:
        segments = [unquote(s) for s in path.strip("/").split("/")]
        if segments[:1] != ["object"]:
            return _storage_error(404, "404", "not_found", "Route not found")
        rest = segments[1:]
        if request.method == "POST" and rest[:1] == ["list"] and len(rest) == 2:
            return self._list(rest[1], request)
        if request.method == "GET" and rest[:1] == ["info"] and len(rest) >= 3:
            return self._info(rest[1], "/".join(rest[2:]))
        if request.method == "DELETE" and len(rest) == 1:
            return self._remove(rest[0], request, role)
        if request.method in ("POST", "PUT") and len(rest) >= 2:
            return self._upload(rest[0], "/".join(rest[1:]), request, role)
        if request.method == "GET" and len(rest) >= 2:
            return self._download(rest[0], "/".join(rest[1:]), role)
        return _storage_error(404, "404", "not_found", "Route not found")

    def _bucket_or_error(self, name: str) -> Bucket | Response:
        bucket = self.buckets.get(name)
        if bucket is None:
            return _storage_error(400, "404", "Bucket not found", "Bucket not found")
        return bucket

    def _upload(self, bucket_name: str, key: str, request: Request, role: str) -> Response:
        bucket = self._bucket_or_error(bucket_name)
        if isinstance(bucket, Response):
            return bucket
        if role != "service_role":
            # A private bucket without insert policies rejects every other role.
            return _storage_error(400, "403", "Unauthorized", "new row violates row-level security policy")
        if not _KEY_PATTERN.match(key) or "//" in key or key.startswith("/"):
            return _storage_error(400, "400", "InvalidKey", f"Invalid key: {key}")

        data, content_type, cache_control = _read_upload(request)
        if bucket.allowed_mime_types is not None and content_type.split(";")[0].strip() not in bucket.allowed_mime_types:
            return _storage_error(400, "415", "invalid_mime_type", f"mime type {content_type} is not supported")
        if bucket.file_size_limit is not None and len(data) > bucket.file_size_limit:
            return _storage_error(413, "413", "Payload too large", "The object exceeded the maximum allowed size")

        upsert = request.headers.get("x-upsert", "false").lower() == "true"
        now = datetime.now(UTC).isoformat()
        with self._lock:
            existing = self.objects.get((bucket_name, key))
            if request.method == "POST" and existing is not None and not upsert:
                return _storage_error(400, "409", "Duplicate", "The resource already exists")
            if request.method == "PUT" and existing is None:
                return _storage_error(400, "404", "not_found", "Object not found")
            writes = existing.writes + 1 if existing else 1
            created_at = existing.created_at if existing else now
            self.objects[(bucket_name, key)] = StoredObject(data, content_type, cache_control, created_at, now, writes)
        return Response.json(200, {"Key": f"{bucket_name}/{key}", "Id": str(uuid.uuid4())})

    def _download(self, bucket_name: str, key: str, role: str) -> Response:
        stored = self.objects.get((bucket_name, key))
        if stored is None or role != "service_role":
            return _storage_error(400, "404", "not_found", "Object not found")
        return Response(200, stored.data, {"Content-Type": stored.content_type})

    def _info(self, bucket_name: str, key: str) -> Response:
        stored = self.objects.get((bucket_name, key))
        if stored is None:
            return _storage_error(404, "404", "not_found", "Object not found")
        return Response.json(200, {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{bucket_name}/{key}")),
            "name": key, "bucket_id": bucket_name, "size": len(stored.data),
            "content_type": stored.content_type, "cache_control": stored.cache_control,
            "created_at": stored.created_at, "updated_at": stored.updated_at,
        })

    def _list(self, bucket_name: str, request: Request) -> Response:
        prefix = (request.json() or {}).get("prefix", "")
        names = sorted(key for (bucket, key) in self.objects if bucket == bucket_name and key.startswith(prefix))
        return Response.json(200, [{"name": name.removeprefix(prefix).lstrip("/")} for name in names])

    def _remove(self, bucket_name: str, request: Request, role: str) -> Response:
        bucket = self._bucket_or_error(bucket_name)
        if isinstance(bucket, Response):
            return bucket
        if role != "service_role":
            return Response.json(200, [])  # RLS hides the rows, so nothing is deleted
        removed = []
        with self._lock:
            for key in (request.json() or {}).get("prefixes", []):
                if self.objects.pop((bucket_name, key), None) is not None:
                    removed.append({"name": key, "bucket_id": bucket_name})
        return Response.json(200, removed)

    # PostgREST.

    def _postgrest(self, request: Request, table: str, role: str) -> Response:
        schema = request.headers.get("content-profile") or request.headers.get("accept-profile") or "public"
        if schema not in self.exposed_schemas:
            return Response.json(406, {
                "code": "PGRST106", "details": None, "hint": None,
                "message": f"The schema must be one of the following: {', '.join(self.exposed_schemas)}",
            })
        if table not in self.tables.get(schema, set()):
            return Response.json(404, {
                "code": "PGRST205", "details": None, "hint": None,
                "message": f"Could not find the table '{schema}.{table}' in the schema cache",
            })
        if request.method != "POST":
            return Response.json(405, {"code": "PGRST117", "message": f"Unsupported HTTP method: {request.method}"})
        if role != "service_role":
            return Response.json(401 if role == "anon" else 403, {
                "code": "42501", "details": None, "hint": None,
                "message": f"permission denied for table {table}",
            })
        payload = request.json()
        rows = payload if isinstance(payload, list) else [payload]
        with self._lock:
            self.rows.setdefault(f"{schema}.{table}", []).extend(rows)
        return Response(201, b"", {"Content-Range": f"*/{len(rows)}"})


def _read_upload(request: Request) -> tuple[bytes, str, str]:
    """Return (data, content type, cache control) from a multipart form or a raw body."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        return request.body, content_type or "text/plain;charset=UTF-8", request.headers.get("cache-control", "no-cache")
    boundary = content_type.split("boundary=", 1)[1].strip('"').encode()
    fields: dict[str, tuple[dict[str, str], bytes]] = {}
    for chunk in request.body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, content = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("utf-8").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        match = re.search(r'name="([^"]*)"', headers.get("content-disposition", ""))
        if match:
            fields[match.group(1)] = (headers, content.removesuffix(b"\r\n"))
    file_headers, data = fields.get("file", ({}, b""))
    cache_control = fields.get("cacheControl", ({}, b"3600"))[1].decode()
    return data, file_headers.get("content-type", "text/plain;charset=UTF-8"), cache_control


def _storage_error(http_status: int, status_code: str, error: str, message: str) -> Response:
    return Response.json(http_status, {"statusCode": status_code, "error": error, "message": message})


def _auth_failure(is_rest: bool, storage_message: str, rest_code: str, rest_message: str) -> Response:
    if is_rest:
        return Response.json(401, {"code": rest_code, "details": None, "hint": None, "message": rest_message})
    return _storage_error(400, "403", "Unauthorized", storage_message)
