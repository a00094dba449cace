"""`imagen up` with the Go worker's env file, against local fakes of Supabase and Replicate."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from imagen.service import check_health
from imagen.settings import Settings
from tests.db_fixtures import insert_job, wait_for_status, wait_until
from tests.ray_fixtures import free_port

pytestmark = pytest.mark.slow

OWNER = str(uuid.uuid4())


@pytest.fixture
def short_data_dir():
    # Ray's unix socket paths must stay short, so not under pytest's deep temporary root.
    path = Path(tempfile.mkdtemp(prefix="imagen-up-"))
    yield path
    import shutil

    shutil.rmtree(path, ignore_errors=True)


async def test_up_with_go_env_file(dsn, db, fake_supabase, fake_replicate,
                                                                short_data_dir, tmp_path):
    env_file = tmp_path / ".env.imagen-worker"
    env_file.write_text(
        f"IMAGEN_WORKER_DATABASE_URL={dsn}\n"
        f"SUPABASE_URL={fake_supabase.url}\n"
        f"SUPABASE_SERVICE_KEY={fake_supabase.service_key}\n"
        f"IMAGEN_OWNER_USER_ID={OWNER}\n"
        f"REPLICATE_API_TOKEN={fake_replicate.api_token}\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith(("IMAGEN_", "SUPABASE_", "RAY_"))}
    env.update(IMAGEN_DATA_DIR=str(short_data_dir), IMAGEN_MODEL="tiny", IMAGEN_DEVICE="cpu",
               IMAGEN_REPLICATE_BASE_URL=fake_replicate.url, IMAGEN_WARMUP_SHAPES="64x64x2",
               IMAGEN_SHUTDOWN_GRACE_S="5", IMAGEN_LOG_LEVEL="INFO", IMAGEN_SERVE_HTTP_PORT=str(free_port()))
    log = open(tmp_path / "up.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "imagen.cli", "--env-file", str(env_file), "up"],
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    settings = Settings(data_dir=short_data_dir)
    try:
        await wait_until(lambda: process.poll() is not None or check_health(settings)[0], timeout_s=240,
                         what="imagen up healthy")
        assert process.poll() is None, (tmp_path / "up.log").read_text()[-3000:]

        local = await insert_job(db, prompt="local job", backend="flux-schnell-local", width=64, height=64, steps=2)
        hosted = await insert_job(db, prompt="hosted job", backend="flux-schnell-replicate", width=1024,
                                  height=1024)
        for job_id in (local, hosted):
            row = await wait_for_status(db, job_id, timeout_s=120)
            assert row["status"] == "done", row["error"]
        keys = {key for (_bucket, key) in fake_supabase.objects if not key.startswith("_imagen-probe")}
        assert len(keys) == 2
        owners = await db.fetch("SELECT DISTINCT owner_user_id FROM imagen.images")
        assert [str(row["owner_user_id"]) for row in owners] == [OWNER]
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=120)
        log.close()
    assert exit_code == 0, (tmp_path / "up.log").read_text()[-3000:]
    assert await db.fetchval("SELECT count(*) FROM imagen.jobs WHERE status = 'running'") == 0
    assert not check_health(settings)[0]
