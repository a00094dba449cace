"""Hooks through which the consumer reports what happens to jobs (metrics, traces)."""

from __future__ import annotations

from typing import Any


class Observer:
    """Receives job lifecycle events; the base class ignores them all."""

    def job_claimed(self, job: Any) -> None:
        """A job was claimed by this consumer."""

    def job_finished(self, job: Any, outcome: str, duration_s: float) -> None:
        """A job ended this attempt: outcome is done, failed, retried or cancelled."""

    def job_rescued(self, job_id: str, failed: bool) -> None:
        """An expired lease was returned to the queue, or failed after its last attempt."""


NULL_OBSERVER = Observer()
