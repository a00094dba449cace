"""Hooks through which the consumer reports what happens to jobs (metrics, traces)."""

from __future__ import annotations

from typing import Any


class Observer:
    """Receives job lifecycle events; the base class ignores them all."""

    def job_claimed(self, job: Any) -> None:
        """A job was claimed by this consumer."""

    def job_finished(self, job: Any, outcome: str, duration_s: float) -> None:
        """A job ended this attempt: done, failed, retried, cancelled, discarded (lease lost) or abandoned (database away)."""

    def job_rescued(self, job_id: str, backend: str, failed: bool) -> None:
        """An expired lease was returned to the queue, or failed after its last attempt."""

    def job_generated(self, job: Any, gpu_s: float) -> None:
        """A job's image was generated, taking `gpu_s` seconds of model time."""

    def queue_depth(self, pending: int, oldest_age_s: float) -> None:
        """The queue holds `pending` jobs, the oldest waiting `oldest_age_s` seconds."""


NULL_OBSERVER = Observer()
