"""Throughput of imagen's queue against procrastinate's, in jobs per second.

Every run starts its consumers (each in its own process) against an empty
queue and inserts all jobs in one statement. It measures from the moment that
insert has committed (client clock, read when the commit returns) to the
commit of the last finished job (`pg_xact_commit_timestamp` of the row's
final version, server clock). Client and server share the host's clock.

Variants:

- imagen-noop: a backend that returns a cached PNG at once and a store that
  keeps nothing, so only the queue's own work remains (claim, complete).
- imagen-mock: the product's `mock` backend and the local-directory store
  (one PNG file per job).
- imagen-noop-warning: imagen-noop with imagen's log level at WARNING, which
  drops the two INFO records every job logs.
- procrastinate: procrastinate's own worker running a task that does
  nothing, on a separate database of the same server.

Each consumer and each procrastinate worker keeps up to --concurrency jobs
in flight. With --profile-dir, one extra run per imagen variant is recorded
with py-spy and pg_stat_statements, and its figures stay out of the main table.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    JOB_SIZE_PX,
    PROCRASTINATE_TASK,
    BenchServer,
    ChildProcess,
    build_procrastinate_app,
    children_cpu_s,
    code_version,
    create_imagen_database,
    create_procrastinate_database,
    format_table,
    imagen_consumer_args,
    load_average,
    machine_summary,
    median,
    process_cpu_s,
    procrastinate_worker_args,
    start_child,
)

from consumer.queries import query  # noqa: E402

FINISH_POLL_INTERVAL_S = 0.1
CLAIM_SAMPLES = 5
PROFILE_RATE_HZ = 250


@dataclass(frozen=True)
class Variant:
    """One system under test and how its consumers are configured."""

    name: str
    system: str  # "imagen" or "procrastinate"
    backend: str = ""
    store: str = ""
    log_level: str = "INFO"


VARIANTS = {
    "imagen-noop": Variant("imagen-noop", "imagen", backend="noop", store="null"),
    "imagen-mock": Variant("imagen-mock", "imagen", backend="mock", store="local"),
    "imagen-noop-warning": Variant("imagen-noop-warning", "imagen", backend="noop", store="null",
                                   log_level="WARNING"),
    "procrastinate": Variant("procrastinate", "procrastinate"),
}


@dataclass(frozen=True)
class RunResult:
    jobs: int
    elapsed_s: float
    # Jobs per claim statement that claimed anything. procrastinate always claims one.
    jobs_per_claim: float
    # CPU seconds the consumer processes and the PostgreSQL server spent during the run.
    consumer_cpu_s: float = 0.0
    server_cpu_s: float = 0.0

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.elapsed_s


class Bench:
    """The bench databases, the procrastinate app that defers jobs, and a scratch directory."""

    def __init__(self, args: argparse.Namespace, imagen_url: str, procrastinate_url: str, scratch: Path,
                 postmaster_pid: int) -> None:
        self.args = args
        self.postmaster_pid = postmaster_pid
        self.imagen_url = imagen_url
        self.procrastinate_url = procrastinate_url
        self.scratch = scratch
        self.procrastinate_app = build_procrastinate_app(procrastinate_url, pool_max_size=2)
        self._runs = 0

    def dsn_for(self, variant: Variant) -> str:
        return self.imagen_url if variant.system == "imagen" else self.procrastinate_url

    async def start_consumers(self, variant: Variant, count: int) -> list[ChildProcess]:
        self._runs += 1
        run_dir = self.scratch / f"run-{self._runs:03d}-{variant.name}-{count}"
        children = []
        for index in range(count):
            if variant.system == "imagen":
                role_args = imagen_consumer_args(store=variant.store, concurrency=self.args.concurrency,
                                                 log_level=variant.log_level, output_dir=run_dir / "output")
            else:
                role_args = procrastinate_worker_args(concurrency=self.args.concurrency,
                                                      log_level=variant.log_level)
            children.append(start_child(role_args, self.dsn_for(variant), run_dir / f"consumer-{index}.log"))
        return list(await asyncio.gather(*children))

    async def reset(self, variant: Variant, connection: asyncpg.Connection) -> None:
        if variant.system == "imagen":
            await connection.execute("TRUNCATE imagen.jobs, imagen.images, imagen.usage")
        else:
            await connection.execute("TRUNCATE procrastinate_jobs, procrastinate_events, procrastinate_workers "
                                     "CASCADE")

    async def insert_jobs(self, variant: Variant, connection: asyncpg.Connection, jobs: int) -> float:
        """Queue `jobs` jobs in one statement and return the client's clock just after the commit.

        The planner statistics are refreshed together with the insert, because
        the plan of imagen's claim depends on how many pending jobs they show
        (see the claim table).
        """
        if variant.system == "imagen":
            async with connection.transaction():
                await connection.execute(
                    "INSERT INTO imagen.jobs (prompt, backend, width, height) "
                    "SELECT 'bench job ' || g, $1, $2, $2 FROM generate_series(1, $3) AS g",
                    variant.backend, JOB_SIZE_PX, jobs,
                )
                # ANALYZE counts the rows this transaction inserted, and its statistics commit with them.
                await connection.execute("ANALYZE imagen.jobs")
            return time.time()

        deferrer = self.procrastinate_app.configure_task(PROCRASTINATE_TASK)
        await deferrer.batch_defer_async(*({} for _ in range(jobs)))
        inserted_at = time.time()
        # procrastinate's fetch barely depends on statistics, but the ANALYZE keeps both setups alike.
        await connection.execute("ANALYZE procrastinate_jobs")
        return inserted_at

    async def wait_until_finished(self, variant: Variant, connection: asyncpg.Connection,
                                  children: Sequence[ChildProcess]) -> None:
        if variant.system == "imagen":
            unfinished_sql = "SELECT count(*) FROM imagen.jobs WHERE status IN ('pending', 'running')"
        else:
            unfinished_sql = "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
        deadline = time.monotonic() + self.args.timeout_s
        while await connection.fetchval(unfinished_sql) > 0:
            exited = [child for child in children if child.process.returncode is not None]
            if exited:
                raise RuntimeError(f"{variant.name} consumer exited early; its log ends with:\n"
                                   f"{exited[0].log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{variant.name}: jobs still unfinished after {self.args.timeout_s:g} s; "
                                   f"first consumer log ends with:\n{children[0].log_tail()}")
            await asyncio.sleep(FINISH_POLL_INTERVAL_S)

    async def read_outcome(self, variant: Variant, connection: asyncpg.Connection, jobs: int,
                           inserted_at: float) -> RunResult:
        """Read the last commit time and the claim batches, raising RuntimeError when a job did not succeed."""
        if variant.system == "imagen":
            row = await connection.fetchrow(
                "SELECT count(*) FILTER (WHERE status = 'done') AS succeeded, "
                "       max(pg_xact_commit_timestamp(xmin)) AS last_commit, "
                "       count(DISTINCT started_at) AS claims "
                "FROM imagen.jobs"
            )
        else:
            row = await connection.fetchrow(
                "SELECT count(*) FILTER (WHERE status = 'succeeded') AS succeeded, "
                "       max(pg_xact_commit_timestamp(xmin)) AS last_commit, "
                "       count(*) AS claims "
                "FROM procrastinate_jobs"
            )
        if row["succeeded"] != jobs:
            raise RuntimeError(f"{variant.name}: {row['succeeded']} of {jobs} jobs succeeded")
        if row["last_commit"] is None:
            raise RuntimeError("no commit timestamps: track_commit_timestamp is off")
        elapsed_s = row["last_commit"].timestamp() - inserted_at
        return RunResult(jobs=jobs, elapsed_s=elapsed_s, jobs_per_claim=jobs / max(row["claims"], 1))

    async def run_once(self, variant: Variant, consumers: int) -> RunResult:
        connection = await asyncpg.connect(self.dsn_for(variant))
        try:
            await self.reset(variant, connection)
            children = await self.start_consumers(variant, consumers)
            try:
                consumer_cpu_before_s = sum(process_cpu_s(child.pid) for child in children)
                server_cpu_before_s = children_cpu_s(self.postmaster_pid)
                inserted_at = await self.insert_jobs(variant, connection, self.args.jobs)
                await self.wait_until_finished(variant, connection, children)
                # Read before the consumers stop: a backend's CPU time is gone from /proc once it exits.
                consumer_cpu_s = sum(process_cpu_s(child.pid) for child in children) - consumer_cpu_before_s
                server_cpu_s = children_cpu_s(self.postmaster_pid) - server_cpu_before_s
            finally:
                await asyncio.gather(*(child.stop() for child in children))
            result = await self.read_outcome(variant, connection, self.args.jobs, inserted_at)
            return replace(result, consumer_cpu_s=consumer_cpu_s, server_cpu_s=server_cpu_s)
        finally:
            await connection.close()


# --------------------------------------------------------------------- claim statement cost


async def measure_claim_cost(dsn: str, cases: Sequence[tuple[int, int]], limit: int) -> str:
    """Time imagen's claim statement for (pending, finished) job counts, with fresh and with stale statistics."""
    connection = await asyncpg.connect(dsn)
    rows = []
    # An autovacuum ANALYZE between the steps below would turn stale statistics into fresh ones.
    await connection.execute("ALTER TABLE imagen.jobs SET (autovacuum_enabled = off)")
    try:
        for pending, finished in cases:
            fresh_ms = median(await _claim_times_ms(connection, pending, finished, limit, stale_statistics=False))
            stale_ms = median(await _claim_times_ms(connection, pending, finished, limit, stale_statistics=True))
            rows.append([str(pending), str(finished), f"{fresh_ms:.2f}", f"{stale_ms:.2f}",
                         f"{stale_ms / fresh_ms:.1f}x"])
    finally:
        await connection.execute("ALTER TABLE imagen.jobs RESET (autovacuum_enabled)")
        await connection.close()
    title = (f"Claim statement (claim_jobs, LIMIT {limit}, rolled back), median of {CLAIM_SAMPLES} runs. "
             "Fresh: ANALYZE after the pending jobs were inserted. "
             "Stale: ANALYZE while no job was pending, then the pending jobs were inserted.")
    return title + "\n\n" + format_table(["pending jobs", "finished jobs", "fresh statistics ms",
                                           "stale statistics ms", "stale / fresh"], rows)


async def _claim_times_ms(connection: asyncpg.Connection, backlog: int, finished: int, limit: int, *,
                          stale_statistics: bool) -> list[float]:
    await connection.execute("TRUNCATE imagen.jobs, imagen.images, imagen.usage")
    await connection.execute(
        "INSERT INTO imagen.jobs (prompt, backend, width, height, status, error, started_at, finished_at) "
        "SELECT 'finished job ' || g, 'noop', 64, 64, 'failed', 'bench history', now(), now() "
        "FROM generate_series(1, $1) AS g",
        finished,
    )
    if stale_statistics:
        await connection.execute("ANALYZE imagen.jobs")
    await connection.execute(
        "INSERT INTO imagen.jobs (prompt, backend, width, height) "
        "SELECT 'bench job ' || g, 'noop', $1, $1 FROM generate_series(1, $2) AS g",
        JOB_SIZE_PX, backlog,
    )
    if not stale_statistics:
        await connection.execute("ANALYZE imagen.jobs")
    return [await _time_claim_ms(connection, limit) for _ in range(CLAIM_SAMPLES)]


async def _time_claim_ms(connection: asyncpg.Connection, limit: int) -> float:
    transaction = connection.transaction()
    await transaction.start()
    try:
        started = time.perf_counter()
        await connection.fetch(query("claim_jobs"), "bench-claim", limit, 30.0)
        return (time.perf_counter() - started) * 1000
    finally:
        await transaction.rollback()


# --------------------------------------------------------------------- profiling


async def profile_variant(bench: Bench, variant: Variant, profile_dir: Path) -> str:
    """Record one single-consumer run with py-spy and pg_stat_statements and return both summaries."""
    connection = await asyncpg.connect(bench.dsn_for(variant))
    try:
        await bench.reset(variant, connection)
        await connection.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        [child] = await bench.start_consumers(variant, 1)
        stacks_path = profile_dir / f"{variant.name}.pyspy.txt"
        spy = await asyncio.create_subprocess_exec(
            _py_spy(), "record", "--pid", str(child.pid), "--rate", str(PROFILE_RATE_HZ), "--format", "raw",
            "--nolineno", "--nonblocking", "--output", str(stacks_path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        # py-spy needs a moment to attach before the jobs arrive.
        await asyncio.sleep(1.0)
        await connection.execute("SELECT pg_stat_statements_reset()")
        try:
            await bench.insert_jobs(variant, connection, bench.args.jobs)
            await bench.wait_until_finished(variant, connection, [child])
        finally:
            spy.send_signal(signal.SIGINT)
            await spy.wait()
            await child.stop()
        statements = await connection.fetch(
            "SELECT calls, total_exec_time, mean_exec_time, query FROM pg_stat_statements "
            "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "ORDER BY total_exec_time DESC LIMIT 12"
        )
    finally:
        await connection.close()

    sections = [f"### {variant.name}, 1 consumer, {bench.args.jobs} jobs",
                summarize_statements(statements, bench.args.jobs)]
    if stacks_path.exists():
        sections.append(summarize_stacks(stacks_path.read_text()))
    else:
        sections.append(f"py-spy wrote no stacks to {stacks_path}")
    return "\n\n".join(sections)


def _py_spy() -> str:
    beside_python = Path(sys.executable).parent / "py-spy"
    found = str(beside_python) if beside_python.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed: pip install py-spy, or run without --profile-dir")
    return found


def summarize_statements(rows: Sequence[asyncpg.Record], jobs: int) -> str:
    total_ms = sum(row["total_exec_time"] for row in rows) or 1.0
    table_rows = []
    for row in rows:
        statement = " ".join(row["query"].split())[:70]
        table_rows.append([statement, f"{row['calls'] / jobs:.2f}", f"{row['mean_exec_time']:.3f}",
                           f"{100 * row['total_exec_time'] / total_ms:.1f}"])
    return ("Server time per statement (pg_stat_statements):\n\n"
            + format_table(["statement", "calls per job", "mean ms", "% of server time"], table_rows))


def summarize_stacks(raw: str, top: int = 18) -> str:
    """Turn py-spy's raw output (`frame;frame;... count` lines) into inclusive and self time shares."""
    inclusive: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short_frame(frame) for frame in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += count
        self_time[frames[-1]] += count
    if total == 0:
        return "py-spy recorded no samples"
    inclusive_rows = [[frame, f"{100 * count / total:.1f}"] for frame, count in inclusive.most_common(top)]
    self_rows = [[frame, f"{100 * count / total:.1f}"] for frame, count in self_time.most_common(top)]
    return (f"Consumer process CPU samples (py-spy, {total} samples at {PROFILE_RATE_HZ} Hz):\n\n"
            + format_table(["function (inclusive)", "% of samples"], inclusive_rows) + "\n\n"
            + format_table(["function (self)", "% of samples"], self_rows))


def _short_frame(frame: str) -> str:
    # py-spy writes `function (path/to/module.py)`; the last two path parts are enough to place it.
    name, _, location = frame.partition(" (")
    location = location.rstrip(")")
    parts = location.split("/")
    return f"{name} ({'/'.join(parts[-2:])})"


# --------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per run, all queued at once (default 2000)")
    parser.add_argument("--consumers", default="1,2,4",
                        help="comma-separated consumer process counts (default 1,2,4)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="jobs in flight per consumer or worker (default 8, imagen's default)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant and count; the median is shown")
    parser.add_argument("--variants", default="imagen-noop,imagen-mock,procrastinate",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--claim-cases", default="1/0,1/10000,1/100000,100/10000,1000/10000,5000/10000",
                        help="PENDING/FINISHED job counts at which the claim statement is timed, comma-separated "
                             "(default 1/0,1/10000,1/100000,100/10000,1000/10000,5000/10000)")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="seconds one run may take")
    parser.add_argument("--profile-dir", type=Path,
                        help="also record one 1-consumer run per imagen variant with py-spy and "
                             "pg_stat_statements, writing stacks here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes that finish in a few seconds")
    args = parser.parse_args(argv)

    if args.smoke:
        args.jobs, args.consumers, args.repeats = 40, "1,2", 1
        args.claim_cases = "1/0,100/100"
    try:
        args.claim_case_list = [_parse_claim_case(part) for part in args.claim_cases.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--claim-cases must look like 100/10000,1000/10000, got {args.claim_cases!r}")
    args.consumer_counts = [int(part) for part in args.consumers.split(",") if part.strip()]
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}: use {', '.join(VARIANTS)}")
    args.variant_list = [VARIANTS[name] for name in names]
    if args.jobs < 1 or args.repeats < 1 or args.concurrency < 1 or not args.consumer_counts:
        parser.error("--jobs, --repeats, --concurrency and --consumers must be positive")
    return args


def _parse_claim_case(text: str) -> tuple[int, int]:
    pending, finished = text.strip().split("/")
    if int(pending) < 1 or int(finished) < 0:
        raise ValueError(text)
    return int(pending), int(finished)


async def run_bench(args: argparse.Namespace) -> str:
    load_before = load_average()
    results: dict[tuple[str, int], list[RunResult]] = collections.defaultdict(list)
    profiles = []
    scratch = Path(tempfile.mkdtemp(prefix="imagen-bench-throughput-", dir="/tmp"))
    try:
        async with BenchServer(pg_stat_statements=args.profile_dir is not None) as server:
            server_version = await server.version()
            bench = Bench(args, await create_imagen_database(server.admin_url),
                          await create_procrastinate_database(server.admin_url), scratch, server.postmaster_pid)
            async with bench.procrastinate_app.open_async():
                # Variants alternate inside each repeat, so a burst of outside load hits all of them.
                for _repeat in range(args.repeats):
                    for consumers in args.consumer_counts:
                        for variant in args.variant_list:
                            result = await bench.run_once(variant, consumers)
                            results[(variant.name, consumers)].append(result)
                claim_table = await measure_claim_cost(bench.imagen_url, args.claim_case_list, args.concurrency)
                if args.profile_dir is not None:
                    args.profile_dir.mkdir(parents=True, exist_ok=True)
                    for variant in args.variant_list:
                        if variant.system == "imagen":
                            profiles.append(await profile_variant(bench, variant, args.profile_dir))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    header = (f"Queue throughput: {args.jobs} jobs per run, median of {args.repeats} run(s), "
              f"concurrency {args.concurrency} per process; code {code_version()}; PostgreSQL {server_version}; "
              f"{machine_summary()} "
              f"(load average before: {load_before})")
    table = format_table(["variant", "consumer processes", "jobs/s (median)", "runs (jobs/s)",
                          "vs procrastinate", "consumer CPU ms/job", "server CPU ms/job", "jobs per claim"],
                         result_rows(args, results))
    return "\n\n".join([header, table, claim_table, *profiles])


def result_rows(args: argparse.Namespace, results: dict[tuple[str, int], list[RunResult]]) -> list[list[str]]:
    rows = []
    for variant in args.variant_list:
        for consumers in args.consumer_counts:
            runs = results[(variant.name, consumers)]
            rate = median([run.jobs_per_s for run in runs])
            peer_runs = results.get(("procrastinate", consumers))
            ratio = "-"
            if peer_runs and variant.system == "imagen":
                ratio = f"{rate / median([run.jobs_per_s for run in peer_runs]):.2f}x"
            consumer_cpu_ms = median([1000 * run.consumer_cpu_s / run.jobs for run in runs])
            server_cpu_ms = median([1000 * run.server_cpu_s / run.jobs for run in runs])
            rows.append([variant.name, str(consumers), f"{rate:.0f}",
                         " ".join(f"{run.jobs_per_s:.0f}" for run in runs), ratio,
                         f"{consumer_cpu_ms:.2f}", f"{server_cpu_ms:.2f}",
                         f"{median([run.jobs_per_claim for run in runs]):.1f}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(asyncio.run(run_bench(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
