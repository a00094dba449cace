"""A minimal OTLP/HTTP trace receiver on 127.0.0.1, for `imagen demo` and the tests.

Spans from every process of the service (the consumer actor, the model
replicas) arrive here over OTLP/HTTP with protobuf bodies, so one job's whole
trace can be printed as a tree. It keeps spans in memory and is not meant
for production use: point OTEL_EXPORTER_OTLP_ENDPOINT at a real collector
there.
"""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class ReceivedSpan:
    """One span as received: ids in hex, attributes as plain Python values."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    service: str
    attributes: dict[str, Any] = field(default_factory=dict)
    links: list[tuple[str, str]] = field(default_factory=list)
    status_code: int = 0

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


class TraceCollector:
    """Receive OTLP/HTTP trace exports at `endpoint` until `stop()`."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self.received = threading.Condition(self._lock)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, name="trace-collector", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def env_vars(self) -> dict[str, str]:
        """OTEL_* variables that send a process's spans here quickly."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }

    def start(self) -> TraceCollector:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add(self, spans: list[ReceivedSpan]) -> None:
        with self.received:
            self.spans.extend(spans)
            self.received.notify_all()

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [span for span in self.spans if span.trace_id == trace_id]

    def wait_for(self, predicate, timeout_s: float) -> bool:
        """Block until `predicate(spans)` is true or `timeout_s` passes; returns the last result."""
        with self.received:
            return self.received.wait_for(lambda: predicate(list(self.spans)), timeout=timeout_s)

    def render_tree(self, trace_id: str) -> str:
        """Render the trace's spans as an indented tree with durations and the service of each."""
        spans = sorted(self.trace(trace_id), key=lambda span: span.start_ns)
        by_parent: dict[str, list[ReceivedSpan]] = {}
        ids = {span.span_id for span in spans}
        for span in spans:
            parent = span.parent_span_id if span.parent_span_id in ids else ""
            by_parent.setdefault(parent, []).append(span)
        lines: list[str] = [f"trace {trace_id}"]

        def walk(parent: str, depth: int) -> None:
            for span in by_parent.get(parent, []):
                lines.append(f"{'  ' * (depth + 1)}{span.name}  {span.duration_ms:.1f} ms  [{span.service}]")
                walk(span.span_id, depth + 1)

        walk("", 0)
        return "\n".join(lines)


def _handler_for(collector: TraceCollector):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            if self.headers.get("Content-Encoding", "") == "gzip":
                body = gzip.decompress(body)
            if self.path.rstrip("/") != "/v1/traces":
                self.send_response(404)
                self.end_headers()
                return
            try:
                collector.add(_decode(body))
            except Exception:  # noqa: BLE001 - a malformed export is answered, not fatal
                self.send_response(400)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return None

    return Handler


def _decode(body: bytes) -> list[ReceivedSpan]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(ReceivedSpan(
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(),
                    name=span.name,
                    kind=span.kind,
                    start_ns=span.start_time_unix_nano,
                    end_ns=span.end_time_unix_nano,
                    service=service,
                    attributes=_attributes(span.attributes),
                    links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                    status_code=span.status.code,
                ))
    return spans


def _attributes(key_values) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key_value in key_values:
        value = key_value.value
        kind = value.WhichOneof("value")
        if kind == "array_value":
            values[key_value.key] = [getattr(item, item.WhichOneof("value")) for item in value.array_value.values]
        elif kind is not None:
            values[key_value.key] = getattr(value, kind)
    return values
