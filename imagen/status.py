"""`imagen status`: the queue at a glance."""

from __future__ import annotations

import json
from typing import Any

from consumer.queries import query


async def collect_status(connection, *, failures: int) -> dict[str, Any]:
    """Read counts by status and backend, the oldest pending job, recent failures and lease holders."""
    counts = await connection.fetch(query("count_jobs_by_status"))
    oldest = await connection.fetchrow(query("oldest_pending"))
    failed = await connection.fetch(query("recent_failures"), failures)
    leases = await connection.fetch(query("lease_holders"))
    return {
        "jobs": [dict(row) for row in counts],
        "oldest_pending": dict(oldest) if oldest else None,
        "recent_failures": [dict(row) for row in failed],
        "lease_holders": [dict(row) for row in leases],
    }


async def print_status(connection, *, failures: int, as_json: bool) -> None:
    status = await collect_status(connection, failures=failures)
    if as_json:
        print(json.dumps(status, default=str, indent=2))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console()
    jobs = Table(title="jobs by status and backend")
    for column in ("status", "backend", "jobs"):
        jobs.add_column(column)
    for row in status["jobs"]:
        jobs.add_row(row["status"], row["backend"], str(row["jobs"]))
    console.print(jobs)

    oldest = status["oldest_pending"]
    if oldest:
        console.print(f"oldest pending job: {oldest['id']} ({oldest['backend']}), waiting {oldest['age_s']:.1f} s")
    else:
        console.print("no pending jobs")

    failed = Table(title="recent failures")
    for column in ("job", "backend", "finished", "error"):
        failed.add_column(column, overflow="fold")
    for row in status["recent_failures"]:
        failed.add_row(str(row["id"]), row["backend"], str(row["finished_at"]), row["error"] or "")
    console.print(failed)

    leases = Table(title="consumers holding leases")
    for column in ("consumer", "jobs", "next lease expiry"):
        leases.add_column(column)
    for row in status["lease_holders"]:
        leases.add_row(row["lease_owner"], str(row["jobs"]), str(row["next_expiry"]))
    console.print(leases)
