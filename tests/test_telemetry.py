"""Traces and metrics: one trace per job across the Ray boundary, flushed on SIGTERM, counted in Ray."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from consumer.backends import build_backends
from consumer.storage import LocalStore
from consumer.worker import Consumer
from imagen.trace_collector import TraceCollector
from tests.consumer_fixtures import fast_settings
from tests.db_fixtures import insert_job, wait_for_status, wait_until

PRODUCER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PRODUCER_SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture(scope="session")
def span_exporter() -> InMemorySpanExporter:
    """The test process's spans, kept in memory for the whole session."""
    from imagen.telemetry import configure_tracing

    exporter = InMemorySpanExporter()
    provider = configure_tracing("imagen-consumer-test", exporter=exporter)
    if provider is None:
        pytest.fail("tracing was not configured")
    return exporter


@pytest.fixture
def collector():
    collector = TraceCollector().start()
    yield collector
    collector.stop()


def _consume_process(dsn: str, tmp_path, extra_env: dict[str, str]) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    env.update(IMAGEN_WORKER_DATABASE_URL=dsn, IMAGEN_DATA_DIR=str(tmp_path), IMAGEN_POLL_INTERVAL_S="0.5",
               IMAGEN_SHUTDOWN_GRACE_S="2", OTEL_SERVICE_NAME="imagen-consumer", **extra_env)
    log = open(tmp_path / "consume.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "imagen.cli", "consume", "--no-serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)


async def test_spans_flushed_on_sigterm(dsn, db, tmp_path, collector):
    # Spans are exported every ten minutes, so only the flush at shutdown can deliver them.
    process = _consume_process(dsn, tmp_path, {**collector.env_vars(), "OTEL_BSP_SCHEDULE_DELAY": "600000"})
    try:
        job_id = await insert_job(db, traceparent=f"00-{PRODUCER_TRACE_ID}-{PRODUCER_SPAN_ID}-01")
        row = await wait_for_status(db, job_id, timeout_s=30)
        assert row["status"] == "done"
        assert collector.spans == []
    finally:
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=60)
    assert exit_code == 0
    names = {span.name for span in collector.trace(PRODUCER_TRACE_ID)}
    assert {"process imagen.jobs", "claim", "prepare", "generate", "record", "upload"} <= names


async def test_sigterm_with_unreachable_collector_exits_in_bounded_time(dsn, db, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    process = _consume_process(dsn, tmp_path, {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{closed_port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_BSP_SCHEDULE_DELAY": "600000"})
    try:
        job_id = await insert_job(db)
        assert (await wait_for_status(db, job_id, timeout_s=30))["status"] == "done"
    finally:
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=60)
    assert exit_code == 0
    # The flush waits at most 5 s and the final export at most 5 s more.
    assert time.monotonic() - started < 20


async def test_job_trace_continues_producer_and_spans_replica(dsn, db, tmp_path, serve_handle, span_exporter,
                                                              serve_trace_collector):
    settings = fast_settings(tmp_path, model="tiny", lease_s=30.0)
    consumer = Consumer(settings, dsn, build_backends(settings, get_serve_handle=lambda: serve_handle),
                        LocalStore(settings.local_output_dir))
    await consumer.start()
    try:
        traceparent = f"00-{PRODUCER_TRACE_ID}-{PRODUCER_SPAN_ID}-01"
        job_id = await insert_job(db, backend="flux-schnell-local", width=64, height=64, steps=2,
                                  traceparent=traceparent)
        row = await wait_for_status(db, job_id, timeout_s=120)
        assert row["status"] == "done", row["error"]
    finally:
        await consumer.stop(grace_s=5.0)

    spans = [span for span in span_exporter.get_finished_spans()
             if span.attributes.get("imagen.job.id") == job_id]
    by_name = {span.name: span for span in spans}
    job_span = by_name["process imagen.jobs"]

    # One trace, continued from the producer's traceparent.
    assert {format(span.context.trace_id, "032x") for span in spans} == {PRODUCER_TRACE_ID}
    assert format(job_span.parent.span_id, "016x") == PRODUCER_SPAN_ID
    for name in ("claim", "prepare", "generate", "record"):
        assert by_name[name].parent.span_id == job_span.context.span_id, name
    assert by_name["upload"].parent.span_id == by_name["record"].context.span_id
    assert job_span.attributes["imagen.outcome"] == "done"
    assert job_span.attributes["messaging.operation.type"] == "process"
    assert by_name["claim"].attributes["imagen.queued_s"] >= 0
    db_spans = [span for span in span_exporter.get_finished_spans()
                if span.attributes.get("db.system") == "postgresql"
                and format(span.context.trace_id, "032x") == PRODUCER_TRACE_ID]
    assert db_spans, "asyncpg calls of the job are not traced"

    # The replica's spans sit inside the same trace, under the consumer's generate span.
    generate_id = format(by_name["generate"].context.span_id, "016x")
    assert serve_trace_collector.wait_for(
        lambda received: any(s.trace_id == PRODUCER_TRACE_ID and s.parent_span_id == generate_id
                             for s in received), timeout_s=30)
    replica_spans = [span for span in serve_trace_collector.trace(PRODUCER_TRACE_ID)
                     if span.parent_span_id == generate_id]
    assert replica_spans[0].service == "imagen-serve"
    batch_spans = [span for span in serve_trace_collector.spans
                   if (PRODUCER_TRACE_ID, generate_id) in span.links]
    assert len(batch_spans) == 1
    assert batch_spans[0].attributes["imagen.batch_size"] >= 1
    assert batch_spans[0].attributes["imagen.shapes"]


def _metrics_text() -> str:
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


async def test_job_metrics_reach_ray_metrics_endpoint(dsn, db, tmp_path, serve_handle):
    from consumer.metrics import RayMetricsObserver

    settings = fast_settings(tmp_path, model="tiny", lease_s=3.0)
    consumer = Consumer(settings, dsn, build_backends(settings, get_serve_handle=lambda: serve_handle),
                        LocalStore(settings.local_output_dir), observer=RayMetricsObserver())
    await consumer.start()
    try:
        job_id = await insert_job(db, backend="flux-schnell-local", width=64, height=64, steps=2)
        assert (await wait_for_status(db, job_id, timeout_s=120))["status"] == "done"
        await insert_job(db, backend="no-such-backend")

        def exported() -> bool:
            text = _metrics_text()
            return ('ray_imagen_jobs_total{' in text and 'outcome="done"' in text and 'outcome="failed"' in text
                    and "ray_imagen_pickup_latency_s_bucket" in text and "ray_imagen_batch_size" in text
                    and "ray_imagen_queue_pending_jobs" in text)

        await wait_until(lambda: asyncio.to_thread(exported), timeout_s=90, what="metrics exported")
    finally:
        await consumer.stop(grace_s=2.0)

    text = _metrics_text()
    done_lines = [line for line in text.splitlines()
                  if line.startswith("ray_imagen_jobs_total{") and 'outcome="done"' in line
                  and 'backend="flux-schnell-local"' in line]
    assert done_lines
    assert "ray_imagen_job_gpu_s_bucket" in text
    assert "ray_imagen_queue_pending_jobs" in text
    assert "ray_imagen_batch_duration_s_bucket" in text
    assert uuid.UUID(job_id)
