"""`imagen demo`: one job through the whole product, on embedded defaults.

Starts (or reuses) the database, applies migrations, starts Ray, the FLUX
deployment and one consumer, inserts a job with plain SQL, waits for it,
prints the job row and where the PNG went, and shuts everything down.
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from typing import Any

from imagen.settings import Settings

logger = logging.getLogger(__name__)

INSERT_JOB = """
INSERT INTO imagen.jobs (prompt, backend, width, height, seed, steps, guidance, owner_user_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
RETURNING id
"""


async def run_demo(settings: Settings, args: Any, *, choose_model, wait_for_job, progress,
                   install_signal_handlers) -> int:
    import asyncpg

    from imagen.service import Service

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
                    args.seed, args.steps, args.guidance, owner))
                say(f"job {job_id} queued; waiting for it")
                row = await wait_for_job(connection, job_id, timeout_s=args.timeout_s)
            finally:
                await connection.close()
    finally:
        await service.stop()

    job = {key: _jsonable(value) for key, value in dict(row).items()}
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
