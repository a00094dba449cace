"""OpenTelemetry set-up shared by the consumer and the model replicas.

Export follows the standard `OTEL_*` environment variables. Without
`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
`OTEL_TRACES_EXPORTER`, no tracer provider is installed: every span is the
API's no-op and costs next to nothing. `OTEL_TRACES_EXPORTER=none` turns
export off even when an endpoint is set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.propagate import extract, inject

logger = logging.getLogger(__name__)

# Maximum seconds to wait for the collector when flushing at shutdown.
DEFAULT_FLUSH_TIMEOUT_S = 5.0

_provider = None


def tracing_requested(environ: Mapping[str, str] | None = None) -> bool:
    """True when the OTEL_* variables ask for trace export."""
    env = os.environ if environ is None else environ
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none" or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(exporter or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def otel_env_vars(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the OTEL_* variables of this process, to pass to Ray actors and replicas."""
    env = os.environ if environ is None else environ
    return {key: value for key, value in env.items() if key.startswith("OTEL_")}


def configure_tracing(service_name: str, *, exporter=None, instrument_asyncpg: bool = True):
    """Install a tracer provider for this process and return it, or None when export is off.

    `exporter` overrides the OTLP exporter (tests pass an in-memory one, which
    is exported synchronously). Calling again replaces nothing: the first
    provider of a process stays.
    """
    global _provider
    if _provider is not None:
        return _provider
    if exporter is None and not tracing_requested():
        return None

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter()))
    trace.set_tracer_provider(provider)
    _provider = provider

    if instrument_asyncpg:
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        AsyncPGInstrumentor().instrument(tracer_provider=provider)
    logger.info("tracing configured", extra={"event": "tracing_configured", "service": service_name})
    return provider


def _otlp_exporter():
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter_name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    # Without an explicit OTEL_EXPORTER_OTLP_TIMEOUT, one export waits at most
    # DEFAULT_FLUSH_TIMEOUT_S instead of the SDK's 10 s, which bounds the last
    # export at shutdown when the collector is unreachable.
    explicit = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or os.environ.get("OTEL_EXPORTER_OTLP_TIMEOUT")
    options = {} if explicit else {"timeout": DEFAULT_FLUSH_TIMEOUT_S}
    if protocol.startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(**options)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(**options)


def shutdown_tracing(timeout_s: float = DEFAULT_FLUSH_TIMEOUT_S) -> None:
    """Flush pending spans, waiting at most `timeout_s` for an unreachable collector, then stop export."""
    global _provider
    provider, _provider = _provider, None
    if provider is None:
        return
    flushed = provider.force_flush(timeout_millis=int(timeout_s * 1000))
    if not flushed:
        logger.warning("spans not flushed within %.1f s; the collector may be unreachable", timeout_s,
                       extra={"event": "tracing_flush_timeout"})
    # shutdown() exports what is left once more; with an unreachable collector
    # that export is bounded by the exporter's timeout (see _otlp_exporter).
    provider.shutdown()


def inject_context() -> dict[str, str]:
    """W3C trace headers of the current span, for carrying across the Ray boundary."""
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier


def extract_context(traceparent: str | None, tracestate: str | None = None):
    """Context of a producer's span from its W3C headers; None when there are none."""
    if not traceparent:
        return None
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    return extract(carrier)


class TraceIdFilter(logging.Filter):
    """Add the current span's trace id to every log record that has one."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid and not hasattr(record, "trace_id"):
            record.trace_id = format(context.trace_id, "032x")
        return True
