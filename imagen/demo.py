"""`imagen demo`: one job through the whole product, on embedded defaults.

Starts (or reuses) the database, applies migrations, starts Ray, the FLUX
deployment and one consumer, inserts a job with plain SQL, waits for it,
prints the job row and where the PNG went, and shuts everything down.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import uuid
from typing import Any

from imagen.settings import Settings

logger = logging.getLogger(__name__)

INSERT_JOB = """
INSERT INTO imagen.jobs (prompt, backend, width, height, seed, steps, guidance, owner_user_id, traceparent)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
RETURNING id
"""

# Seconds to wait for the replica's spans after the job is done.
SPAN_WAIT_S = 10.0


def jsonable_row(row: dict[str, Any]) -> dict[str, Any]:
    """Return the row with every value JSON can carry as is, and the rest (UUIDs, times) as text."""
    return {key: value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
            for key, value in row.items()}


async def run_demo(settings: Settings, args: Any, *, choose_model, wait_for_job, progress,
                   install_signal_handlers) -> int:
    import asyncpg

    from imagen.service import Service

    collector = _start_collector()
    trace_id = secrets.token_hex(16)
    # As a web UI would, the demo stores a traceparent on the job, so the job's trace continues it.
    traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"

    model = choose_model(settings, args.model)
    tiny = model == "tiny"
    # The tiny model's images are noise at any size; a small one keeps the demo quick.
    default_size = 256 if tiny else 1024
    settings = settings.replace(model=model, consumers=1)
    service = Service(settings)
    row = None
    try:
        with progress(True) as say:
            await service.start(migrate=True, progress=say)
            connection = await asyncpg.connect(service.dsn)
            try:
                owner = uuid.UUID(settings.owner_user_id) if settings.owner_user_id else None
                job_id = str(await connection.fetchval(
                    INSERT_JOB, args.prompt, args.backend, args.width or default_size, args.height or default_size,
                    args.seed, args.steps, args.guidance, owner, traceparent))
                say(f"job {job_id} queued; waiting for it")
                row = await wait_for_job(connection, job_id, timeout_s=args.timeout_s)
            finally:
                await connection.close()
    finally:
        await service.stop()
        if collector is not None:
            _print_trace(collector, trace_id)
            collector.stop()

    job = jsonable_row(dict(row))
    print(json.dumps(job, indent=2, ensure_ascii=False))
    if row["status"] != "done":
        print(f"job {job['id']} ended {row['status']}: {row['error']}", file=sys.stderr)
        return 1
    if settings.uses_supabase_storage:
        print(f"image: {settings.supabase_url}/storage/v1/object/{row['storage_bucket']}/{row['storage_key']}")
    else:
        print(f"image: {settings.local_output_dir / row['storage_key']}")
    if tiny:
        print("note: the tiny model has random weights, so this image is noise; set IMAGEN_MODEL for real images",
              file=sys.stderr)
    return 0


def _start_collector():
    """Receive the service's spans in this process, unless OTEL_* variables send them elsewhere."""
    from imagen.telemetry import tracing_requested
    from imagen.trace_collector import TraceCollector

    if tracing_requested():
        return None
    collector = TraceCollector().start()
    # Read by the consumer actor and the replicas, which start after this.
    os.environ.update(collector.env_vars())
    return collector


def _print_trace(collector, trace_id: str) -> None:
    collector.wait_for(lambda spans: any(span.trace_id == trace_id and span.service == "imagen-serve"
                                         for span in spans), timeout_s=SPAN_WAIT_S)
    if not collector.trace(trace_id):
        print("no spans were received for the job's trace", file=sys.stderr)
        return
    print(collector.render_tree(trace_id), file=sys.stderr)
