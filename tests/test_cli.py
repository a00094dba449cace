"""The `imagen` command, run as a user runs it: a subprocess with environment variables."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from PIL import Image

from tests.db_fixtures import insert_job


def run_imagen(*args: str, env: dict[str, str] | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imagen.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout_s)


@pytest.fixture
def cli_env(dsn, tmp_path) -> dict[str, str]:
    return {"IMAGEN_WORKER_DATABASE_URL": dsn, "IMAGEN_DATA_DIR": str(tmp_path)}


def test_migrate_on_migrated_database_applies_nothing(cli_env):
    result = run_imagen("migrate", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "applied 0 migration(s)" in result.stdout


def test_db_url_prints_configured_url(cli_env, dsn):
    result = run_imagen("db", "url", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == dsn


async def test_submit_queues_job_with_options(cli_env, db):
    owner = str(uuid.uuid4())
    result = run_imagen("submit", "a quiet harbour", "--width", "512", "--height", "256", "--seed", "9",
                        "--backend", "mock", "--owner", owner, env=cli_env)
    assert result.returncode == 0, result.stderr
    row = await db.fetchrow("SELECT * FROM imagen.jobs WHERE id = $1", uuid.UUID(result.stdout.strip()))
    assert (row["prompt"], row["width"], row["height"], row["seed"], row["backend"]) == (
        "a quiet harbour", 512, 256, 9, "mock")
    assert str(row["owner_user_id"]) == owner
    assert row["status"] == "pending"


def test_submit_invalid_size_names_constraint(cli_env):
    result = run_imagen("submit", "x", "--width", "1000", env=cli_env)
    assert result.returncode != 0
    assert "jobs_width_multiple_of_16_from_64_to_2048" in result.stderr


async def test_cancel_pending_job(cli_env, db):
    job_id = await insert_job(db)
    result = run_imagen("cancel", job_id, env=cli_env)
    assert result.returncode == 0, result.stderr
    assert await db.fetchval("SELECT status FROM imagen.jobs WHERE id = $1", uuid.UUID(job_id)) == "cancelled"
    again = run_imagen("cancel", job_id, env=cli_env)
    assert again.returncode == 1
    assert "it is cancelled" in again.stderr


async def test_status_json_lists_counts_and_failures(cli_env, db):
    await insert_job(db)
    failed = await insert_job(db)
    await db.execute("UPDATE imagen.jobs SET status = 'failed', error = 'boom', finished_at = now() WHERE id = $1",
                     uuid.UUID(failed))
    result = run_imagen("status", "--json", env=cli_env)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    counts = {(row["status"], row["backend"]): row["jobs"] for row in status["jobs"]}
    assert counts == {("pending", "mock"): 1, ("failed", "mock"): 1}
    assert status["recent_failures"][0]["error"] == "boom"
    assert status["oldest_pending"] is not None


def test_generate_writes_png_without_queue(tmp_path):
    output = tmp_path / "out" / "one.png"
    result = run_imagen("generate", "a small test", "-o", str(output), "--model", "tiny", "--width", "80",
                        "--height", "64", "--seed", "3", "--steps", "2",
                        env={"IMAGEN_DATA_DIR": str(tmp_path), "IMAGEN_DEVICE": "cpu"}, timeout_s=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["seed"] == 3
    with Image.open(io.BytesIO(output.read_bytes())) as image:
        assert image.size == (80, 64)


def test_generate_rejects_size_not_multiple_of_16(tmp_path):
    result = run_imagen("generate", "x", "-o", str(tmp_path / "x.png"), "--model", "tiny", "--width", "100",
                        env={"IMAGEN_DATA_DIR": str(tmp_path)}, timeout_s=300)
    assert result.returncode != 0
    assert "100" in result.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("IMAGEN_LEASE_S", "abc", "IMAGEN_LEASE_S is invalid"),
        ("IMAGEN_LEASE_S", "1", "IMAGEN_LEASE_S must be at least 3"),
        ("IMAGEN_OWNER_USER_ID", "not-a-uuid", "IMAGEN_OWNER_USER_ID must be a UUID"),
        ("IMAGEN_CONCURRENCY", "0", "IMAGEN_CONCURRENCY must be > 0"),
        ("SUPABASE_URL", "http://127.0.0.1:9", "SUPABASE_SERVICE_KEY is missing"),
    ],
)
def test_invalid_setting_names_variable(cli_env, name, value, expected):
    result = run_imagen("status", env={**cli_env, name: value})
    assert result.returncode == 2
    assert expected in result.stderr


def test_invalid_secret_setting_is_not_echoed(cli_env):
    result = run_imagen("status", env={**cli_env, "IMAGEN_WORKER_DATABASE_URL": "postgresql://u:hunter2@127.0.0.1:9/x"})
    assert result.returncode != 0
    assert "hunter2" not in result.stderr
    assert "hunter2" not in result.stdout


async def test_env_file_in_go_worker_format(dsn, tmp_path, db):
    owner = str(uuid.uuid4())
    env_file = tmp_path / ".env.imagen-worker"
    env_file.write_text(f"# the Go worker's env file\nIMAGEN_WORKER_DATABASE_URL={dsn}\n"
                        f'export IMAGEN_OWNER_USER_ID="{owner}"\n\n')
    env = {key: value for key, value in os.environ.items() if key != "IMAGEN_WORKER_DATABASE_URL"}
    result = subprocess.run([sys.executable, "-m", "imagen.cli", "--env-file", str(env_file), "submit", "hi",
                             "--backend", "mock"], capture_output=True, text=True,
                            env={**env, "IMAGEN_DATA_DIR": str(tmp_path)}, timeout=60)
    assert result.returncode == 0, result.stderr
    row = await db.fetchrow("SELECT owner_user_id FROM imagen.jobs WHERE id = $1", uuid.UUID(result.stdout.strip()))
    assert str(row["owner_user_id"]) == owner


def test_missing_env_file_is_reported(tmp_path):
    result = run_imagen("--env-file", str(tmp_path / "nope.env"), "status")
    assert result.returncode == 2
    assert "nope.env not found" in result.stderr


def test_migrations_ship_inside_package():
    from imagen.migrate import load_migrations, migrations_dir

    assert load_migrations(), "no migration files found"
    assert (migrations_dir() / "compat" / "supabase_compat.sql").exists()
    assert isinstance(migrations_dir(), Path)


@pytest.mark.parametrize("password", ["Hunter2Secret#tail", "Pw9zQk/ssWord9", "Qx7Ry?uery9x"])
def test_password_with_special_characters_is_not_echoed(cli_env, password):
    url = f"postgresql://postgres:{password}@127.0.0.1:1/imagen"
    result = run_imagen("status", env={**cli_env, "IMAGEN_WORKER_DATABASE_URL": url})
    assert result.returncode != 0
    assert "percent-encode" in result.stderr or "cannot reach the database" in result.stderr
    for fragment in (password, password.split("#")[0], password.split("/")[0], password.split("?")[0]):
        assert fragment not in result.stderr
        assert fragment not in result.stdout
    assert "Traceback" not in result.stderr


def test_unreachable_database_is_a_clear_error(cli_env):
    result = run_imagen("status", env={**cli_env, "IMAGEN_WORKER_DATABASE_URL": "postgresql://u@127.0.0.1:1/x"})
    assert result.returncode != 0
    assert "cannot reach the database" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["submit", "x", "--width", "100"], "jobs_width_multiple_of_16_from_64_to_2048"),
        (["submit", "x", "--max-attempts", "0"], "jobs_max_attempts_from_1_to_10"),
        (["submit", "x", "--seed", "-5"], "--seed: must be between 0 and 2**63 - 1"),
        (["submit", "x", "--owner", "bogus"], "--owner: must be a UUID"),
        (["submit", "x", "--wait", "--timeout-s", "nan"], "--timeout-s: must be a positive finite number"),
        (["cancel", "not-a-uuid"], "must be a UUID"),
    ],
)
def test_bad_arguments_get_clear_errors(cli_env, args, expected):
    result = run_imagen(*args, env=cli_env)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("IMAGEN_LEASE_S", "nan", "IMAGEN_LEASE_S is invalid (expected a finite number)"),
        ("IMAGEN_POLL_INTERVAL_S", "inf", "IMAGEN_POLL_INTERVAL_S is invalid (expected a finite number)"),
        ("IMAGEN_WARMUP_SHAPES", "100x100x0", "IMAGEN_WARMUP_SHAPES is invalid"),
        ("IMAGEN_LOG_LEVEL", "bogus", "IMAGEN_LOG_LEVEL must be DEBUG"),
    ],
)
def test_non_finite_and_malformed_settings_rejected(cli_env, name, value, expected):
    result = run_imagen("status", env={**cli_env, name: value})
    assert result.returncode == 2
    assert expected in result.stderr


async def test_env_file_bom_crlf_quotes_and_comments(dsn, tmp_path, db):
    owner = str(uuid.uuid4())
    env_file = tmp_path / "windows.env"
    env_file.write_bytes(
        b"\xef\xbb\xbf" + f"IMAGEN_WORKER_DATABASE_URL='{dsn}' # the database\r\n".encode()
        + f'IMAGEN_OWNER_USER_ID={owner} # comment\r\n'.encode()
        + b'IMAGEN_STORAGE_BUCKET="my bucket" \r\n')
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMAGEN_")}
    result = subprocess.run([sys.executable, "-m", "imagen.cli", "--env-file", str(env_file), "submit", "hi",
                             "--backend", "mock"], capture_output=True, text=True,
                            env={**env, "IMAGEN_DATA_DIR": str(tmp_path)}, timeout=60)
    assert result.returncode == 0, result.stderr
    row = await db.fetchrow("SELECT owner_user_id FROM imagen.jobs WHERE id = $1", uuid.UUID(result.stdout.strip()))
    assert str(row["owner_user_id"]) == owner


def test_env_file_directory_is_reported(tmp_path):
    result = run_imagen("--env-file", str(tmp_path), "status")
    assert result.returncode == 2
    assert "is a directory" in result.stderr


def test_generate_into_directory_is_rejected_before_work(tmp_path):
    result = run_imagen("generate", "x", "-o", str(tmp_path), "--model", "tiny",
                        env={"IMAGEN_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "is a directory" in result.stderr
