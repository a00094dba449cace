"""Hosted FLUX models on Replicate, through the `replicate` client.

One class serves every entry of `REPLICATE_MODELS`; adding a hosted model is
one entry there. A job runs as one prediction:

1. create it (or, on a retry, resume the one an earlier attempt started),
2. store its id on the job row at once through `JobContext.save_prediction_id`,
3. poll until it reaches a final status, with an overall timeout,
4. fetch the image, convert it to PNG if needed, and return it.

The create request does not use `Prefer: wait`, because a connection dropped
while the server keeps the request open would lose the prediction id, and a
retry would pay for a second prediction.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from PIL import Image, UnidentifiedImageError
from replicate.client import Client
from replicate.exceptions import ReplicateError
from replicate.helpers import FileOutput
from replicate.prediction import Prediction

from consumer.backends.base import BackendOutput, BackendSpec, JobContext
from imagen.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    InvalidImageError,
    InvalidJobError,
    JobError,
    SettingsError,
)
from imagen.settings import Settings
from serve_app.requests import GenerationRequest, GenerationResult

logger = logging.getLogger(__name__)

FINAL_STATUSES = ("succeeded", "failed", "canceled")
RUNNING_STATUSES = ("starting", "processing")

# Aspect ratios flux-schnell and flux-dev accept (their `aspect_ratio` enum).
FLUX_ASPECT_RATIOS = ("1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21")

# flux-schnell and flux-dev produce about 1 or 0.25 megapixels; requests below the
# geometric mean of the two (0.5 megapixels) get 0.25.
_SMALL_IMAGE_MAX_PIXELS = 512 * 1024

_PREDICTION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class ReplicateModelSpec(BackendSpec):
    """A BackendSpec plus how a request maps onto the model's input names.

    `size_input` is "aspect_ratio" for models that take `aspect_ratio` and
    `megapixels` (the nearest ratio is sent, and the image has the model's size,
    not the requested one), or "width_height" for models that take
    `aspect_ratio="custom"` with `width` and `height`.
    """

    size_input: str = "aspect_ratio"
    steps_input: str = "num_inference_steps"
    guidance_input: str | None = None
    min_guidance: float | None = None
    max_guidance: float | None = None
    aspect_ratios: tuple[str, ...] = FLUX_ASPECT_RATIOS
    output_format: str = "png"
    fixed_input: Mapping[str, Any] = field(default_factory=dict)

    def check(self, *, prompt: str, width: int, height: int, steps: int | None, guidance: float | None) -> None:
        """Raise InvalidJobError naming the first value this model cannot take."""
        super().check(prompt=prompt, width=width, height=height, steps=steps, guidance=guidance)
        if guidance is None or self.min_guidance is None or self.max_guidance is None:
            return
        if not self.min_guidance <= guidance <= self.max_guidance:
            raise InvalidJobError(
                f"guidance {guidance} is out of range for backend {self.name}: use {self.min_guidance} to "
                f"{self.max_guidance} (default {self.default_guidance})"
            )

    def build_input(self, request: GenerationRequest, *, steps: int, guidance: float | None) -> dict[str, Any]:
        """Return the prediction input for `request` in this model's input names."""
        model_input: dict[str, Any] = {
            "prompt": request.prompt,
            "seed": request.seed,
            self.steps_input: steps,
            "output_format": self.output_format,
            **self.fixed_input,
        }
        if self.guidance_input is not None and guidance is not None:
            model_input[self.guidance_input] = guidance
        if self.size_input == "width_height":
            model_input.update(aspect_ratio="custom", width=request.width, height=request.height)
        else:
            model_input["aspect_ratio"] = nearest_aspect_ratio(request.width, request.height, self.aspect_ratios)
            model_input["megapixels"] = "0.25" if request.width * request.height < _SMALL_IMAGE_MAX_PIXELS else "1"
        return model_input


# Input names, limits and defaults: flux-schnell from the API page of version
# c846a699 on replicate.com; flux-dev from its schema as listed on
# cinemasetfree.com (guidance 0-10, default 3); flux-pro steps and guidance from
# the API page of version 9d0768f6. flux-schnell and flux-dev return a list of
# image URLs, and flux-pro returns one URL. `go_fast` is off because with it on
# the same seed does not reproduce the image.
# NOTE: flux-pro's `aspect_ratio="custom"` with `width`/`height` (256-1440,
# multiples of 32) comes from a published example request and the
# flux-pro-finetuned schema, not from a flux-pro schema page.
REPLICATE_MODELS: Mapping[str, ReplicateModelSpec] = {
    "flux-schnell-replicate": ReplicateModelSpec(
        name="flux-schnell-replicate",
        kind="replicate",
        model="black-forest-labs/flux-schnell",
        default_steps=4,
        min_steps=1,
        max_steps=4,
        supports_guidance=False,
        min_size=256,
        max_size=1536,
        size_multiple=16,
        fixed_input={"num_outputs": 1, "go_fast": False},
    ),
    "flux-dev-replicate": ReplicateModelSpec(
        name="flux-dev-replicate",
        kind="replicate",
        model="black-forest-labs/flux-dev",
        default_steps=28,
        min_steps=1,
        max_steps=50,
        supports_guidance=True,
        default_guidance=3.0,
        guidance_input="guidance",
        min_guidance=0.0,
        max_guidance=10.0,
        min_size=256,
        max_size=1536,
        size_multiple=16,
        fixed_input={"num_outputs": 1, "go_fast": False},
    ),
    "flux-pro-replicate": ReplicateModelSpec(
        name="flux-pro-replicate",
        kind="replicate",
        model="black-forest-labs/flux-pro",
        default_steps=25,
        min_steps=1,
        max_steps=50,
        supports_guidance=True,
        default_guidance=3.0,
        guidance_input="guidance",
        min_guidance=2.0,
        max_guidance=5.0,
        min_size=256,
        max_size=1440,
        size_multiple=32,
        size_input="width_height",
        steps_input="steps",
    ),
}


def nearest_aspect_ratio(width: int, height: int, choices: tuple[str, ...] = FLUX_ASPECT_RATIOS) -> str:
    """Return the choice `W:H` closest to width/height, compared on a log scale."""
    target = math.log(width / height)

    def distance(choice: str) -> float:
        ratio_w, ratio_h = (int(part) for part in choice.split(":"))
        return abs(math.log(ratio_w / ratio_h) - target)

    return min(choices, key=distance)


class _RateLimitedError(Exception):
    """Raised from the response hook on HTTP 429, carrying the Retry-After delay."""

    def __init__(self, retry_after_s: float | None) -> None:
        super().__init__("rate limited")
        self.retry_after_s = retry_after_s


async def _raise_on_rate_limit(response: httpx.Response) -> None:
    # ReplicateError drops the response headers, so the Retry-After value is read here.
    if response.status_code == 429:
        raise _RateLimitedError(parse_retry_after(response.headers.get("Retry-After")))


def parse_retry_after(value: str | None) -> float | None:
    """Return the delay in seconds from a Retry-After header (seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


# Exceptions of a replicate client call: API errors, the 429 from the response
# hook, network errors, and ValueError (a pydantic ValidationError) when a
# response does not fit the Prediction model, e.g. an unknown status.
_CLIENT_ERRORS = (ReplicateError, _RateLimitedError, httpx.TransportError, ValueError)


class ReplicateBackend:
    """Generates images with one model of `REPLICATE_MODELS` through the Replicate API."""

    def __init__(
        self,
        spec: ReplicateModelSpec,
        api_token: str,
        *,
        base_url: str | None = None,
        timeout_s: float = 300.0,
        poll_interval_s: float = 0.5,
        max_poll_interval_s: float = 5.0,
        max_poll_errors: int = 3,
        request_timeout_s: float = 30.0,
        download_timeout_s: float = 60.0,
        max_download_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        if not api_token or not api_token.strip():
            raise SettingsError(
                f"REPLICATE_API_TOKEN is missing: backend {spec.name} needs a Replicate API token "
                "(replicate.com > Account settings > API tokens)"
            )
        for label, value in (("timeout_s", timeout_s), ("poll_interval_s", poll_interval_s),
                             ("max_poll_interval_s", max_poll_interval_s), ("request_timeout_s", request_timeout_s),
                             ("download_timeout_s", download_timeout_s)):
            if value <= 0:
                raise SettingsError(f"{label} must be > 0 for backend {spec.name}, got {value}")
        if max_poll_interval_s < poll_interval_s:
            raise SettingsError(
                f"max_poll_interval_s ({max_poll_interval_s}) must be >= poll_interval_s ({poll_interval_s})"
            )

        self.spec = spec
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.poll_interval_s = poll_interval_s
        self.max_poll_interval_s = max_poll_interval_s
        self.max_poll_errors = max_poll_errors
        self.max_download_bytes = max_download_bytes
        # NOTE: base_url None means https://api.replicate.com unless REPLICATE_BASE_URL
        # is set in the environment, which the replicate client reads itself.
        self._client = Client(
            api_token,
            base_url=base_url,
            timeout=httpx.Timeout(request_timeout_s),
            event_hooks={"response": [_raise_on_rate_limit]},
        )
        # Outputs are fetched with a client that carries no API token, so the
        # token never reaches the file host.
        self._downloads = httpx.AsyncClient(timeout=httpx.Timeout(download_timeout_s), follow_redirects=True)

    @classmethod
    def from_settings(cls, settings: Settings, backend_name: str, **options: Any) -> ReplicateBackend:
        """Build the backend `backend_name` from REPLICATE_API_TOKEN and IMAGEN_REPLICATE_BASE_URL.

        `timeout_s` defaults to IMAGEN_BACKEND_TIMEOUT_S; other `options` are passed to the constructor.
        """
        spec = REPLICATE_MODELS.get(backend_name)
        if spec is None:
            raise SettingsError(
                f"backend {backend_name!r} is not a Replicate model: use one of {', '.join(sorted(REPLICATE_MODELS))}"
            )
        options.setdefault("timeout_s", settings.backend_timeout_s)
        return cls(spec, settings.replicate_api_token or "", base_url=settings.replicate_base_url, **options)

    def __repr__(self) -> str:
        return f"ReplicateBackend(backend={self.spec.name!r}, model={self.spec.model!r}, base_url={self.base_url!r})"

    # Generation.

    async def generate(self, request: GenerationRequest, context: JobContext) -> BackendOutput:
        """Run one prediction for `request` and return its image as PNG."""
        spec = self.spec
        spec.check(prompt=request.prompt, width=request.width, height=request.height,
                   steps=request.steps, guidance=request.guidance)
        steps = request.steps if request.steps is not None else spec.default_steps
        guidance = None
        if spec.supports_guidance:
            guidance = request.guidance if request.guidance is not None else spec.default_guidance

        started = time.monotonic()
        prediction_id: str | None = context.prediction_id
        try:
            async with asyncio.timeout(self.timeout_s):
                prediction = await self._resume(context)
                if prediction is None:
                    prediction = await self._create(request, context, steps=steps, guidance=guidance)
                prediction_id = prediction.id
                prediction = await self._wait(prediction, context)
        except TimeoutError:
            logger.warning(
                "Replicate prediction did not finish in time",
                extra={"event": "replicate_prediction_timed_out", "job_id": context.job_id,
                       "prediction_id": prediction_id, "timeout_s": self.timeout_s},
            )
            raise BackendTimeoutError(
                f"prediction {prediction_id or '(not created)'} on {spec.model} did not finish within "
                f"{self.timeout_s:g} s; a retry resumes it"
            ) from None

        png, width, height = await self._fetch_png(prediction, context)
        predict_time_s = _predict_time_s(prediction)
        logger.info(
            "Replicate prediction succeeded",
            extra={"event": "replicate_prediction_succeeded", "job_id": context.job_id,
                   "prediction_id": prediction.id, "model": spec.model, "predict_time_s": predict_time_s,
                   "wall_s": round(time.monotonic() - started, 3)},
        )
        result = GenerationResult(
            png=png, width=width, height=height, seed=request.seed, steps=steps, guidance=guidance,
            model=spec.model, gpu_s=0.0,
        )
        return BackendOutput(result=result, prediction_id=prediction.id, predict_time_s=predict_time_s)

    async def _resume(self, context: JobContext) -> Prediction | None:
        """Return the prediction an earlier attempt started, or None when there is none to resume."""
        prediction_id = context.prediction_id
        if not prediction_id:
            return None
        log_ids = {"job_id": context.job_id, "prediction_id": prediction_id}
        if not _PREDICTION_ID.match(prediction_id):
            logger.warning(
                "stored prediction id is malformed, creating a new prediction",
                extra={"event": "replicate_prediction_id_invalid", **log_ids},
            )
            return None
        try:
            prediction = await self._client.predictions.async_get(prediction_id)
        except ReplicateError as exc:
            if exc.status == 404:
                logger.warning(
                    "stored prediction was not found, creating a new prediction",
                    extra={"event": "replicate_prediction_not_found", **log_ids},
                )
                return None
            raise self._api_error(exc, "get", context, prediction_id) from None
        except _CLIENT_ERRORS as exc:
            raise self._api_error(exc, "get", context, prediction_id) from None
        logger.info(
            "resuming Replicate prediction from an earlier attempt",
            extra={"event": "replicate_prediction_resumed", "status": prediction.status,
                   "attempt": context.attempt, **log_ids},
        )
        return prediction

    async def _create(
        self, request: GenerationRequest, context: JobContext, *, steps: int, guidance: float | None
    ) -> Prediction:
        model_input = self.spec.build_input(request, steps=steps, guidance=guidance)
        try:
            prediction = await self._client.models.predictions.async_create(model=self.spec.model, input=model_input)
        except _CLIENT_ERRORS as exc:
            raise self._api_error(exc, "create", context, None) from None
        logger.info(
            "created Replicate prediction",
            extra={"event": "replicate_prediction_created", "job_id": context.job_id, "prediction_id": prediction.id,
                   "model": self.spec.model, "attempt": context.attempt},
        )
        await self._save_prediction_id(prediction.id, context)
        return prediction

    async def _save_prediction_id(self, prediction_id: str, context: JobContext) -> None:
        if context.save_prediction_id is None:
            return
        try:
            await context.save_prediction_id(prediction_id)
        except JobError:
            raise
        except Exception as exc:
            # The prediction runs and is paid for either way, so this attempt goes on;
            # only a retry after this one would start a second prediction.
            logger.warning(
                "could not store the prediction id on the job",
                extra={"event": "replicate_prediction_id_not_saved", "job_id": context.job_id,
                       "prediction_id": prediction_id, "error": repr(exc)},
            )

    async def _wait(self, prediction: Prediction, context: JobContext) -> Prediction:
        """Poll until the prediction reaches a final status; raise unless it succeeded."""
        interval_s = self.poll_interval_s
        poll_errors = 0
        while prediction.status in RUNNING_STATUSES:
            await asyncio.sleep(interval_s)
            interval_s = min(interval_s * 1.5, self.max_poll_interval_s)
            try:
                prediction = await self._client.predictions.async_get(prediction.id)
            except _CLIENT_ERRORS as exc:
                error = self._api_error(exc, "get", context, prediction.id)
                poll_errors += 1
                if not error.transient or poll_errors > self.max_poll_errors:
                    raise error from None
                if error.retry_after_s is not None:
                    interval_s = min(max(interval_s, error.retry_after_s), self.max_poll_interval_s * 4)
                continue
            poll_errors = 0
            self._report_progress(prediction, context)
        return self._check_final(prediction, context)

    def _report_progress(self, prediction: Prediction, context: JobContext) -> None:
        if context.report_progress is None or not prediction.logs:
            return
        progress = prediction.progress
        if progress is not None:
            context.report_progress(progress.current, progress.total)

    def _check_final(self, prediction: Prediction, context: JobContext) -> Prediction:
        log_ids = {"job_id": context.job_id, "prediction_id": prediction.id, "model": self.spec.model}
        if prediction.status == "succeeded":
            return prediction
        if prediction.status == "failed":
            # NOTE: every failed prediction fails the job, including Replicate's own
            # interruptions ("please retry"); a retry would only resume the same failed id.
            logger.warning("Replicate prediction failed", extra={"event": "replicate_prediction_failed",
                                                               "error": prediction.error, **log_ids})
            raise BackendError(
                f"prediction {prediction.id} on {self.spec.model} failed: {prediction.error or 'no error message'}",
                transient=False,
            )
        if prediction.status == "canceled":
            logger.warning("Replicate prediction was canceled", extra={"event": "replicate_prediction_canceled", **log_ids})
            raise BackendError(f"prediction {prediction.id} on {self.spec.model} was canceled", transient=False)
        logger.warning("Replicate prediction has an unknown status",
                     extra={"event": "replicate_prediction_status_unknown", "status": prediction.status, **log_ids})
        raise BackendError(
            f"prediction {prediction.id} on {self.spec.model} has unknown status {prediction.status!r}",
            transient=False,
        )

    # Output.

    async def _fetch_png(self, prediction: Prediction, context: JobContext) -> tuple[bytes, int, int]:
        """Return the first output image as (PNG bytes, width, height)."""
        source = first_output(prediction.output)
        if source is None:
            raise BackendError(
                f"prediction {prediction.id} on {self.spec.model} succeeded without an image output "
                f"(output type {type(prediction.output).__name__})",
                transient=False,
            )
        if source.startswith("data:"):
            data = _decode_data_uri(source, prediction.id)
        else:
            data = await self._download(source, prediction.id, context)
        return to_png(data, prediction.id, context.job_id)

    async def _download(self, url: str, prediction_id: str, context: JobContext) -> bytes:
        if not url.startswith(("https://", "http://")):
            raise BackendError(f"prediction {prediction_id} output is not an http(s) URL or data URI", transient=False)
        try:
            async with self._downloads.stream("GET", url) as response:
                if response.status_code >= 400:
                    raise BackendError(
                        f"download of prediction {prediction_id} output failed with HTTP {response.status_code}",
                        transient=response.status_code >= 500 or response.status_code == 429,
                    )
                chunks = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > self.max_download_bytes:
                        raise BackendError(
                            f"prediction {prediction_id} output is larger than {self.max_download_bytes} bytes",
                            transient=False,
                        )
                    chunks.append(chunk)
        except httpx.TransportError as exc:
            logger.warning(
                "download of prediction output failed",
                extra={"event": "replicate_output_download_failed", "job_id": context.job_id,
                       "prediction_id": prediction_id, "error_type": type(exc).__name__},
            )
            raise BackendUnavailableError(
                f"download of prediction {prediction_id} output failed ({type(exc).__name__}), and a retry resumes it"
            ) from None
        return b"".join(chunks)

    # Errors.

    def _api_error(
        self, exc: Exception, action: str, context: JobContext, prediction_id: str | None
    ) -> BackendError:
        """Turn a client exception into a BackendError that names the cause, and log it."""
        where = f"{action} of prediction {prediction_id}" if prediction_id else f"{action} of a prediction"
        where = f"{where} on {self.spec.model}"
        error: BackendError
        if isinstance(exc, _RateLimitedError):
            retry_hint = f", retry after {exc.retry_after_s:g} s" if exc.retry_after_s is not None else ""
            error = BackendUnavailableError(f"{where} was rate limited by Replicate (HTTP 429){retry_hint}",
                                            retry_after_s=exc.retry_after_s)
        elif isinstance(exc, httpx.TransportError):
            error = BackendUnavailableError(f"{where} failed: could not reach the Replicate API ({type(exc).__name__})")
        elif isinstance(exc, ReplicateError):
            error = self._describe_replicate_error(exc, where)
        else:
            error = BackendError(f"{where} failed: Replicate sent a response this client cannot read ({exc})",
                                 transient=False)

        log = logger.warning  # the consumer logs the job's terminal failure once, at ERROR
        log("Replicate request failed", extra={
            "event": "replicate_request_failed", "job_id": context.job_id, "prediction_id": prediction_id,
            "action": action, "transient": error.transient, "error": str(error),
        })
        return error

    def _describe_replicate_error(self, exc: ReplicateError, where: str) -> BackendError:
        status = exc.status or 0
        detail = (exc.detail or exc.title or "").strip()
        if status in (401, 403):
            return BackendError(
                f"{where} failed: Replicate rejected REPLICATE_API_TOKEN (HTTP {status}), so set a valid API token",
                transient=False,
            )
        if status == 404:
            return BackendError(f"{where} failed: Replicate has no such model or prediction ({detail})", transient=False)
        if status == 422:
            return BackendError(f"{where} failed: Replicate rejected the input: {detail}", transient=False)
        if status == 429:
            return BackendUnavailableError(f"{where} was rate limited by Replicate (HTTP 429)")
        if status >= 500:
            return BackendUnavailableError(f"{where} failed with HTTP {status} from Replicate ({detail})")
        return BackendError(f"{where} failed with HTTP {status} from Replicate ({detail})", transient=False)

    # Life cycle.

    async def cancel(self, prediction_id: str, *, job_id: str | None = None) -> None:
        """Cancel a running prediction, e.g. when its job's owner cancelled the job."""
        try:
            await self._client.predictions.async_cancel(prediction_id)
        except _CLIENT_ERRORS as exc:
            logger.warning(
                "could not cancel Replicate prediction",
                extra={"event": "replicate_cancel_failed", "job_id": job_id, "prediction_id": prediction_id,
                       "error_type": type(exc).__name__},
            )
            return
        logger.info("canceled Replicate prediction",
                    extra={"event": "replicate_prediction_canceled", "job_id": job_id, "prediction_id": prediction_id})

    async def close(self) -> None:
        await self._downloads.aclose()
        await self._client._async_client.aclose()


def build_replicate_backends(settings: Settings, **options: Any) -> dict[str, ReplicateBackend]:
    """Build one backend per entry of REPLICATE_MODELS, keyed by backend name.

    `options` are passed to each constructor (see `ReplicateBackend.from_settings`).
    """
    return {name: ReplicateBackend.from_settings(settings, name, **options) for name in REPLICATE_MODELS}


def first_output(output: Any) -> str | None:
    """Return the first image of a prediction output as a URL or data URI.

    Accepts a URL or data URI string, a `FileOutput`, a list or tuple of those,
    and a mapping whose values contain them (the first image found wins).
    """
    if isinstance(output, FileOutput):
        return output.url
    if isinstance(output, str):
        return output.strip() or None
    if isinstance(output, (list, tuple)):
        for item in output:
            found = first_output(item)
            if found is not None:
                return found
        return None
    if isinstance(output, Mapping):
        return first_output(list(output.values()))
    return None


def _decode_data_uri(uri: str, prediction_id: str) -> bytes:
    header, _, payload = uri.partition(",")
    if header.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error:
            pass
    raise InvalidImageError(f"prediction {prediction_id} output is a data URI without valid base64 image data")


def to_png(data: bytes, prediction_id: str, job_id: str | None = None) -> tuple[bytes, int, int]:
    """Return (PNG bytes, width, height) for an image in any format Pillow reads."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            width, height = image.size
            if image.format == "PNG":
                return data, width, height
            source_format = image.format
            converted = image if image.mode in ("RGB", "RGBA", "L", "LA") else image.convert("RGBA")
            buffer = io.BytesIO()
            converted.save(buffer, format="PNG")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidImageError(
            f"prediction {prediction_id} output is not a readable image ({type(exc).__name__}, {len(data)} bytes)"
        ) from None
    logger.info(
        "converted prediction output to PNG",
        extra={"event": "replicate_output_converted", "job_id": job_id, "prediction_id": prediction_id,
               "source_format": source_format},
    )
    return buffer.getvalue(), width, height


def _predict_time_s(prediction: Prediction) -> float | None:
    metrics = prediction.metrics or {}
    value = metrics.get("predict_time")
    return float(value) if isinstance(value, (int, float)) else None
