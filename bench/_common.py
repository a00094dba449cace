"""Shared parts of the queue benchmarks in this folder.

The scripts import this module for a private PostgreSQL server, bench
databases on it, the child processes that run consumers and procrastinate
workers, and the statistics and tables they print.

Run as a script, this file is one of those child processes:

    python bench/_common.py consume --store null --concurrency 8
    python bench/_common.py procrastinate-worker --concurrency 8

Both read the database URL from IMAGEN_WORKER_DATABASE_URL, print `ready` on
stdout once they take jobs, and stop on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit, urlunsplit

import asyncpg

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # A child process started as `python bench/_common.py` has bench/ on its path, not the repository root.
    sys.path.insert(0, str(REPO_ROOT))

from consumer.backends import BackendOutput, BackendRegistry, BackendSpec, JobContext  # noqa: E402
from consumer.backends.mock import MockBackend, solid_png  # noqa: E402
from consumer.observer import NULL_OBSERVER, Observer  # noqa: E402
from serve_app.requests import GenerationRequest, GenerationResult  # noqa: E402

PROCRASTINATE_TASK = "bench_noop"
JOB_SIZE_PX = 64
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
CHILD_SCRIPT = Path(__file__).resolve()


# --------------------------------------------------------------------- server and databases


class BenchServer:
    """An embedded PostgreSQL server in a fresh directory under /tmp, stopped and deleted on exit.

    `track_commit_timestamp = on` makes `pg_xact_commit_timestamp(xid)` return
    the commit time of every transaction, so the scripts measure from commits
    on the server's clock. `pg_stat_statements` is loaded only when asked,
    because it adds work to every statement.
    """

    def __init__(self, *, pg_stat_statements: bool = False) -> None:
        self._pg_stat_statements = pg_stat_statements
        self._directory: Path | None = None
        self._server = None
        self.admin_url = ""

    async def __aenter__(self) -> BenchServer:
        from imagen.embedded_db import EmbeddedPostgres, prepare_data_dir

        self._directory = Path(tempfile.mkdtemp(prefix="imagen-bench-pg-", dir="/tmp"))
        prepare_data_dir(self._directory)
        self._server = EmbeddedPostgres(self._directory)
        url = await asyncio.to_thread(self._server.start)
        self.admin_url = with_database(url, "postgres")

        connection = await asyncpg.connect(self.admin_url)
        try:
            await connection.execute("ALTER SYSTEM SET track_commit_timestamp = on")
            if self._pg_stat_statements:
                await connection.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        finally:
            await connection.close()
        # Both settings take effect only at server start.
        await asyncio.to_thread(self._server.restart)
        return self

    async def __aexit__(self, *_exc_info) -> None:
        if self._server is not None:
            await asyncio.to_thread(self._server.stop, "immediate")
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)

    @property
    def postmaster_pid(self) -> int:
        """Return the pid of the server's postmaster, whose children are the backends and helpers."""
        pid_file = self._server.pgdata / "postmaster.pid"
        return int(pid_file.read_text().splitlines()[0])

    async def version(self) -> str:
        connection = await asyncpg.connect(self.admin_url)
        try:
            return await connection.fetchval("SHOW server_version")
        finally:
            await connection.close()


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


async def create_database(admin_url: str, prefix: str) -> str:
    """Create an empty database named `<prefix>_<random>` and return its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(f"CREATE DATABASE {name}")
    finally:
        await connection.close()
    return with_database(admin_url, name)


async def drop_database(admin_url: str, url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await connection.close()


async def create_imagen_database(admin_url: str) -> str:
    """Create a database with imagen's migrations applied and return its URL."""
    from imagen.migrate import migrate

    url = await create_database(admin_url, "bench_imagen")
    await migrate(url)
    return url


async def create_procrastinate_database(admin_url: str) -> str:
    """Create a database with procrastinate's schema applied and return its URL."""
    url = await create_database(admin_url, "bench_procrastinate")
    app = build_procrastinate_app(url, pool_max_size=2)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
    return url


# --------------------------------------------------------------------- imagen test doubles


NOOP_SPEC = BackendSpec(name="noop", kind="mock", model="noop", default_steps=1, max_steps=100,
                        supports_guidance=True)


class NoopBackend:
    """A backend that returns a cached grey PNG of the requested size and reports no progress.

    The `mock` backend reports progress for every step, which the consumer
    may store with an UPDATE. This backend leaves only the queue's own work.
    """

    spec = NOOP_SPEC

    async def generate(self, request: GenerationRequest, context: JobContext) -> BackendOutput:
        steps = request.steps or self.spec.default_steps
        png = solid_png(request.width, request.height, (128, 128, 128))
        result = GenerationResult(png=png, width=request.width, height=request.height, seed=request.seed,
                                  steps=steps, guidance=request.guidance, model=self.spec.model, gpu_s=0.0)
        return BackendOutput(result=result)

    async def close(self) -> None:
        return None


class NullStore:
    """An object store that keeps nothing, so `put` returns at once."""

    kind = "null"
    bucket = "bench-null"

    async def check_writable(self) -> None:
        return None

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        return None

    async def delete(self, key: str) -> None:
        return None

    async def close(self) -> None:
        return None


def bench_backends() -> BackendRegistry:
    return BackendRegistry({"mock": MockBackend(), "noop": NoopBackend()})


class JobReportingObserver(Observer):
    """An observer that writes `claimed <job id> <unix time>` and `<outcome> <job id> <unix time>` lines."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def job_claimed(self, job) -> None:
        self._write("claimed", job.id)

    def job_finished(self, job, outcome: str, duration_s: float) -> None:
        self._write(outcome, job.id)

    def _write(self, event: str, job_id: str) -> None:
        self._stream.write(f"{event} {job_id} {time.time():.6f}\n")
        self._stream.flush()


# --------------------------------------------------------------------- procrastinate


def build_procrastinate_app(dsn: str, *, pool_max_size: int):
    """Return a procrastinate App on `dsn` with one task, `bench_noop`, that does nothing."""
    import procrastinate

    connector = procrastinate.PsycopgConnector(conninfo=dsn, min_size=1, max_size=pool_max_size)
    app = procrastinate.App(connector=connector)

    @app.task(name=PROCRASTINATE_TASK)
    async def bench_noop() -> None:
        return None

    return app


# --------------------------------------------------------------------- child processes


@dataclass
class ChildProcess:
    """A consumer or worker process started by `start_child`, which writes its stderr to `log_path`."""

    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Send SIGTERM, wait for the exit and return the exit code. The process is killed after `timeout_s`."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), timeout=timeout_s)
        except asyncio.TimeoutError:
            self.process.kill()
            return await self.process.wait()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""


async def start_child(role_args: Sequence[str], dsn: str, log_path: Path) -> ChildProcess:
    """Start `python bench/_common.py ROLE_ARGS...` and wait for its `ready` line."""
    environment = {**os.environ, "IMAGEN_WORKER_DATABASE_URL": dsn}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(CHILD_SCRIPT), *role_args,
            stdout=asyncio.subprocess.PIPE, stderr=log_file, env=environment,
            # A large line limit: job lines arrive in bursts when the parent reads late.
            limit=1 << 20,
        )
    child = ChildProcess(process=process, log_path=log_path)
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout=READY_TIMEOUT_S)
    except asyncio.TimeoutError:
        line = b""
    if line.strip() != b"ready":
        await child.stop(timeout_s=5.0)
        raise RuntimeError(f"child {' '.join(role_args)} did not become ready; its log ends with:\n"
                           f"{child.log_tail()}")
    return child


def imagen_consumer_args(*, store: str, concurrency: int, log_level: str, output_dir: Path,
                         report_jobs: bool = False) -> list[str]:
    args = ["consume", "--store", store, "--concurrency", str(concurrency), "--log-level", log_level,
            "--output-dir", str(output_dir)]
    if report_jobs:
        args.append("--report-jobs")
    return args


def procrastinate_worker_args(*, concurrency: int, log_level: str) -> list[str]:
    return ["procrastinate-worker", "--concurrency", str(concurrency), "--log-level", log_level]


async def _run_consumer_child(args: argparse.Namespace) -> int:
    from consumer.storage import LocalStore
    from consumer.worker import Consumer
    from imagen.logs import configure_logging
    from imagen.settings import Settings

    dsn = os.environ["IMAGEN_WORKER_DATABASE_URL"]
    settings = Settings(database_url=dsn, data_dir=args.output_dir, output_dir=args.output_dir / "images",
                        concurrency=args.concurrency, log_level=args.log_level)
    configure_logging(settings.log_level, settings.log_format)
    store = NullStore() if args.store == "null" else LocalStore(settings.local_output_dir)
    observer = JobReportingObserver(sys.stdout) if args.report_jobs else NULL_OBSERVER
    consumer = Consumer(settings, dsn, bench_backends(), store, observer=observer)

    stop = _stop_on_sigterm()
    await consumer.start()
    _announce_ready()
    await stop.wait()
    await consumer.stop()
    return 0


async def _run_procrastinate_child(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    dsn = os.environ["IMAGEN_WORKER_DATABASE_URL"]
    app = build_procrastinate_app(dsn, pool_max_size=args.concurrency + 2)
    stop = _stop_on_sigterm()
    async with app.open_async():
        worker = asyncio.create_task(app.run_worker_async(concurrency=args.concurrency,
                                                          install_signal_handlers=False))
        await _wait_for_procrastinate_worker(dsn, worker)
        _announce_ready()
        await stop.wait()
        worker.cancel()
        try:
            await worker
        except asyncio.CancelledError:
            pass
    return 0


async def _wait_for_procrastinate_worker(dsn: str, worker: asyncio.Task) -> None:
    """Wait until the worker's LISTEN connection shows up in pg_stat_activity."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    connection = await asyncpg.connect(dsn)
    try:
        while time.monotonic() < deadline:
            if worker.done():
                worker.result()
                raise RuntimeError("the procrastinate worker stopped before it became ready")
            listeners = await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
            )
            if listeners > 0:
                return
            await asyncio.sleep(0.05)
    finally:
        await connection.close()
    raise RuntimeError(f"the procrastinate worker did not LISTEN within {READY_TIMEOUT_S:g} s")


def _stop_on_sigterm() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    return stop


def _announce_ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


def _child_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="A child process of the queue benchmarks.")
    roles = parser.add_subparsers(dest="role", required=True)

    consume = roles.add_parser("consume", help="run one imagen Consumer with the mock and noop backends")
    consume.add_argument("--store", choices=["local", "null"], default="local",
                         help="local: write PNG files under --output-dir; null: keep nothing")
    consume.add_argument("--concurrency", type=int, default=8, help="jobs in flight at once")
    consume.add_argument("--log-level", default="INFO", help="imagen's log level (records go to stderr)")
    consume.add_argument("--output-dir", type=Path, required=True, help="directory for PNG files")
    consume.add_argument("--report-jobs", action="store_true",
                         help="print a line per claimed and finished job on stdout")

    worker = roles.add_parser("procrastinate-worker", help="run one procrastinate worker with a no-op task")
    worker.add_argument("--concurrency", type=int, default=8, help="jobs in flight at once")
    worker.add_argument("--log-level", default="INFO", help="the log level (records go to stderr)")
    return parser


def child_main(argv: list[str] | None = None) -> int:
    args = _child_parser().parse_args(argv)
    if args.role == "consume":
        return asyncio.run(_run_consumer_child(args))
    return asyncio.run(_run_procrastinate_child(args))


# --------------------------------------------------------------------- statistics and output


def process_cpu_s(pid: int) -> float:
    """Return the user plus system CPU seconds of process `pid` and all its threads, or 0 once it has exited.

    Reads /proc, so this works on Linux only.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # After the command name: field 3 is the state, so utime and stime (fields 14 and 15) sit at 11 and 12.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s(parent_pid: int) -> float:
    """Return the CPU seconds of the running child processes of `parent_pid`, such as a postmaster's backends."""
    total = 0.0
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_path.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == parent_pid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the `fraction` quantile (0.5 for p50) of `values`, interpolating between ranks."""
    if not values:
        raise ValueError("percentile of an empty sample")
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Render rows as a Markdown table, so the output can be pasted into docs/benchmarks.md."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(headers[i]), *(len(row[i]) for row in cells)) for i in range(len(headers))]
    lines = ["| " + " | ".join(header.ljust(widths[i]) for i, header in enumerate(headers)) + " |",
             "| " + " | ".join("-" * width for width in widths) + " |"]
    for row in cells:
        lines.append("| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) + " |")
    return "\n".join(lines)


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def machine_summary() -> str:
    return f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, load average {load_average()}"


def code_version() -> str:
    """Return `git describe --always --dirty` of the repository, or "unknown" outside a checkout."""
    try:
        result = subprocess.run(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip()


if __name__ == "__main__":
    sys.exit(child_main())
