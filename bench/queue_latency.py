"""Pickup and end-to-end latency of imagen's queue, p50 and p99.

One consumer runs in its own process, like `imagen consume --no-serve`, with
the product's `mock` backend and the local-directory store. The script
inserts jobs from another connection in two phases:

- idle: one job at a time. The next one is inserted only after the previous
  one is done and a short gap has passed, so every job reaches an idle
  consumer and is picked up through its NOTIFY.
- busy: a steady stream at --stream-rate-per-s that does not wait for jobs
  to finish, so jobs arrive while the consumer claims and completes others.

What each figure measures, and how exact it is:

- Every latency starts at the commit of the job's INSERT, read with
  `pg_xact_commit_timestamp` (the bench server runs with
  `track_commit_timestamp = on`). That is the moment the row becomes visible
  and the NOTIFY is sent. `created_at` is not used: it is `now()`, the start
  of the inserting transaction, which comes before the commit.
- "claim starts" ends at `started_at`, which the claim sets to `now()`, the
  start of the claim statement's transaction: the consumer has been woken and
  has sent its claim. Both ends are exact server timestamps.
- "consumer holds job" ends at `time.time()` in the consumer process when the
  claim has returned (the observer's `job_claimed` hook). Client and server
  share this host's clock, so the difference is exact to a few microseconds.
- "done" ends at the commit of the transaction that inserted the images row
  and marked the job done, after the PNG file was written: the commit
  timestamp of the images row's `xmin`.

The NOTIFY round trip is measured in the same run: one connection LISTENs,
another sends NOTIFY, from the send to the listener's callback.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    JOB_SIZE_PX,
    BenchServer,
    ChildProcess,
    code_version,
    create_imagen_database,
    format_table,
    imagen_consumer_args,
    load_average,
    machine_summary,
    percentile,
    start_child,
)

JOB_TIMEOUT_S = 30.0
NOTIFY_CHANNEL = "bench_notify_round_trip"

# Published figures of the Go worker this service replaces, not measured by this script.
GO_WORKER_PICKUP_MS = 7.0
GO_WORKER_TOTAL_MS = 74.0
TARGET_PICKUP_P50_MS = 1.0
TARGET_DONE_P50_MS = 10.0


class JobEvents:
    """The claimed and finished lines a consumer child prints, by job id."""

    def __init__(self) -> None:
        self.claimed_at: dict[str, float] = {}
        self.finished_at: dict[str, float] = {}
        self.outcome: dict[str, str] = {}
        self._waiters: dict[str, asyncio.Future] = {}

    async def read(self, stream: asyncio.StreamReader) -> None:
        """Consume `stream` until it closes."""
        while line := await stream.readline():
            event, job_id, unix_time = line.decode().split()
            if event == "claimed":
                self.claimed_at[job_id] = float(unix_time)
                continue
            self.finished_at[job_id] = float(unix_time)
            self.outcome[job_id] = event
            waiter = self._waiters.pop(job_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(event)

    async def wait_finished(self, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> str:
        """Wait until job `job_id` has finished and return its outcome (done, failed, retried, ...)."""
        if job_id in self.outcome:
            return self.outcome[job_id]
        waiter = self._waiters.setdefault(job_id, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(waiter, timeout=timeout_s)
        except asyncio.TimeoutError:
            raise RuntimeError(f"job {job_id} did not finish within {timeout_s:g} s") from None


@dataclass
class Phase:
    """The jobs of one phase and the latencies measured for them, in seconds."""

    name: str
    job_ids: list[str] = field(default_factory=list)
    insert_xids: list[str] = field(default_factory=list)
    claim_start_s: list[float] = field(default_factory=list)
    consumer_holds_s: list[float] = field(default_factory=list)
    done_s: list[float] = field(default_factory=list)


async def insert_job(connection: asyncpg.Connection, prompt: str) -> tuple[str, str]:
    """Insert one mock job in its own transaction and return its id and the transaction's id."""
    row = await connection.fetchrow(
        "INSERT INTO imagen.jobs (prompt, backend, width, height) VALUES ($1, 'mock', $2, $2) "
        "RETURNING id::text AS id, pg_current_xact_id()::text AS xid",
        prompt, JOB_SIZE_PX,
    )
    return row["id"], row["xid"]


async def run_idle_phase(connection: asyncpg.Connection, events: JobEvents, jobs: int, gap_s: float) -> Phase:
    phase = Phase("idle")
    for index in range(jobs):
        job_id, xid = await insert_job(connection, f"idle job {index}")
        phase.job_ids.append(job_id)
        phase.insert_xids.append(xid)
        outcome = await events.wait_finished(job_id)
        if outcome != "done":
            raise RuntimeError(f"job {job_id} ended {outcome}, expected done")
        # The consumer runs one more claim after each job; the gap lets it go idle again.
        await asyncio.sleep(gap_s)
    return phase


async def run_stream_phase(connection: asyncpg.Connection, events: JobEvents, jobs: int,
                           rate_per_s: float) -> Phase:
    phase = Phase("busy")
    started = time.monotonic()
    for index in range(jobs):
        # A fixed schedule: a slow insert is followed by a shorter wait, so the rate holds.
        delay_s = started + index / rate_per_s - time.monotonic()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        job_id, xid = await insert_job(connection, f"stream job {index}")
        phase.job_ids.append(job_id)
        phase.insert_xids.append(xid)
    for job_id in phase.job_ids:
        outcome = await events.wait_finished(job_id)
        if outcome != "done":
            raise RuntimeError(f"job {job_id} ended {outcome}, expected done")
    return phase


async def measure_phase(connection: asyncpg.Connection, events: JobEvents, phase: Phase) -> None:
    """Fill in the phase's latencies from commit timestamps, started_at and the consumer's claim times."""
    rows = await connection.fetch(
        """
        SELECT inserted.id::text AS id,
               pg_xact_commit_timestamp(inserted.xid::xid) AS inserted_at,
               j.started_at,
               pg_xact_commit_timestamp(i.xmin) AS done_at
        FROM unnest($1::uuid[], $2::text[]) AS inserted(id, xid)
        JOIN imagen.jobs AS j ON j.id = inserted.id
        JOIN imagen.images AS i ON i.job_id = j.id
        """,
        [uuid.UUID(job_id) for job_id in phase.job_ids], phase.insert_xids,
    )
    if len(rows) != len(phase.job_ids):
        raise RuntimeError(f"{phase.name}: {len(rows)} of {len(phase.job_ids)} jobs have an images row")
    for row in rows:
        if row["inserted_at"] is None or row["done_at"] is None:
            raise RuntimeError("commit timestamps are missing: is track_commit_timestamp on?")
        inserted_at = row["inserted_at"].timestamp()
        phase.claim_start_s.append(row["started_at"].timestamp() - inserted_at)
        phase.consumer_holds_s.append(events.claimed_at[row["id"]] - inserted_at)
        phase.done_s.append(row["done_at"].timestamp() - inserted_at)


async def measure_notify_round_trip(dsn: str, samples: int) -> list[float]:
    """Return seconds from sending NOTIFY on one connection to the callback on a LISTENing one."""
    listener = await asyncpg.connect(dsn)
    sender = await asyncpg.connect(dsn)
    received: asyncio.Queue[float] = asyncio.Queue()
    try:
        await listener.add_listener(NOTIFY_CHANNEL, lambda *_args: received.put_nowait(time.perf_counter()))
        round_trips = []
        for index in range(samples):
            sent_at = time.perf_counter()
            await sender.execute(f"NOTIFY {NOTIFY_CHANNEL}, '{index}'")
            arrived_at = await asyncio.wait_for(received.get(), timeout=JOB_TIMEOUT_S)
            round_trips.append(arrived_at - sent_at)
        return round_trips
    finally:
        await listener.close()
        await sender.close()


# --------------------------------------------------------------------- output


def _ms(values: Sequence[float], fraction: float) -> str:
    return f"{1000 * percentile(values, fraction):.2f}"


def result_table(idle: Phase, busy: Phase, notify_s: Sequence[float]) -> str:
    rows = [
        ["NOTIFY round trip (send to listener callback)", _ms(notify_s, 0.5), _ms(notify_s, 0.99), "-", "-",
         "-", "-"],
        ["pickup: INSERT commit to claim start (started_at)",
         _ms(idle.claim_start_s, 0.5), _ms(idle.claim_start_s, 0.99),
         _ms(busy.claim_start_s, 0.5), _ms(busy.claim_start_s, 0.99),
         f"<= {TARGET_PICKUP_P50_MS:g}", f"~{GO_WORKER_PICKUP_MS:g}"],
        ["pickup: INSERT commit to consumer holds job",
         _ms(idle.consumer_holds_s, 0.5), _ms(idle.consumer_holds_s, 0.99),
         _ms(busy.consumer_holds_s, 0.5), _ms(busy.consumer_holds_s, 0.99),
         f"<= {TARGET_PICKUP_P50_MS:g}", f"~{GO_WORKER_PICKUP_MS:g}"],
        ["INSERT commit to done commit (mock PNG written, images row)",
         _ms(idle.done_s, 0.5), _ms(idle.done_s, 0.99),
         _ms(busy.done_s, 0.5), _ms(busy.done_s, 0.99),
         f"<= {TARGET_DONE_P50_MS:g}", f"~{GO_WORKER_TOTAL_MS:g}"],
    ]
    headers = ["measurement", "idle p50 ms", "idle p99 ms", "busy p50 ms", "busy p99 ms", "target p50 ms",
               "Go worker ms (published, not measured here)"]
    return format_table(headers, rows)


# --------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000, help="jobs in the idle phase (default 1000)")
    parser.add_argument("--stream-jobs", type=int, default=1000, help="jobs in the busy phase (default 1000)")
    parser.add_argument("--stream-rate-per-s", type=float, default=200.0,
                        help="insert rate of the busy phase in jobs per second (default 200)")
    parser.add_argument("--idle-gap-s", type=float, default=0.005,
                        help="seconds between a finished job and the next insert in the idle phase (default 0.005)")
    parser.add_argument("--notify-samples", type=int, default=1000, help="NOTIFY round trips to time (default 1000)")
    parser.add_argument("--concurrency", type=int, default=8, help="the consumer's jobs in flight (default 8)")
    parser.add_argument("--log-level", default="INFO", help="the consumer's log level (default INFO)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes that finish in a few seconds")
    args = parser.parse_args(argv)

    if args.smoke:
        args.jobs, args.stream_jobs, args.notify_samples = 20, 20, 20
    if min(args.jobs, args.stream_jobs, args.notify_samples, args.concurrency) < 1 or args.stream_rate_per_s <= 0:
        parser.error("--jobs, --stream-jobs, --notify-samples, --concurrency and --stream-rate-per-s "
                     "must be positive")
    return args


async def run_bench(args: argparse.Namespace) -> str:
    load_before = load_average()
    scratch = Path(tempfile.mkdtemp(prefix="imagen-bench-latency-", dir="/tmp"))
    try:
        async with BenchServer() as server:
            server_version = await server.version()
            dsn = await create_imagen_database(server.admin_url)
            notify_s = await measure_notify_round_trip(dsn, args.notify_samples)
            idle, busy = await run_phases(args, dsn, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    header = (f"Queue latency: one consumer process (mock backend, local files, concurrency {args.concurrency}, "
              f"log level {args.log_level}); idle: {args.jobs} jobs one at a time; busy: {args.stream_jobs} jobs "
              f"at {args.stream_rate_per_s:g}/s; code {code_version()}; PostgreSQL {server_version}; "
              f"{machine_summary()} (load average before: {load_before})")
    return header + "\n\n" + result_table(idle, busy, notify_s)


async def run_phases(args: argparse.Namespace, dsn: str, scratch: Path) -> tuple[Phase, Phase]:
    role_args = imagen_consumer_args(store="local", concurrency=args.concurrency, log_level=args.log_level,
                                     output_dir=scratch / "output", report_jobs=True)
    child: ChildProcess = await start_child(role_args, dsn, scratch / "consumer.log")
    events = JobEvents()
    reader = asyncio.create_task(events.read(child.process.stdout))
    connection = await asyncpg.connect(dsn)
    try:
        idle = await run_idle_phase(connection, events, args.jobs, args.idle_gap_s)
        busy = await run_stream_phase(connection, events, args.stream_jobs, args.stream_rate_per_s)
        await measure_phase(connection, events, idle)
        await measure_phase(connection, events, busy)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; the consumer log ends with:\n{child.log_tail()}") from exc
    finally:
        await connection.close()
        await child.stop()
        reader.cancel()
    return idle, busy


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(asyncio.run(run_bench(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
