"""Ray Serve deployment that runs the FLUX pipeline with request batching.

Each replica loads the pipeline once in `__init__` and runs the configured
warm-up shapes before Serve marks it ready. `@serve.batch` gathers concurrent
calls to `generate` and `generate_stream` into one list, which may mix sizes.
`FluxGenerator.generate_batch` splits that list into one pipeline call per shape. The pipeline runs on a dedicated worker thread, so the replica's event
loop keeps accepting requests (and forming the next batch) meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from imagen.errors import BackendError, JobError
from serve_app import tracing
from serve_app.options import ServeOptions
from serve_app.requests import GenerationProgress, GenerationRequest, GenerationResult

logger = logging.getLogger(__name__)

APP_NAME = "imagen"
DEPLOYMENT_NAME = "FluxDeployment"

# Defaults of the batch queue; `reconfigure` replaces them with the settings
# passed in user_config when the replica starts.
DEFAULT_MAX_BATCH_SIZE = 4
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.05


@dataclass(frozen=True)
class ReplicaConfig:
    """Model settings of a replica, built from Settings by `imagen.cluster`.

    Only these fields cross into the replica, so secrets in Settings never
    reach Ray's object store or dashboard.
    """

    model: str
    device: str
    data_dir: str
    warmup_shapes: tuple[tuple[int, int, int], ...] = ()
    options: ServeOptions = field(default_factory=ServeOptions)
    log_level: str = "INFO"
    log_format: str = "text"


@serve.deployment(name=DEPLOYMENT_NAME)
class FluxDeployment:
    """One model replica: `generate` returns a result, `generate_stream` yields progress, then the result."""

    def __init__(self, config: ReplicaConfig) -> None:
        # Imported here so that a process that only uses a handle (the
        # consumer) does not import torch and diffusers.
        from serve_app.pipeline import FluxGenerator, configure_cache_dirs

        _configure_replica_logging(config)
        _configure_replica_tracing()
        configure_cache_dirs(Path(config.data_dir))
        self._metrics = _BatchMetrics.create()
        self._config = config
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flux-pipeline")

        logger.info("replica starting", extra={"event": "replica_starting", "model": config.model})
        self._generator = FluxGenerator.load(
            config.model, config.device, config.options, data_dir=Path(config.data_dir)
        )

        if config.options.compile and not config.warmup_shapes:
            logger.warning(
                "IMAGEN_COMPILE is on but IMAGEN_WARMUP_SHAPES is empty, so the first job of each shape compiles",
                extra={"event": "warmup_missing"},
            )
        # With compilation, a second batch size makes dynamo mark the batch
        # dimension dynamic now rather than recompiling on the first real batch.
        batch_sizes = (1, 2) if config.options.compile else (1,)
        warmup_s = self._generator.warm_up(config.warmup_shapes, batch_sizes=batch_sizes)

        logger.info(
            "replica ready",
            extra={"event": "replica_ready", "model": config.model, "warmup_s": round(warmup_s, 3)},
        )

    def __del__(self) -> None:
        # Serve calls this when it stops the replica. A running batch finishes
        # on its thread, but nothing new starts.
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
            logger.info("replica stopped", extra={"event": "replica_stopped"})
        from imagen.telemetry import shutdown_tracing

        shutdown_tracing(timeout_s=2.0)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply `max_batch_size` and `batch_wait_timeout_s` from the deployment's user_config."""
        max_batch_size = user_config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)
        batch_wait_timeout_s = user_config.get("batch_wait_timeout_s", DEFAULT_BATCH_WAIT_TIMEOUT_S)
        self._run_batch.set_max_batch_size(max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        logger.info(
            "batching configured",
            extra={"event": "batching_configured", "max_batch_size": max_batch_size,
                   "batch_wait_timeout_s": batch_wait_timeout_s},
        )

    def check_health(self) -> None:
        """Raise when the device is unusable, so Serve replaces this replica."""
        if self._generator.fatal_error is not None:
            raise RuntimeError(f"replica is unhealthy after a device error: {self._generator.fatal_error}")

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Generate one image; raises the request's `JobError` subclass when it fails."""
        outcome = await self._run_batch(request, None)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[GenerationProgress | GenerationResult]:
        """Yield a `GenerationProgress` per denoising step, then the `GenerationResult`.

        Call it through `handle.options(stream=True).generate_stream.remote(request)`.
        The request's failure is raised after the progress events seen so far.
        """
        events: asyncio.Queue = asyncio.Queue()
        batch_task = asyncio.ensure_future(self._run_batch(request, events))
        try:
            while (event := await _next_event(events, batch_task)) is not None:
                yield event
        finally:
            # A caller that stops listening does not cancel the generation,
            # because the batch it belongs to serves other callers too.
            if not batch_task.done():
                batch_task.add_done_callback(_consume_task_exception)

        # The batch task's exception covers a crash of the whole batch function.
        outcome = batch_task.result()
        if isinstance(outcome, BaseException):
            raise outcome
        yield outcome

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S)
    async def _run_batch(
        self,
        requests: list[GenerationRequest],
        event_queues: list[asyncio.Queue | None],
    ) -> list[GenerationResult | JobError]:
        """Run one batch on the pipeline thread; returns a result or an exception per request."""
        loop = asyncio.get_running_loop()
        job_ids = [getattr(request, "job_id", None) for request in requests]

        def report_progress(index: int, progress: GenerationProgress) -> None:
            # Runs on the pipeline thread; asyncio queues may only be touched
            # from the loop's own thread.
            queue = event_queues[index]
            if queue is not None:
                loop.call_soon_threadsafe(queue.put_nowait, progress)

        batch_span = tracing.start_batch_span(requests)
        generation_spans = [tracing.start_generation_span(request, batch_span) for request in requests]
        logger.info("batch started", extra={"event": "batch_started", "job_ids": job_ids})
        started = loop.time()
        try:
            outcomes = await loop.run_in_executor(
                self._executor, self._generator.generate_batch, requests, report_progress
            )
        except Exception as exc:  # noqa: BLE001 - every caller must get an answer
            # generate_batch turns pipeline failures into per-request errors,
            # so reaching this is a bug; each caller still gets an exception.
            logger.exception("batch failed", extra={"event": "batch_failed", "job_ids": job_ids})
            outcomes = [BackendError(f"batch failed: {type(exc).__name__}: {exc}", transient=True)
                        for _ in requests]
        finally:
            batch_span.end()
        self._metrics.record(requests, loop.time() - started)

        for span, outcome in zip(generation_spans, outcomes, strict=True):
            tracing.end_generation_span(span, outcome)
        failed = sum(isinstance(outcome, BaseException) for outcome in outcomes)
        logger.info(
            "batch finished",
            extra={"event": "batch_finished", "job_ids": job_ids, "batch_size": len(requests), "failed": failed},
        )
        return outcomes


class _BatchMetrics:
    """Batch size and batch duration per shape, through Ray's metrics API."""

    def __init__(self, size, duration) -> None:
        self._size = size
        self._duration = duration

    @classmethod
    def create(cls) -> _BatchMetrics:
        from ray.util import metrics

        size = metrics.Histogram("imagen_batch_size", description="Requests per pipeline batch, by shape.",
                                 boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32], tag_keys=("shape",))
        duration = metrics.Histogram(
            "imagen_batch_duration_s", description="Seconds one pipeline batch took, by shape.",
            boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60], tag_keys=("shape",))
        return cls(size, duration)

    def record(self, requests: list[GenerationRequest], duration_s: float) -> None:
        shape = tracing.batch_shape(requests)
        self._size.observe(len(requests), tags={"shape": shape})
        self._duration.observe(duration_s, tags={"shape": shape})


def _configure_replica_tracing() -> None:
    """Export the replica's spans when OTEL_* variables ask for it (see imagen.telemetry)."""
    try:
        from imagen.telemetry import configure_tracing

        configure_tracing("imagen-serve", instrument_asyncpg=False)
    except Exception as exc:  # noqa: BLE001 - tracing must never stop a replica from serving
        logger.warning("tracing unavailable: %s", exc, extra={"event": "tracing_unavailable"})


def _configure_replica_logging(config: ReplicaConfig) -> None:
    """Format the replica's records like the rest of imagen; Ray forwards its stderr to the driver."""
    try:
        from imagen.logs import configure_logging

        configure_logging(config.log_level, config.log_format)
    except ImportError as exc:
        logging.basicConfig(level=config.log_level)
        logger.warning("imagen log format unavailable, using plain logging: %s", exc,
                       extra={"event": "replica_logging_fallback"})


async def _next_event(events: asyncio.Queue, batch_task: asyncio.Future) -> Any:
    """Return the next progress event, or None once the batch is done and the queue is empty."""
    if not events.empty():
        return events.get_nowait()
    if batch_task.done():
        return None

    get_event = asyncio.ensure_future(events.get())
    try:
        await asyncio.wait({get_event, batch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not get_event.done():
            get_event.cancel()
    if get_event.done() and not get_event.cancelled():
        return get_event.result()

    # The batch finished first. Progress events are queued with
    # call_soon_threadsafe before the worker thread returns, so they are
    # already in the queue; the caller drains them before stopping.
    return events.get_nowait() if not events.empty() else None


def _consume_task_exception(task: asyncio.Future) -> None:
    # Retrieving the exception stops asyncio from logging "exception was
    # never retrieved" for a stream whose caller went away.
    if not task.cancelled():
        task.exception()
