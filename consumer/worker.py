"""The consumer: claims jobs, generates them, stores the image and records the outcome.

One `Consumer` runs in one asyncio loop (inside a Ray actor, or a plain
process). Its tasks:

- the listener wakes the claim loop on every NOTIFY, the poll every
  `poll_interval_s`, and a finished job whenever there may be a backlog;
- the claim loop keeps up to `concurrency` jobs in flight, so the deployment
  receives enough concurrent requests to form batches;
- the lease loop renews the leases of in-flight jobs, stops jobs this
  consumer no longer holds (cancelled or taken over), and returns jobs whose
  consumer died to the queue;
- one task per job runs `_run_job`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass, field, replace

import asyncpg
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from consumer.backends import BackendOutput, BackendRegistry, BackendSpec, JobContext
from consumer.listener import Listener, sleep_unless
from consumer.observer import NULL_OBSERVER, Observer
from consumer.repository import CONNECTION_ERRORS, ClaimedJob, ImageRecord, JobRepository, create_pool
from consumer.storage import ObjectStore, object_key
from imagen.errors import (
    BackendTimeoutError,
    DatabaseError,
    InvalidImageError,
    JobCancelledError,
    JobError,
    LeaseLostError,
)
from imagen.settings import Settings
from imagen.telemetry import extract_context, inject_context
from serve_app.requests import GenerationRequest

logger = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Maximum seconds a busy consumer waits for more free slots before it claims.
CLAIM_GATHER_S = 0.005

# The queue as OpenTelemetry's messaging conventions name a destination.
JOBS_DESTINATION = "imagen.jobs"

_tracer = trace.get_tracer("imagen.consumer")


def new_consumer_id() -> str:
    """Return an id unique to this process start, so a restarted consumer never inherits old leases."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass
class _InFlight:
    job: ClaimedJob
    task: asyncio.Task
    started: float = field(default_factory=time.monotonic)
    # Why the task was cancelled from outside: "cancelled", "lost" or "shutdown".
    abort_reason: str | None = None
    # The hosted prediction this attempt started or resumed, if any.
    prediction_id: str | None = None


class Consumer:
    """Claim and run jobs until `stop()` is called."""

    def __init__(
        self,
        settings: Settings,
        dsn: str,
        backends: BackendRegistry,
        store: ObjectStore,
        *,
        consumer_id: str | None = None,
        observer: Observer = NULL_OBSERVER,
    ) -> None:
        self.settings = settings
        self.id = consumer_id or new_consumer_id()
        self._dsn = dsn
        self.backends = backends
        self.store = store
        self.observer = observer
        self.pool: asyncpg.Pool | None = None
        self.repository: JobRepository | None = None
        self.listener: Listener | None = None
        self._inflight: dict[str, _InFlight] = {}
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.ready = asyncio.Event()
        self.claimed_total = 0
        self.styles = None
        self.prices = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect, check the store, start listening and begin claiming."""
        log_extra = {"event": "consumer_starting", "consumer_id": self.id, "store": self.store.kind,
                     "backends": ",".join(self.backends.names())}
        logger.info("consumer starting", extra=log_extra)
        from consumer.pricing import PriceTable
        from consumer.styles import PromptStyles

        # Read now so a broken styles or prices file stops the start, not every job.
        self.styles = PromptStyles.from_env()
        self.prices = PriceTable.from_env()
        await self.store.check_writable()
        self.pool = await create_pool(self._dsn, min_size=1, max_size=max(4, self.settings.concurrency + 2))
        self.repository = JobRepository(self.pool, self.id)
        self.listener = Listener(
            self._dsn,
            consumer_id=self.id,
            on_job=lambda _job_id: self._wake.set(),
            on_cancel=self._on_cancel_notification,
            on_reconnect=self._wake.set,
            check_interval_s=self.settings.listener_check_interval_s,
            reconnect_max_delay_s=self.settings.reconnect_max_delay_s,
        )
        self._tasks = [
            asyncio.create_task(self.listener.run(self._stopping), name="imagen-listener"),
            asyncio.create_task(self._poll_loop(), name="imagen-poll"),
            asyncio.create_task(self._lease_loop(), name="imagen-lease"),
        ]
        await self._check_listen()
        self._tasks.append(asyncio.create_task(self._claim_loop(), name="imagen-claim"))
        self._wake.set()
        self.ready.set()
        logger.info("consumer started", extra={"event": "consumer_started", "consumer_id": self.id,
                                               "listen_works": self.listener.listen_works})

    async def _check_listen(self) -> None:
        try:
            works = await self.listener.probe(self.pool)
        except (DatabaseError, *CONNECTION_ERRORS) as exc:
            logger.warning("LISTEN probe could not run: %s", exc,
                           extra={"event": "listen_probe_failed", "consumer_id": self.id})
            return
        if not works:
            logger.error(
                "LISTEN does not work on this database connection: a probe NOTIFY never arrived. "
                "A transaction-mode pooler (such as Supabase's pooler on port 6543) drops notifications; "
                "point IMAGEN_WORKER_DATABASE_URL at a direct connection or a session-mode pooler "
                "(port 5432). Running on the %.1f s poll alone.", self.settings.poll_interval_s,
                extra={"event": "listen_unavailable", "consumer_id": self.id},
            )

    async def run(self) -> None:
        """Start, then wait until `stop()` finishes."""
        await self.start()
        await self._stopped.wait()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop claiming, let in-flight jobs finish within `grace_s`, then hand the rest back."""
        if self._stopping.is_set():
            await self._stopped.wait()
            return
        grace_s = self.settings.shutdown_grace_s if grace_s is None else grace_s
        logger.info("consumer stopping", extra={"event": "consumer_stopping", "consumer_id": self.id,
                                                "in_flight": len(self._inflight), "grace_s": grace_s})
        self._stopping.set()
        self._wake.set()

        pending = [entry.task for entry in self._inflight.values()]
        if pending:
            await asyncio.wait(pending, timeout=grace_s)
        await self._hand_back_unfinished()

        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.backends.close()
        await self.store.close()
        if self.pool is not None:
            await self.pool.close()
        self._stopped.set()
        logger.info("consumer stopped", extra={"event": "consumer_stopped", "consumer_id": self.id})

    async def _hand_back_unfinished(self) -> None:
        unfinished = list(self._inflight.values())
        if not unfinished:
            return
        for entry in unfinished:
            entry.abort_reason = "shutdown"
            entry.task.cancel()
        await asyncio.gather(*(entry.task for entry in unfinished), return_exceptions=True)
        ids = [entry.job.id for entry in unfinished]
        released = await self._retry_db(lambda: self.repository.release(ids), "release_jobs")
        for job_id in released or []:
            logger.info("job handed back on shutdown", extra={"event": "job_released", "job_id": job_id,
                                                              "consumer_id": self.id})

    # ------------------------------------------------------------------ loops

    async def _poll_loop(self) -> None:
        """Wake the claim loop every poll interval, covering lost notifications."""
        while not self._stopping.is_set():
            await sleep_unless(self._stopping, self.settings.poll_interval_s)
            self._wake.set()

    async def _claim_loop(self) -> None:
        while not self._stopping.is_set():
            await self._wake.wait()
            self._wake.clear()
            await self._gather_free_slots()
            await self._claim_available()

    async def _gather_free_slots(self) -> None:
        """While jobs run, wait briefly for more slots to free up, so one claim takes several jobs.

        A claim statement costs about the same for one job as for eight, so
        under a backlog claiming per freed slot wastes most of the database's
        time. An idle consumer claims at once; a busy one waits until all
        its slots are free or CLAIM_GATHER_S has passed.
        """
        threshold = self.settings.concurrency
        deadline = time.monotonic() + CLAIM_GATHER_S
        while self._inflight and self.settings.concurrency - len(self._inflight) < threshold:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0 or self._stopping.is_set():
                return
            self._slot_freed.clear()
            try:
                await asyncio.wait_for(self._slot_freed.wait(), timeout=remaining_s)
            except asyncio.TimeoutError:
                return

    async def _claim_available(self) -> None:
        """Claim until the queue is empty or every slot is busy."""
        while not self._stopping.is_set():
            free = self.settings.concurrency - len(self._inflight)
            if free <= 0:
                return
            claim_started_ns = time.time_ns()
            try:
                jobs = await self.repository.claim(free, self.settings.lease_s)
            except DatabaseError as exc:
                logger.warning("claim failed, the poll retries: %s", exc,
                               extra={"event": "claim_failed", "consumer_id": self.id})
                return
            claim_window = (claim_started_ns, time.time_ns())
            for job in jobs:
                self._start_job(job, claim_window)
            if len(jobs) < free:
                return

    def _start_job(self, job: ClaimedJob, claim_window: tuple[int, int]) -> None:
        self.claimed_total += 1
        task = asyncio.create_task(self._run_job_guarded(job, claim_window), name=f"imagen-job-{job.id}")
        self._inflight[job.id] = _InFlight(job=job, task=task)
        self.observer.job_claimed(job)
        logger.info("job claimed", extra={"event": "job_claimed", "job_id": job.id, "consumer_id": self.id,
                                          "attempt": job.attempt, "backend": job.backend,
                                          "queued_s": round(job.queued_s, 4)})

    async def _lease_loop(self) -> None:
        """Renew leases a few times per lease period and rescue leases other consumers let expire."""
        interval_s = self.settings.lease_s / 3
        while not self._stopping.is_set():
            await sleep_unless(self._stopping, interval_s)
            if self._stopping.is_set():
                return
            await self._renew_leases()
            await self._rescue_expired()
            await self._report_queue_depth()

    async def _renew_leases(self) -> None:
        entries = [entry for entry in self._inflight.values() if not entry.task.done()]
        if not entries:
            return
        try:
            held = await self.repository.renew_leases([(e.job.id, e.job.attempt) for e in entries],
                                                      self.settings.lease_s)
        except DatabaseError as exc:
            logger.warning("lease renewal failed: %s", exc, extra={"event": "lease_renew_failed",
                                                                   "consumer_id": self.id})
            return
        for entry in entries:
            if entry.job.id not in held and not entry.task.done():
                self._abort(entry, "lost")

    async def _rescue_expired(self) -> None:
        try:
            rows = await self.repository.rescue_expired(self.settings.retry_base_delay_s,
                                                        self.settings.retry_max_delay_s)
        except DatabaseError as exc:
            logger.warning("lease rescue failed: %s", exc, extra={"event": "lease_rescue_failed",
                                                                  "consumer_id": self.id})
            return
        for row in rows:
            job_id = str(row["id"])
            final = row["status"] == "failed"
            log = logger.error if final else logger.info
            log("job's consumer was lost; %s", "failed after max attempts" if final else "returned to the queue",
                extra={"event": "job_failed" if final else "job_rescued", "job_id": job_id,
                       "attempt": row["attempt"], "max_attempts": row["max_attempts"],
                       "lost_consumer_id": row["lost_consumer"], "consumer_id": self.id})
            self.observer.job_rescued(job_id, row["backend"], final)
        if rows:
            self._wake.set()

    async def _report_queue_depth(self) -> None:
        try:
            row = await self.repository.queue_depth()
        except DatabaseError:
            return
        self.observer.queue_depth(row["pending"], row["oldest_age_s"])

    def _on_cancel_notification(self, job_id: str) -> None:
        entry = self._inflight.get(job_id)
        if entry is not None and not entry.task.done():
            self._abort(entry, "cancelled")

    def _abort(self, entry: _InFlight, reason: str) -> None:
        if entry.abort_reason is None:
            entry.abort_reason = reason
            entry.task.cancel()

    # ------------------------------------------------------------------ one job

    async def _run_job_guarded(self, job: ClaimedJob, claim_window: tuple[int, int]) -> None:
        """Run one job and free its slot, whatever the job raises."""
        try:
            await self._run_job(job, claim_window)
        except asyncio.CancelledError:
            await self._after_abort(job)
        except Exception:  # noqa: BLE001 - the consumer must outlive any bug in one job
            logger.exception("unexpected error while recording job", extra={"event": "job_internal_error",
                                                                            "job_id": job.id})
        finally:
            self._inflight.pop(job.id, None)
            self._slot_freed.set()
            # A free slot may take the next job of a backlog.
            if not self._stopping.is_set():
                self._wake.set()

    async def _run_job(self, job: ClaimedJob, claim_window: tuple[int, int]) -> None:
        """Run one attempt of a job inside its trace: one span per stage under the job's span."""
        started = time.monotonic()
        attributes = self._span_attributes(job)
        job_span = _tracer.start_span(
            f"process {JOBS_DESTINATION}", context=extract_context(job.traceparent, job.tracestate),
            kind=SpanKind.CONSUMER, start_time=claim_window[0], attributes=attributes,
        )
        outcome = "failed"
        try:
            with trace.use_span(job_span, end_on_exit=False):
                claim_span = _tracer.start_span("claim", start_time=claim_window[0], attributes={
                    **attributes, "imagen.queued_s": job.queued_s})
                claim_span.end(end_time=claim_window[1])
                outcome = await self._run_stages(job, attributes, started)
        except asyncio.CancelledError:
            outcome = "aborted"
            raise
        finally:
            job_span.set_attribute("imagen.outcome", outcome)
            if outcome in ("failed", "retried"):
                job_span.set_status(Status(StatusCode.ERROR))
            job_span.end()

    async def _run_stages(self, job: ClaimedJob, attributes: dict, started: float) -> str:
        """Prepare, generate and record one attempt; returns its outcome for the trace and metrics."""
        try:
            with _tracer.start_as_current_span("prepare", attributes=attributes):
                backend = self.backends.get(job.backend)
                request = self._prepare(job, backend.spec)
            with _tracer.start_as_current_span("generate", attributes=attributes):
                output = await self._generate(job, backend, request)
                output = _check_output(job, output, backend.spec)
            image_id = await self._finish(job, backend.spec.model, request, output, time.monotonic() - started,
                                          attributes)
        except JobError as exc:
            trace.get_current_span().record_exception(exc)
            outcome = await self._record_failure(job, exc)
            self.observer.job_finished(job, outcome, time.monotonic() - started)
            return outcome
        except DatabaseError as exc:
            # The database stayed away for a whole lease period while the result
            # was recorded. The lease is no longer renewed, so any consumer's
            # rescue sends the job back to the queue once it expires. Failing it
            # here would use up an attempt that did nothing wrong.
            logger.warning("database unreachable while recording the job; leaving it to the lease rescue: %s", exc,
                           extra={"event": "job_abandoned", "job_id": job.id, "attempt": job.attempt})
            trace.get_current_span().record_exception(exc)
            return "abandoned"
        except Exception as exc:  # noqa: BLE001 - an unexpected error still fails the job with its text
            logger.exception("job raised an unexpected error", extra={"event": "job_unexpected_error",
                                                                      "job_id": job.id})
            trace.get_current_span().record_exception(exc)
            outcome = await self._record_failure(job, JobError(f"internal error: {type(exc).__name__}: {exc}"))
            self.observer.job_finished(job, outcome, time.monotonic() - started)
            return outcome

        if image_id is None:
            return "discarded"
        self.observer.job_generated(job, output.result.gpu_s)
        self.observer.job_finished(job, "done", time.monotonic() - started)
        logger.info("job done", extra={"event": "job_done", "job_id": job.id, "image_id": image_id,
                                       "attempt": job.attempt, "wall_s": round(time.monotonic() - started, 4)})
        return "done"

    def _span_attributes(self, job: ClaimedJob) -> dict:
        """Attributes every span of a job carries; messaging.* follow OpenTelemetry's conventions."""
        return {
            "messaging.system": "postgresql",
            "messaging.operation.type": "process",
            "messaging.destination.name": JOBS_DESTINATION,
            "messaging.message.id": job.id,
            "messaging.client.id": self.id,
            "imagen.job.id": job.id,
            "imagen.owner.id": job.owner_user_id or self.settings.owner_user_id or "",
            "imagen.backend": job.backend,
            "imagen.width": job.width,
            "imagen.height": job.height,
            "imagen.seed": job.seed,
            "imagen.attempt": job.attempt,
        }

    def _prepare(self, job: ClaimedJob, spec) -> GenerationRequest:
        """Check the job against its backend and build the request, before any model work."""
        prompt = job.prompt
        if job.style:
            prompt = self.styles.apply(job.style, job.prompt)
        spec.check(prompt=prompt, width=job.width, height=job.height, steps=job.steps, guidance=job.guidance)
        return GenerationRequest(prompt=prompt, width=job.width, height=job.height, seed=job.seed,
                                 steps=job.steps or spec.default_steps,
                                 guidance=job.guidance if spec.supports_guidance else None,
                                 job_id=job.id)

    async def _generate(self, job: ClaimedJob, backend, request: GenerationRequest) -> BackendOutput:
        # The replica's spans join this trace through the W3C headers of the
        # current span. Without a tracer provider there is no current span, so
        # the producer's headers are passed on unchanged.
        trace_context = inject_context()
        if not trace_context and job.traceparent:
            trace_context = {"traceparent": job.traceparent}
            if job.tracestate:
                trace_context["tracestate"] = job.tracestate
        request = replace(request, trace_context=trace_context)
        context = JobContext(
            job_id=job.id,
            attempt=job.attempt,
            owner_user_id=job.owner_user_id,
            prediction_id=job.prediction_id,
            save_prediction_id=lambda prediction_id: self._save_prediction_id(job, prediction_id),
            report_progress=_ProgressWriter(self, job).report,
            trace_context=dict(trace_context),
        )
        try:
            return await asyncio.wait_for(backend.generate(request, context), timeout=self.settings.backend_timeout_s)
        except asyncio.TimeoutError:
            raise BackendTimeoutError(
                f"backend {backend.spec.name} timed out after {self.settings.backend_timeout_s:g} s; "
                "raise IMAGEN_BACKEND_TIMEOUT_S if jobs of this size need longer"
            ) from None

    async def _save_prediction_id(self, job: ClaimedJob, prediction_id: str) -> None:
        entry = self._inflight.get(job.id)
        if entry is not None:
            entry.prediction_id = prediction_id
        saved = await self._retry_db(lambda: self.repository.save_prediction_id(job, prediction_id),
                                     "save_prediction_id")
        if saved is False:
            raise LeaseLostError(f"job {job.id} is no longer held by this consumer")

    async def _finish(self, job: ClaimedJob, model: str, request: GenerationRequest, output: BackendOutput,
                      wall_s: float, attributes: dict) -> str | None:
        """Store the image and record the job done; returns the image id, or None when the job was lost."""
        result = output.result
        record = ImageRecord(
            prompt=request.prompt, backend=job.backend, model=result.model or model, width=result.width,
            height=result.height, seed=result.seed, steps=result.steps, guidance=result.guidance,
            storage_bucket=self.store.bucket, storage_key=object_key(job.prompt, job.seed, job.created_at.date()),
            byte_size=len(result.png), wall_s=wall_s, gpu_s=result.gpu_s, predict_time_s=output.predict_time_s,
            estimated_cost_usd=self.prices.estimate_cost_usd(job.backend, predict_time_s=output.predict_time_s,
                                                             gpu_s=result.gpu_s),
            prediction_id=output.prediction_id,
            batch_size=result.batch_size,
        )
        for attempt in range(2):
            try:
                with _tracer.start_as_current_span("record", attributes=attributes):
                    return await self._complete_with_retries(job, record, result.png, attributes)
            except asyncpg.UniqueViolationError as exc:
                if attempt or exc.constraint_name != "images_object_is_unique":
                    raise
                # Another job of the same prompt, seed and day took the key first.
                record = _with_key(record, object_key(job.prompt, job.seed, job.created_at.date(),
                                                      suffix=job.id.replace("-", "")[:8]))
        return None

    async def _complete_with_retries(self, job: ClaimedJob, record: ImageRecord, png: bytes,
                                     attributes: dict) -> str | None:
        deadline = time.monotonic() + self.settings.lease_s
        delay_s = 0.1
        while True:
            try:
                async with self.repository.completing(job, record, self.settings.owner_user_id) as image_id:
                    if image_id is not None:
                        with _tracer.start_as_current_span("upload", attributes={
                                **attributes, "imagen.storage.key": record.storage_key,
                                "imagen.storage.bytes": len(png)}):
                            await self.store.put(record.storage_key, png, record.content_type)
                if image_id is None:
                    return await self._explain_not_held(job)
                return image_id
            except DatabaseError as exc:
                # The commit may have landed before the connection died, so read the row back.
                state = await self._state_or_none(job.id)
                if state is not None and state["status"] == "done" and state["lease_owner"] == self.id \
                        and state["attempt"] == job.attempt:
                    return str(state["image_id"])
                if time.monotonic() + delay_s > deadline:
                    raise
                logger.warning("recording job failed, retrying: %s", exc,
                               extra={"event": "job_complete_retry", "job_id": job.id})
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)

    async def _explain_not_held(self, job: ClaimedJob) -> None:
        state = await self._state_or_none(job.id)
        status = state["status"] if state is not None else "deleted"
        if status == "cancelled":
            logger.info("job was cancelled; result discarded", extra={"event": "job_cancelled_discarded",
                                                                      "job_id": job.id})
            self.observer.job_finished(job, "cancelled", 0.0)
        else:
            logger.warning("lease lost before the result was recorded; result discarded",
                           extra={"event": "job_lease_lost", "job_id": job.id, "attempt": job.attempt,
                                  "status": status})
        return None

    async def _state_or_none(self, job_id: str):
        try:
            return await self.repository.job_state(job_id)
        except DatabaseError:
            return None

    async def _record_failure(self, job: ClaimedJob, exc: JobError) -> str:
        """Send the job back to the queue or fail it; returns "retried", "failed" or "discarded"."""
        if isinstance(exc, (LeaseLostError, JobCancelledError)):
            await self._explain_not_held(job)
            return "discarded"
        retry = exc.transient and job.attempt < job.max_attempts
        if retry:
            delay_s = self._backoff_s(job.attempt, exc)
            message = f"attempt {job.attempt} of {job.max_attempts} failed, retrying in {delay_s:.1f} s: {exc}"
            recorded = await self._retry_db(lambda: self.repository.retry(job, message, delay_s), "retry_job")
            if recorded:
                logger.info("job failed, will retry", extra={"event": "job_retry", "job_id": job.id,
                                                             "attempt": job.attempt, "delay_s": round(delay_s, 3),
                                                             "error": str(exc)})
        else:
            message = f"failed on attempt {job.attempt} of {job.max_attempts}: {exc}"
            recorded = await self._retry_db(lambda: self.repository.fail(job, message), "fail_job")
            if recorded:
                logger.error("job failed", extra={"event": "job_failed", "job_id": job.id, "attempt": job.attempt,
                                                  "error": str(exc)})
        if recorded is None:
            # The database stayed away; the lease rescue decides the job's fate.
            return "abandoned"
        if recorded is False:
            await self._explain_not_held(job)
            return "discarded"
        return "retried" if retry else "failed"

    def _backoff_s(self, attempt: int, exc: JobError) -> float:
        hint = getattr(exc, "retry_after_s", None)
        base = self.settings.retry_base_delay_s * 2 ** (attempt - 1)
        delay_s = min(self.settings.retry_max_delay_s, base) * random.uniform(0.75, 1.25)
        if hint is not None:
            delay_s = max(delay_s, min(float(hint), self.settings.retry_max_delay_s))
        return delay_s

    async def _after_abort(self, job: ClaimedJob) -> None:
        entry = self._inflight.get(job.id)
        reason = entry.abort_reason if entry is not None else None
        if reason == "shutdown" or reason is None:
            # The shutdown path releases every unfinished job in one statement.
            return
        if reason == "cancelled":
            await self._cancel_prediction(job, entry.prediction_id or job.prediction_id)
        state = await self._state_or_none(job.id)
        if state is not None and state["status"] == "running" and state["lease_owner"] == self.id:
            # A cancel notification for a job that is still ours: someone sent a stray NOTIFY.
            await self._retry_db(lambda: self.repository.release([job.id]), "release_jobs")
            logger.warning("stray cancel notification; job handed back", extra={"event": "job_released",
                                                                                 "job_id": job.id})
            return
        await self._explain_not_held(job)

    async def _cancel_prediction(self, job: ClaimedJob, prediction_id: str | None) -> None:
        """Stop paying for a hosted prediction whose job was cancelled."""
        if prediction_id is None:
            return
        try:
            backend = self.backends.get(job.backend)
        except JobError:
            return
        cancel = getattr(backend, "cancel", None)
        if cancel is None:
            return
        try:
            await cancel(prediction_id, job_id=job.id)
        except Exception as exc:  # noqa: BLE001 - the job is cancelled either way
            logger.warning("cancelling the hosted prediction failed: %s", exc,
                           extra={"event": "prediction_cancel_failed", "job_id": job.id,
                                  "prediction_id": prediction_id})

    async def _retry_db(self, operation, name: str):
        """Run a database operation, retrying connection errors for up to one lease period.

        Returns None when the database stayed away; the job's lease then
        expires and another consumer's rescue decides its fate.
        """
        deadline = time.monotonic() + self.settings.lease_s
        delay_s = 0.1
        while True:
            try:
                return await operation()
            except DatabaseError as exc:
                if time.monotonic() + delay_s > deadline:
                    logger.warning("%s failed for a whole lease period, giving up: %s", name, exc,
                                   extra={"event": "db_write_abandoned", "query": name})
                    return None
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)

    # ------------------------------------------------------------------ introspection

    @property
    def in_flight(self) -> int:
        return len(self._inflight)


class _ProgressWriter:
    """Store step progress on the job row at most once per `progress_interval_s`.

    The first report of a job waits one interval too, so a job faster than
    the interval costs no progress write; `complete_job` records the last
    step when the job is done. The last step is written as soon as it is
    reported when earlier steps were, so a progress bar reaches its end
    while the image is decoded and stored.
    """

    def __init__(self, consumer: Consumer, job: ClaimedJob) -> None:
        self._consumer = consumer
        self._job = job
        self._last_write = time.monotonic()
        self._wrote = False
        self._writing: asyncio.Task | None = None

    def report(self, step: int, total: int) -> None:
        now = time.monotonic()
        due = now - self._last_write >= self._consumer.settings.progress_interval_s
        if not due and not (step >= total and self._wrote):
            return
        self._last_write = now
        self._wrote = True
        self._writing = asyncio.get_running_loop().create_task(self._write(step, total))

    async def _write(self, step: int, total: int) -> None:
        try:
            await self._consumer.repository.update_progress(self._job, step, total)
        except DatabaseError as exc:
            logger.debug("progress write failed: %s", exc, extra={"event": "progress_write_failed",
                                                                  "job_id": self._job.id})


def _check_output(job: ClaimedJob, output: BackendOutput, spec: BackendSpec) -> BackendOutput:
    """Return the output if it is the PNG the job asked for; raise InvalidImageError otherwise.

    Hosted models that only take an aspect ratio return their own size; their
    image is resized to the requested size, with a warning. A local model
    that returns another size is a bug, and its image is rejected.
    """
    result = output.result
    if not result.png.startswith(PNG_SIGNATURE):
        raise InvalidImageError(f"backend {job.backend} returned data that is not a PNG image")
    if (result.width, result.height) == (job.width, job.height):
        return output
    if spec.kind != "replicate":
        raise InvalidImageError(
            f"backend {job.backend} returned {result.width}x{result.height}, "
            f"but the job asked for {job.width}x{job.height}"
        )
    logger.warning("resizing the hosted model's %dx%d image to the requested %dx%d", result.width, result.height,
                   job.width, job.height, extra={"event": "image_resized", "job_id": job.id})
    png = _resize_png(result.png, job.width, job.height)
    return replace(output, result=replace(result, png=png, width=job.width, height=job.height))


def _resize_png(data: bytes, width: int, height: int) -> bytes:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        resized = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    resized.save(buffer, format="PNG")
    return buffer.getvalue()


def _with_key(record: ImageRecord, key: str) -> ImageRecord:
    return replace(record, storage_key=key)



__all__ = ["Consumer", "new_consumer_id"]
