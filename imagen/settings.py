"""Settings read from the environment.

The names of the Go worker's env file (`IMAGEN_WORKER_DATABASE_URL`,
`SUPABASE_URL`, `SUPABASE_SERVICE_KEY`, `IMAGEN_OWNER_USER_ID`,
`REPLICATE_API_TOKEN`) keep their meaning; every other setting is
`IMAGEN_<NAME>` and carries its unit in the name. Secrets never appear in
`repr()` or logs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagen.errors import SettingsError

PROJECT_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_MODEL = "black-forest-labs/FLUX.1-schnell"


def _default_data_dir() -> Path:
    # A source checkout keeps its state next to the code; an installed wheel
    # keeps it in the working directory.
    if (PROJECT_ROOT / "pyproject.toml").exists():
        return PROJECT_ROOT / ".data"
    return Path.cwd() / ".imagen-data"


@dataclass(frozen=True)
class Settings:
    """Every setting of the service, validated at construction."""

    # Database. None means "start the embedded PostgreSQL in data_dir".
    database_url: str | None = field(default=None, repr=False)
    data_dir: Path = field(default_factory=_default_data_dir)

    # Supabase Storage; local files only when these are unset.
    supabase_url: str | None = None
    supabase_service_key: str | None = field(default=None, repr=False)
    storage_bucket: str = "imagen-generated"
    keep_local_copy: bool = False
    output_dir: Path | None = None

    owner_user_id: str | None = None
    replicate_api_token: str | None = field(default=None, repr=False)
    replicate_base_url: str | None = None

    # Model serving.
    model: str = DEFAULT_MODEL
    device: str = "auto"
    serve_replicas: int = 1
    serve_max_batch_size: int = 4
    serve_batch_wait_timeout_s: float = 0.05
    serve_max_ongoing_requests: int = 32
    serve_num_cpus: float = 1.0
    serve_http_port: int = 8000
    # Interfaces Serve's HTTP proxy and the Ray dashboard listen on; the container sets 0.0.0.0.
    serve_http_host: str = "127.0.0.1"
    ray_dashboard_host: str = "127.0.0.1"
    # Autoscaling bounds; with serve_max_replicas above serve_min_replicas, Serve scales between them.
    serve_min_replicas: int = 1
    serve_max_replicas: int = 1
    serve_target_ongoing_requests: float = 4.0
    warmup_shapes: tuple[tuple[int, int, int], ...] = ()

    # Queue and consumers.
    consumers: int = 1
    concurrency: int = 8
    poll_interval_s: float = 5.0
    lease_s: float = 30.0
    # Attempts of jobs queued by `imagen submit`; a row's own max_attempts column decides for the consumer.
    max_attempts: int = 3
    retry_base_delay_s: float = 2.0
    retry_max_delay_s: float = 300.0
    backend_timeout_s: float = 300.0
    shutdown_grace_s: float = 30.0
    listener_check_interval_s: float = 5.0
    reconnect_max_delay_s: float = 10.0
    progress_interval_s: float = 0.5
    # Seconds each step of the `mock` backend takes; tests use it for long-running jobs.
    mock_step_s: float = 0.0

    # Logging.
    log_format: str = "text"
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        self._check_numbers()
        self._check_choices()
        self._check_services()

    def _check_numbers(self) -> None:
        _check_positive(self, "serve_replicas", "serve_max_batch_size", "serve_max_ongoing_requests",
                        "consumers", "concurrency", "max_attempts", "serve_max_replicas",
                        "serve_target_ongoing_requests")
        _check_positive(self, "poll_interval_s", "lease_s", "backend_timeout_s", "serve_num_cpus",
                        "listener_check_interval_s", "reconnect_max_delay_s", "retry_max_delay_s")
        _check_non_negative(self, "serve_batch_wait_timeout_s", "retry_base_delay_s",
                            "shutdown_grace_s", "progress_interval_s", "mock_step_s")

        if self.serve_min_replicas < 0 or self.serve_min_replicas > self.serve_max_replicas:
            raise SettingsError(
                f"IMAGEN_SERVE_MIN_REPLICAS must be between 0 and IMAGEN_SERVE_MAX_REPLICAS "
                f"({self.serve_max_replicas}), got {self.serve_min_replicas}"
            )
        if not 1 <= self.max_attempts <= 10:
            raise SettingsError(f"IMAGEN_MAX_ATTEMPTS must be between 1 and 10, got {self.max_attempts}")
        if self.lease_s < 3:
            raise SettingsError(
                f"IMAGEN_LEASE_S must be at least 3 seconds so a lease can be renewed in time, "
                f"got {self.lease_s}"
            )

    def _check_choices(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise SettingsError(f"IMAGEN_DEVICE must be auto, cpu or cuda, got {self.device!r}")
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise SettingsError(
                f"IMAGEN_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {self.log_level!r}"
            )
        if self.log_format not in ("text", "json"):
            raise SettingsError(f"IMAGEN_LOG_FORMAT must be text or json, got {self.log_format!r}")

    def _check_services(self) -> None:
        if self.database_url is not None:
            _check_database_url(self.database_url)

        if self.owner_user_id is not None:
            try:
                uuid.UUID(self.owner_user_id)
            except ValueError:
                raise SettingsError(
                    f"IMAGEN_OWNER_USER_ID must be a UUID, got {self.owner_user_id!r}; "
                    "set it to the owner's auth.users id"
                ) from None

        if bool(self.supabase_url) != bool(self.supabase_service_key):
            missing = "SUPABASE_SERVICE_KEY" if self.supabase_url else "SUPABASE_URL"
            raise SettingsError(
                f"{missing} is missing: set both SUPABASE_URL and SUPABASE_SERVICE_KEY "
                "to upload to Supabase Storage, or neither to write local files"
            )

    @property
    def uses_supabase_storage(self) -> bool:
        return bool(self.supabase_url and self.supabase_service_key)

    @property
    def local_output_dir(self) -> Path:
        """Directory for PNG files written to local disk."""
        return self.output_dir if self.output_dir is not None else self.data_dir / "images"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from environment variables, ignoring empty values."""
        env = {k: v for k, v in (os.environ if environ is None else environ).items() if v.strip() != ""}
        values: dict[str, Any] = {}
        for name, (env_name, parse) in _ENV_FIELDS.items():
            if env_name in env:
                values[name] = _parse(env_name, env[env_name], parse)
        return cls(**values)


def _check_database_url(url: str) -> None:
    """Reject a database URL that would be misread, without echoing it: it may contain a password."""
    from urllib.parse import urlsplit

    hint = ("IMAGEN_WORKER_DATABASE_URL must look like postgresql://USER:PASSWORD@HOST:PORT/DATABASE; "
            "percent-encode '#', '/', '?', '@' and ':' inside the password (e.g. '#' as %23)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise SettingsError(f"{hint}; the value given could not be parsed") from None
    if parts.scheme not in ("postgres", "postgresql"):
        raise SettingsError(f"{hint}; the scheme is {parts.scheme or 'missing'!r}") from None
    if port is not None and not 0 < port < 65536:
        raise SettingsError(f"{hint}; port {port} is out of range") from None
    if parts.fragment:
        raise SettingsError(f"{hint}; the value contains an unencoded '#'") from None


def _check_positive(settings: Settings, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if value <= 0:
            raise SettingsError(f"{_env_name(name)} must be > 0, got {value}")


def _check_non_negative(settings: Settings, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if value < 0:
            raise SettingsError(f"{_env_name(name)} must be >= 0, got {value}")


def _env_name(field_name: str) -> str:
    for name, (env_name, _) in _ENV_FIELDS.items():
        if name == field_name:
            return env_name
    return field_name


def _parse_finite_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def _parse_shapes(raw: str) -> tuple[tuple[int, int, int], ...]:
    """Parse `WIDTHxHEIGHTxSTEPS` items separated by commas, e.g. `1024x1024x4,512x512x4`."""
    shapes = []
    for item in raw.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3:
            raise ValueError(f"expected WIDTHxHEIGHTxSTEPS, got {item.strip()!r}")
        width, height, steps = (int(part) for part in parts)
        for side in (width, height):
            if side % 16 or not 64 <= side <= 2048:
                raise ValueError(f"{side} in {item.strip()!r} must be a multiple of 16 between 64 and 2048")
        if not 1 <= steps <= 100:
            raise ValueError(f"steps {steps} in {item.strip()!r} must be between 1 and 100")
        shapes.append((width, height, steps))
    return tuple(shapes)


def _parse(env_name: str, raw: str, parse: Any) -> Any:
    try:
        return parse(raw.strip())
    except ValueError as exc:
        shown = "<hidden>" if env_name in SECRET_ENV_NAMES else repr(raw)
        raise SettingsError(f"{env_name} is invalid ({exc}), got {shown}") from None


SECRET_ENV_NAMES = frozenset({"IMAGEN_WORKER_DATABASE_URL", "SUPABASE_SERVICE_KEY", "REPLICATE_API_TOKEN"})

# Field name -> (environment variable, parser).
_ENV_FIELDS: dict[str, tuple[str, Any]] = {
    "database_url": ("IMAGEN_WORKER_DATABASE_URL", str),
    "data_dir": ("IMAGEN_DATA_DIR", lambda raw: Path(raw).expanduser().resolve()),
    "supabase_url": ("SUPABASE_URL", lambda raw: raw.rstrip("/")),
    "supabase_service_key": ("SUPABASE_SERVICE_KEY", str),
    "storage_bucket": ("IMAGEN_STORAGE_BUCKET", str),
    "keep_local_copy": ("IMAGEN_KEEP_LOCAL_COPY", _parse_bool),
    "output_dir": ("IMAGEN_OUTPUT_DIR", lambda raw: Path(raw).expanduser().resolve()),
    "owner_user_id": ("IMAGEN_OWNER_USER_ID", str),
    "replicate_api_token": ("REPLICATE_API_TOKEN", str),
    "replicate_base_url": ("IMAGEN_REPLICATE_BASE_URL", lambda raw: raw.rstrip("/")),
    "model": ("IMAGEN_MODEL", str),
    "device": ("IMAGEN_DEVICE", str),
    "serve_replicas": ("IMAGEN_SERVE_REPLICAS", int),
    "serve_max_batch_size": ("IMAGEN_SERVE_MAX_BATCH_SIZE", int),
    "serve_batch_wait_timeout_s": ("IMAGEN_SERVE_BATCH_WAIT_TIMEOUT_S", _parse_finite_float),
    "serve_max_ongoing_requests": ("IMAGEN_SERVE_MAX_ONGOING_REQUESTS", int),
    "serve_num_cpus": ("IMAGEN_SERVE_NUM_CPUS", _parse_finite_float),
    "serve_http_port": ("IMAGEN_SERVE_HTTP_PORT", int),
    "serve_http_host": ("IMAGEN_SERVE_HTTP_HOST", str),
    "ray_dashboard_host": ("IMAGEN_RAY_DASHBOARD_HOST", str),
    "serve_min_replicas": ("IMAGEN_SERVE_MIN_REPLICAS", int),
    "serve_max_replicas": ("IMAGEN_SERVE_MAX_REPLICAS", int),
    "serve_target_ongoing_requests": ("IMAGEN_SERVE_TARGET_ONGOING_REQUESTS", _parse_finite_float),
    "warmup_shapes": ("IMAGEN_WARMUP_SHAPES", _parse_shapes),
    "consumers": ("IMAGEN_CONSUMERS", int),
    "concurrency": ("IMAGEN_CONCURRENCY", int),
    "poll_interval_s": ("IMAGEN_POLL_INTERVAL_S", _parse_finite_float),
    "lease_s": ("IMAGEN_LEASE_S", _parse_finite_float),
    "max_attempts": ("IMAGEN_MAX_ATTEMPTS", int),
    "retry_base_delay_s": ("IMAGEN_RETRY_BASE_DELAY_S", _parse_finite_float),
    "retry_max_delay_s": ("IMAGEN_RETRY_MAX_DELAY_S", _parse_finite_float),
    "backend_timeout_s": ("IMAGEN_BACKEND_TIMEOUT_S", _parse_finite_float),
    "shutdown_grace_s": ("IMAGEN_SHUTDOWN_GRACE_S", _parse_finite_float),
    "listener_check_interval_s": ("IMAGEN_LISTENER_CHECK_INTERVAL_S", _parse_finite_float),
    "reconnect_max_delay_s": ("IMAGEN_RECONNECT_MAX_DELAY_S", _parse_finite_float),
    "progress_interval_s": ("IMAGEN_PROGRESS_INTERVAL_S", _parse_finite_float),
    "mock_step_s": ("IMAGEN_MOCK_STEP_S", _parse_finite_float),
    "log_format": ("IMAGEN_LOG_FORMAT", str),
    "log_level": ("IMAGEN_LOG_LEVEL", lambda raw: raw.upper()),
}
