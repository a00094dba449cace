"""Chaos soak: many jobs through several consumer processes while consumers, connections and the database die.

The soak starts its own embedded PostgreSQL server in a temporary directory,
runs `imagen consume --no-serve` processes with the mock backend, inserts
jobs at a steady rate and, until every job is in, at random:

- kills a consumer with SIGKILL and starts a replacement,
- terminates every database connection of the consumers,
- restarts the database server.

When the last job is in, the chaos stops and the soak waits for the queue to
drain. It then reports jobs lost (inserted but missing, or done without an
image row or file), duplicated (more than one image row or object per job,
or image files no row refers to), stuck (still pending or running when the
drain timeout passes), failed, and the time to drain.

    python bench/soak.py --jobs 2000 --consumers 3 --seed 1
    python bench/soak.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from imagen.embedded_db import EmbeddedPostgres, prepare_data_dir  # noqa: E402
from imagen.migrate import migrate  # noqa: E402

CONNECTION_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                     asyncio.TimeoutError)


@dataclass
class SoakConfig:
    jobs: int
    consumers: int
    insert_rate_per_s: float
    chaos_interval_s: float
    drain_timeout_s: float
    seed: int
    max_attempts: int
    lease_s: float


@dataclass
class ChaosLog:
    """Counts of the faults the chaos loop caused, by kind."""

    kills: int = 0
    terminations: int = 0
    restarts: int = 0
    events: list[str] = field(default_factory=list)


class ConsumerPool:
    """Consumer processes that can be killed and replaced."""

    def __init__(self, dsn: str, work_dir: Path, count: int, lease_s: float) -> None:
        self.dsn = dsn
        self.work_dir = work_dir
        self.count = count
        self.lease_s = lease_s
        self.processes: list[subprocess.Popen] = []
        self._started = 0

    def start(self) -> None:
        for _ in range(self.count):
            self.processes.append(self._spawn())

    def _spawn(self) -> subprocess.Popen:
        self._started += 1
        env = {
            **{key: value for key, value in os.environ.items() if not key.startswith(("IMAGEN_", "OTEL_"))},
            "IMAGEN_WORKER_DATABASE_URL": self.dsn,
            "IMAGEN_DATA_DIR": str(self.work_dir),
            "IMAGEN_OUTPUT_DIR": str(self.work_dir / "images"),
            "IMAGEN_LEASE_S": str(self.lease_s),
            "IMAGEN_POLL_INTERVAL_S": "1",
            "IMAGEN_LISTENER_CHECK_INTERVAL_S": "1",
            "IMAGEN_RECONNECT_MAX_DELAY_S": "1",
            "IMAGEN_RETRY_BASE_DELAY_S": "0.2",
            "IMAGEN_RETRY_MAX_DELAY_S": "2",
            "IMAGEN_MOCK_STEP_S": "0.005",
            "IMAGEN_CONCURRENCY": "8",
            "IMAGEN_LOG_LEVEL": "WARNING",
        }
        log = open(self.work_dir / f"consumer-{self._started}.log", "wb")
        return subprocess.Popen([sys.executable, "-m", "imagen.cli", "consume", "--no-serve"], env=env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)

    def kill_one(self, rng: random.Random) -> None:
        index = rng.randrange(len(self.processes))
        victim = self.processes[index]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        self.processes[index] = self._spawn()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


async def produce(dsn: str, config: SoakConfig, inserted: list[str]) -> None:
    """Insert `config.jobs` jobs at the configured rate, reconnecting through outages."""
    interval_s = 1.0 / config.insert_rate_per_s
    connection = None
    next_at = time.monotonic()
    while len(inserted) < config.jobs:
        try:
            if connection is None or connection.is_closed():
                connection = await asyncpg.connect(dsn, timeout=2)
            job_id = await connection.fetchval(
                "INSERT INTO imagen.jobs (prompt, backend, width, height, steps, max_attempts) "
                "VALUES ($1, 'mock', 64, 64, $2, $3) RETURNING id",
                f"soak job {len(inserted)}", 1 + len(inserted) % 4, config.max_attempts)
            inserted.append(str(job_id))
        except CONNECTION_ERRORS:
            # NOTE: an INSERT whose commit landed but whose reply was lost is not
            # in `inserted`, so the report counts it as an extra job, not a loss.
            if connection is not None:
                connection.terminate()
            connection = None
            await asyncio.sleep(0.05)
            continue
        next_at += interval_s
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    if connection is not None:
        await connection.close()


async def chaos(server: EmbeddedPostgres, dsn: str, pool: ConsumerPool, config: SoakConfig, stop: asyncio.Event,
                log: ChaosLog) -> None:
    rng = random.Random(config.seed)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=rng.uniform(0.5, 1.5) * config.chaos_interval_s)
            return
        except asyncio.TimeoutError:
            pass
        fault = rng.choices(["kill", "terminate", "restart"], weights=[4, 3, 2])[0]
        if fault == "kill":
            await asyncio.to_thread(pool.kill_one, rng)
            log.kills += 1
        elif fault == "terminate":
            try:
                admin = await asyncpg.connect(dsn, timeout=2)
                try:
                    await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                        "WHERE application_name LIKE 'imagen-%' AND pid <> pg_backend_pid()")
                finally:
                    await admin.close()
                log.terminations += 1
            except CONNECTION_ERRORS:
                continue
        else:
            await asyncio.to_thread(server.restart)
            log.restarts += 1
        log.events.append(f"{time.strftime('%H:%M:%S')} {fault}")


async def wait_drained(dsn: str, timeout_s: float) -> float:
    """Wait until no job is pending or running; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            connection = await asyncpg.connect(dsn, timeout=2)
            try:
                open_jobs = await connection.fetchval(
                    "SELECT count(*) FROM imagen.jobs WHERE status IN ('pending', 'running')")
            finally:
                await connection.close()
            if open_jobs == 0:
                return time.monotonic() - started
        except CONNECTION_ERRORS:
            pass
        await asyncio.sleep(0.2)
    return float("nan")


async def report(dsn: str, inserted: list[str], images_dir: Path) -> dict[str, object]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT j.id, j.status, j.error, count(i.id) AS images, min(i.storage_key) AS storage_key "
            "FROM imagen.jobs AS j LEFT JOIN imagen.images AS i ON i.job_id = j.id GROUP BY j.id")
    finally:
        await connection.close()
    by_id = {str(row["id"]): row for row in rows}
    referenced = {row["storage_key"] for row in rows if row["storage_key"]}
    files = {str(path.relative_to(images_dir)) for path in images_dir.rglob("*.png")} if images_dir.exists() else set()

    missing = [job_id for job_id in inserted if job_id not in by_id]
    done_without_image = [row for row in rows if row["status"] == "done"
                          and (row["images"] != 1 or row["storage_key"] not in files)]
    return {
        "inserted": len(inserted),
        "rows": len(rows),
        "done": sum(1 for row in rows if row["status"] == "done"),
        "failed": sum(1 for row in rows if row["status"] == "failed"),
        "lost": len(missing) + len(done_without_image),
        "duplicated": sum(1 for row in rows if row["images"] > 1) + len(files - referenced),
        "stuck": sum(1 for row in rows if row["status"] in ("pending", "running")),
        "failure_errors": sorted({row["error"] for row in rows if row["status"] == "failed"}),
    }


async def run(config: SoakConfig) -> dict[str, object]:
    work_dir = Path(tempfile.mkdtemp(prefix="imagen-soak-"))
    prepare_data_dir(work_dir)
    server = EmbeddedPostgres(work_dir)
    dsn = server.start()
    await migrate(dsn)
    pool = ConsumerPool(dsn, work_dir, config.consumers, config.lease_s)
    log = ChaosLog()
    inserted: list[str] = []
    try:
        pool.start()
        stop_chaos = asyncio.Event()
        chaos_task = asyncio.create_task(chaos(server, dsn, pool, config, stop_chaos, log))
        started = time.monotonic()
        await produce(dsn, config, inserted)
        produced_s = time.monotonic() - started
        stop_chaos.set()
        await chaos_task
        drain_s = await wait_drained(dsn, config.drain_timeout_s)
        figures = await report(dsn, inserted, work_dir / "images")
    finally:
        pool.stop()
        server.stop("fast")
    shutil.rmtree(work_dir, ignore_errors=True)
    return {**figures, "produce_s": round(produced_s, 1), "drain_s": round(drain_s, 1), "kills": log.kills,
            "terminations": log.terminations, "restarts": log.restarts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="jobs to insert")
    parser.add_argument("--consumers", type=int, default=3, help="consumer processes")
    parser.add_argument("--insert-rate-per-s", type=float, default=60.0, help="jobs inserted per second")
    parser.add_argument("--chaos-interval-s", type=float, default=3.0, help="mean seconds between faults")
    parser.add_argument("--drain-timeout-s", type=float, default=300.0, help="seconds to wait for the queue to drain")
    parser.add_argument("--max-attempts", type=int, default=10, help="max_attempts of every job")
    parser.add_argument("--lease-s", type=float, default=5.0, help="IMAGEN_LEASE_S of the consumers")
    parser.add_argument("--seed", type=int, default=1, help="seed of the chaos schedule")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: 60 jobs, 2 consumers")
    args = parser.parse_args()
    if args.smoke:
        args.jobs, args.consumers, args.insert_rate_per_s, args.chaos_interval_s = 60, 2, 40.0, 0.5
    config = SoakConfig(jobs=args.jobs, consumers=args.consumers, insert_rate_per_s=args.insert_rate_per_s,
                        chaos_interval_s=args.chaos_interval_s, drain_timeout_s=args.drain_timeout_s,
                        seed=args.seed, max_attempts=args.max_attempts, lease_s=args.lease_s)
    figures = asyncio.run(run(config))

    width = max(len(key) for key in figures)
    print("imagen chaos soak")
    for key, value in figures.items():
        print(f"  {key:<{width}}  {value}")
    clean = figures["lost"] == 0 and figures["duplicated"] == 0 and figures["stuck"] == 0
    print("result: " + ("0 lost, 0 duplicated, 0 stuck" if clean else "FAULTS FOUND"))
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
