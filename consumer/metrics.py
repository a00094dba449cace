"""Job metrics through Ray's metrics API, so they appear in the Ray dashboard and its Prometheus endpoint.

Ray exports each metric with a `ray_` prefix, e.g. `ray_imagen_jobs_total`.
Outside a Ray worker or driver (a plain `imagen consume --no-serve`), the
observer records nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from consumer.observer import NULL_OBSERVER, Observer

logger = logging.getLogger(__name__)

# Seconds; pickup is milliseconds when NOTIFY works and up to the poll interval when it does not.
LATENCY_BOUNDARIES_S = [0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
DURATION_BOUNDARIES_S = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300]


class RayMetricsObserver(Observer):
    """Count jobs by outcome and backend, and record pickup latency, duration, GPU time and queue depth."""

    def __init__(self) -> None:
        from ray.util import metrics

        self._jobs = metrics.Counter(
            "imagen_jobs", description="Jobs by outcome (claimed, done, failed, retried, cancelled) and backend.",
            tag_keys=("outcome", "backend"))
        self._pickup = metrics.Histogram(
            "imagen_pickup_latency_s", description="Seconds from a job becoming due to its claim.",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=("backend",))
        self._duration = metrics.Histogram(
            "imagen_job_duration_s", description="Seconds from claim to the recorded outcome of one attempt.",
            boundaries=DURATION_BOUNDARIES_S, tag_keys=("backend", "outcome"))
        self._gpu = metrics.Histogram(
            "imagen_job_gpu_s", description="Seconds of model time spent on one job's image.",
            boundaries=DURATION_BOUNDARIES_S, tag_keys=("backend",))
        self._pending = metrics.Gauge("imagen_queue_pending_jobs", description="Pending jobs in imagen.jobs.")
        self._oldest = metrics.Gauge("imagen_queue_oldest_pending_age_s",
                                     description="Age in seconds of the oldest pending job.")

    def job_claimed(self, job: Any) -> None:
        self._jobs.inc(tags={"outcome": "claimed", "backend": job.backend})
        self._pickup.observe(max(job.queued_s, 0.0), tags={"backend": job.backend})

    def job_finished(self, job: Any, outcome: str, duration_s: float) -> None:
        if outcome in ("discarded", "abandoned"):
            return
        self._jobs.inc(tags={"outcome": outcome, "backend": job.backend})
        self._duration.observe(duration_s, tags={"backend": job.backend, "outcome": outcome})

    def job_rescued(self, job_id: str, backend: str, failed: bool) -> None:
        self._jobs.inc(tags={"outcome": "failed" if failed else "retried", "backend": backend})

    def job_generated(self, job: Any, gpu_s: float) -> None:
        self._gpu.observe(gpu_s, tags={"backend": job.backend})

    def queue_depth(self, pending: int, oldest_age_s: float) -> None:
        self._pending.set(pending)
        self._oldest.set(oldest_age_s)


def build_observer() -> Observer:
    """Return the Ray metrics observer inside Ray, and the silent one elsewhere."""
    try:
        import ray

        if not ray.is_initialized():
            return NULL_OBSERVER
        return RayMetricsObserver()
    except Exception as exc:  # noqa: BLE001 - metrics must never stop the consumer
        logger.warning("Ray metrics unavailable: %s", exc, extra={"event": "metrics_unavailable"})
        return NULL_OBSERVER
