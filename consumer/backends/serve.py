"""The local backends: requests go to the FLUX deployment on Ray Serve.

The deployment may run on another host; only the request and the PNG bytes
cross the wire. Progress events stream back while the image is generated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from consumer.backends.base import BackendOutput, BackendSpec, JobContext
from imagen.errors import BackendError, BackendUnavailableError, JobError
from serve_app.requests import GenerationProgress, GenerationRequest, GenerationResult

logger = logging.getLogger(__name__)


def local_spec(model: str) -> BackendSpec:
    """Limits of FLUX.1-schnell served locally: few steps, no guidance."""
    return BackendSpec(name="flux-schnell-local", kind="local", model=model, default_steps=4, min_steps=1,
                       max_steps=8, supports_guidance=False)


class ServeBackend:
    """Send each request to the deployment through a DeploymentHandle."""

    def __init__(self, spec: BackendSpec, get_handle: Callable[[], Any]) -> None:
        self.spec = spec
        self._get_handle = get_handle
        self._handle: Any = None

    async def generate(self, request: GenerationRequest, context: JobContext) -> BackendOutput:
        handle = self._handle_or_connect()
        started = time.perf_counter()
        result: GenerationResult | None = None
        try:
            stream = handle.options(stream=True).generate_stream.remote(request)
            async for event in stream:
                if isinstance(event, GenerationProgress):
                    if context.report_progress is not None:
                        context.report_progress(event.step, event.total)
                elif isinstance(event, GenerationResult):
                    result = event
        except JobError as exc:
            # Ray raises a RayTaskError subclass of the replica's error class,
            # whose `transient` is the class default; the original is its cause.
            cause = getattr(exc, "cause", None)
            raise cause if isinstance(cause, JobError) else exc from None
        except Exception as exc:  # noqa: BLE001 - Ray wraps replica failures in many types
            raise _translate(exc) from exc
        if result is None:
            raise BackendError("the deployment ended the stream without a result", transient=True)
        logger.debug("generated", extra={"event": "serve_generated", "job_id": context.job_id,
                                         "wall_s": round(time.perf_counter() - started, 4)})
        return BackendOutput(result=result)

    def _handle_or_connect(self) -> Any:
        if self._handle is None:
            try:
                self._handle = self._get_handle()
            except Exception as exc:  # noqa: BLE001 - Serve raises several types when the app is missing
                raise BackendUnavailableError(
                    f"the FLUX deployment is not reachable ({type(exc).__name__}: {exc}): "
                    "start it with `imagen up`"
                ) from exc
        return self._handle

    async def close(self) -> None:
        self._handle = None


def _translate(exc: Exception) -> JobError:
    """Map Ray's exceptions to the queue's transient/permanent errors."""
    cause = exc
    # RayTaskError wraps the replica's exception; its `cause` is the original.
    original = getattr(exc, "cause", None)
    if isinstance(original, JobError):
        return original
    if isinstance(original, Exception):
        cause = original
    name = type(exc).__name__
    transient_names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "BackPressureError",
                       "DeploymentUnavailableError", "RayServeException", "GetTimeoutError",
                       "WorkerCrashedError", "NodeDiedError", "ObjectLostError", "RequestCancelledError")
    if name in transient_names or type(cause).__name__ in transient_names:
        return BackendUnavailableError(f"the FLUX deployment failed: {name}: {cause}")
    return BackendError(f"the FLUX deployment failed: {type(cause).__name__}: {cause}", transient=False)
