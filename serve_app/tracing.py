"""OpenTelemetry spans of the model server.

This is the only module of serve_app that touches trace context. Requests
carry W3C trace headers (`traceparent`, `tracestate`) in
`GenerationRequest.trace_context`. Each generation gets a span that is a
child of its job's trace, and each batch gets a span of its own that every
generation span links to, because one batch serves several traces.

Only the OpenTelemetry API is used here. Without a configured tracer
provider every span is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer

from serve_app.requests import GenerationRequest, GenerationResult

TRACER_NAME = "imagen.serve"


def _tracer_or_global(tracer: Tracer | None) -> Tracer:
    # Looked up per call, so a provider installed after import is used.
    return tracer if tracer is not None else trace.get_tracer(TRACER_NAME)


def batch_shape(requests: Sequence[GenerationRequest]) -> str:
    """Describe a batch's shapes as `WIDTHxHEIGHTxSTEPS` items joined by commas, e.g. `1024x1024x4`."""
    shapes = sorted({f"{getattr(request, 'width', 0)}x{getattr(request, 'height', 0)}x{getattr(request, 'steps', 0) or 0}"
                     for request in requests})
    return ",".join(shapes)


def start_batch_span(requests: Sequence[GenerationRequest], tracer: Tracer | None = None) -> Span:
    """Start the span of one batched pipeline run, linked to the span of every job it serves; the caller ends it."""
    links = []
    for request in requests:
        carrier = dict(getattr(request, "trace_context", None) or {})
        job_context = trace.get_current_span(extract(carrier)).get_span_context()
        if job_context.is_valid:
            links.append(Link(job_context, attributes={"imagen.job_id": getattr(request, "job_id", None) or ""}))
    return _tracer_or_global(tracer).start_span(
        "imagen.serve.batch",
        kind=SpanKind.INTERNAL,
        links=links,
        attributes={
            "imagen.batch_size": len(requests),
            "imagen.shapes": batch_shape(requests),
            "imagen.job_ids": [getattr(request, "job_id", None) or "" for request in requests],
        },
    )


def start_generation_span(request: GenerationRequest, batch_span: Span, tracer: Tracer | None = None) -> Span:
    """Start the span of one request's generation inside its job's trace; the caller ends it."""
    trace_context = request.trace_context if isinstance(request, GenerationRequest) else {}
    parent = extract(dict(trace_context or {}))
    attributes = {}
    if isinstance(request, GenerationRequest):
        attributes = {
            "imagen.job_id": request.job_id or "",
            "imagen.width": request.width,
            "imagen.height": request.height,
            # As a string, because a seed may exceed the 64-bit signed range of an int attribute.
            "imagen.seed": str(request.seed),
        }
    return _tracer_or_global(tracer).start_span(
        "imagen.serve.generate",
        context=parent,
        kind=SpanKind.SERVER,
        attributes=attributes,
        links=[Link(batch_span.get_span_context())],
    )


def end_generation_span(span: Span, outcome: GenerationResult | BaseException) -> None:
    """Record the outcome of one generation on its span and end it."""
    if isinstance(outcome, BaseException):
        span.record_exception(outcome)
        span.set_status(Status(StatusCode.ERROR, str(outcome)))
    else:
        span.set_attribute("imagen.steps", outcome.steps)
        span.set_attribute("imagen.batch_size", outcome.batch_size)
        span.set_attribute("imagen.gpu_s", outcome.gpu_s)
    span.end()
