"""Hooks through which the consumer reports what happens to jobs (metrics, traces)."""

from __future__ import annotations

from typing import Any


class Observer:
    """Receives job lifecycle events; the base class ignores them all."""

    def job_claimed(self, job: Any) -> None:
        """Record that this consumer claimed `job`."""

    def job_finished(self, job: Any, outcome: str, duration_s: float) -> None:
        """Record how an attempt ended: done, failed, retried, cancelled, discarded (lease lost) or abandoned (database away)."""

    def job_rescued(self, job_id: str, backend: str, failed: bool) -> None:
        """Record that an expired lease sent its job back to the queue, or failed it after its last attempt."""

    def job_generated(self, job: Any, gpu_s: float) -> None:
        """Record that a job's image took `gpu_s` seconds of model time."""

    def queue_depth(self, pending: int, oldest_age_s: float) -> None:
        """Record that `pending` jobs wait in the queue, the oldest for `oldest_age_s` seconds."""


NULL_OBSERVER = Observer()
