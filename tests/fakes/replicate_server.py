"""A fake Replicate HTTP API for the real `replicate` client.

Routes: `POST /v1/models/{owner}/{name}/predictions`, `POST /v1/predictions`
(by version), `GET /v1/predictions/{id}`, `POST /v1/predictions/{id}/cancel`,
and `GET /files/{name}`, which serves the generated images without auth, as
replicate.delivery does.

Each created prediction follows an `Outcome`: it starts as `starting`, turns
`processing` on the first poll and reaches its final status after
`polls_until_done` polls (`hang` never finishes). Inputs are checked against
the schemas of the FLUX models below. Unlike Replicate, which ignores input
names a model does not declare, the fake rejects them with a 422, so a wrong
input name fails a test.
"""

from __future__ import annotations

import base64
import io
import math
import re
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from PIL import Image

from tests.fakes._http import DropConnection, LoopbackServer, Request, Response

OUTPUT_SHAPES = ("url", "url_list", "data_uri", "data_uri_list", "empty_list", "object")
IMAGE_FORMATS = ("png", "webp", "jpeg", "garbage")

_ASPECT_RATIOS = ("1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21")


@dataclass(frozen=True)
class Field:
    """One input of a model schema."""

    type: type | tuple[type, ...]
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None


# Input schemas as listed on the models' API pages on replicate.com
# (flux-schnell version c846a699, flux-dev, flux-pro with aspect_ratio=custom).
_FLUX_COMMON = {
    "prompt": Field(str),
    "seed": Field(int),
    "output_format": Field(str, choices=("webp", "jpg", "png")),
    "output_quality": Field(int, 0, 100),
}
MODEL_SCHEMAS: dict[str, dict[str, Field]] = {
    "black-forest-labs/flux-schnell": {
        **_FLUX_COMMON,
        "aspect_ratio": Field(str, choices=_ASPECT_RATIOS),
        "num_outputs": Field(int, 1, 4),
        "num_inference_steps": Field(int, 1, 4),
        "megapixels": Field(str, choices=("1", "0.25")),
        "go_fast": Field(bool),
        "disable_safety_checker": Field(bool),
    },
    "black-forest-labs/flux-dev": {
        **_FLUX_COMMON,
        "aspect_ratio": Field(str, choices=_ASPECT_RATIOS),
        "num_outputs": Field(int, 1, 4),
        "num_inference_steps": Field(int, 1, 50),
        "guidance": Field((int, float), 0, 10),
        "megapixels": Field(str, choices=("1", "0.25")),
        "go_fast": Field(bool),
        "disable_safety_checker": Field(bool),
    },
    "black-forest-labs/flux-pro": {
        **_FLUX_COMMON,
        "aspect_ratio": Field(str, choices=(*_ASPECT_RATIOS, "custom")),
        "width": Field(int, 256, 1440),
        "height": Field(int, 256, 1440),
        "steps": Field(int, 1, 50),
        "guidance": Field((int, float), 2, 5),
        "interval": Field((int, float), 1, 4),
        "safety_tolerance": Field(int, 1, 6),
        "prompt_upsampling": Field(bool),
    },
}


@dataclass
class Outcome:
    """How one prediction ends and what it returns."""

    status: str = "succeeded"  # succeeded, failed, canceled, hang
    output_shape: str = "url_list"
    image_format: str = "png"
    polls_until_done: int = 2
    predict_time_s: float = 1.25
    error: str | None = None


@dataclass
class _Failure:
    status: int
    remaining: int
    method: str | None
    path_prefix: str
    retry_after: str | None


@dataclass
class FakeReplicate:
    """State and behaviour of the fake API; `start()` serves it on 127.0.0.1."""

    api_token: str = "r8_fake_token_0123456789"
    default_outcome: Outcome = field(default_factory=Outcome)
    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    create_count: int = 0
    get_count: int = 0
    cancel_count: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._outcomes: deque[Outcome] = deque()
        self._failures: deque[_Failure] = deque()
        self._polls: dict[str, int] = {}
        self._plans: dict[str, Outcome] = {}
        self._server: LoopbackServer | None = None
        self.polled = threading.Event()  # set on every GET of a prediction

    # Set-up used by tests.

    def queue_outcome(self, **options: Any) -> Outcome:
        """Make the next created prediction follow an Outcome built from `options`."""
        outcome = Outcome(**options)
        if outcome.output_shape not in OUTPUT_SHAPES:
            raise ValueError(f"unknown output shape {outcome.output_shape!r}: use one of {', '.join(OUTPUT_SHAPES)}")
        if outcome.image_format not in IMAGE_FORMATS:
            raise ValueError(f"unknown image format {outcome.image_format!r}: use one of {', '.join(IMAGE_FORMATS)}")
        with self._lock:
            self._outcomes.append(outcome)
        return outcome

    def change_outcome(self, prediction_id: str, **options: Any) -> None:
        """Give a created prediction a new Outcome, e.g. let a hanging one finish on its next poll."""
        with self._lock:
            self._plans[prediction_id] = Outcome(**options)

    def fail_next(
        self, status: int, count: int = 1, *, method: str | None = None, path_prefix: str = "/v1/",
        retry_after: str | None = None,
    ) -> None:
        """Fail the next `count` matching requests with HTTP `status`, where status 0 drops the connection."""
        with self._lock:
            self._failures.append(_Failure(status, count, method, path_prefix, retry_after))

    def file_requests_with_auth(self) -> int:
        """Count file downloads that carried an Authorization header (the token must never go there)."""
        with self._lock:
            return sum(1 for r in self.requests if r.path.startswith("/files/") and "authorization" in r.headers)

    # Server life cycle.

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeReplicate is not started")
        return self._server.url

    def start(self) -> FakeReplicate:
        self._server = LoopbackServer(self.handle)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()

    # Request handling.

    def handle(self, request: Request) -> Response:
        with self._lock:
            self.requests.append(request)
            failure = self._take_failure(request)
        if failure is not None:
            return self._failure_response(failure)

        if request.path.startswith("/files/"):
            return self._serve_file(request.path.removeprefix("/files/"))
        if request.headers.get("authorization") != f"Bearer {self.api_token}":
            return _problem(401, "Unauthenticated", "You did not pass a valid authentication token")

        model_route = re.fullmatch(r"/v1/models/([^/]+)/([^/]+)/predictions", request.path)
        if request.method == "POST" and model_route:
            return self._create(f"{model_route.group(1)}/{model_route.group(2)}", request)
        if request.method == "POST" and request.path == "/v1/predictions":
            return self._create_by_version(request)
        cancel_route = re.fullmatch(r"/v1/predictions/([^/]+)/cancel", request.path)
        if request.method == "POST" and cancel_route:
            return self._cancel(cancel_route.group(1))
        get_route = re.fullmatch(r"/v1/predictions/([^/]+)", request.path)
        if request.method == "GET" and get_route:
            return self._get(get_route.group(1))
        return _problem(404, "Not found", f"no route for {request.method} {request.path}")

    def _take_failure(self, request: Request) -> _Failure | None:
        for failure in self._failures:
            if failure.method not in (None, request.method) or not request.path.startswith(failure.path_prefix):
                continue
            failure.remaining -= 1
            if failure.remaining <= 0:
                self._failures.remove(failure)
            return failure
        return None

    def _failure_response(self, failure: _Failure) -> Response:
        if failure.status == 0:
            raise DropConnection
        headers = {"Retry-After": failure.retry_after} if failure.retry_after is not None else {}
        if failure.status == 429:
            return _problem(429, "Too Many Requests", "Request was throttled.", headers)
        return _problem(failure.status, "Server error", "Internal server error", headers)

    def _create(self, model: str, request: Request) -> Response:
        schema = MODEL_SCHEMAS.get(model)
        if schema is None:
            return _problem(404, "Model not found", f"The model {model} does not exist")
        body = request.json() or {}
        model_input = body.get("input") or {}
        problems = _validate(schema, model_input)
        if problems:
            return _problem(422, "Input validation failed", "".join(f"- input.{p}\n" for p in problems))

        prediction_id = uuid.uuid4().hex[:26]
        now = _now()
        prediction = {
            "id": prediction_id, "model": model, "version": "hidden", "input": model_input,
            "logs": "", "output": None, "data_removed": False, "error": None, "status": "starting",
            "created_at": now, "started_at": None, "completed_at": None, "metrics": {},
            "urls": {
                "get": f"{self.url}/v1/predictions/{prediction_id}",
                "cancel": f"{self.url}/v1/predictions/{prediction_id}/cancel",
            },
        }
        with self._lock:
            self.create_count += 1
            self.predictions[prediction_id] = prediction
            self._polls[prediction_id] = 0
            self._plans[prediction_id] = self._outcomes.popleft() if self._outcomes else self.default_outcome
        return Response.json(201, prediction)

    def _create_by_version(self, request: Request) -> Response:
        version = (request.json() or {}).get("version", "")
        model = version.split(":")[0] if "/" in version else ""
        if model not in MODEL_SCHEMAS:
            return _problem(422, "Invalid version", "The specified version does not exist (or perhaps you don't have permission to use it?)")
        return self._create(model, request)

    def _get(self, prediction_id: str) -> Response:
        with self._lock:
            prediction = self.predictions.get(prediction_id)
            if prediction is None:
                return _problem(404, "Not found", "Not found.")
            self.get_count += 1
            self._polls[prediction_id] += 1
            self._advance(prediction, self._plans[prediction_id], self._polls[prediction_id])
            snapshot = dict(prediction)
        self.polled.set()
        return Response.json(200, snapshot)

    def _advance(self, prediction: dict[str, Any], outcome: Outcome, polls: int) -> None:
        if prediction["status"] in ("succeeded", "failed", "canceled"):
            return
        prediction["status"] = "processing"
        prediction["started_at"] = prediction["started_at"] or _now()
        prediction["logs"] = f"Using seed: {prediction['input'].get('seed')}\n 50%|#####     | 2/4 [00:00<00:00]\n"
        if outcome.status == "hang" or polls < outcome.polls_until_done:
            return
        prediction["status"] = outcome.status
        prediction["completed_at"] = _now()
        if outcome.status == "succeeded":
            prediction["output"] = self._make_output(prediction, outcome)
            prediction["metrics"] = {"predict_time": outcome.predict_time_s, "total_time": outcome.predict_time_s + 0.5}
            prediction["logs"] += "100%|##########| 4/4 [00:01<00:00]\n"
        elif outcome.status == "failed":
            prediction["error"] = outcome.error or "CUDA error: out of memory"
        # An unknown status string is stored as given, to test how clients handle it.

    def _cancel(self, prediction_id: str) -> Response:
        with self._lock:
            prediction = self.predictions.get(prediction_id)
            if prediction is None:
                return _problem(404, "Not found", "Not found.")
            self.cancel_count += 1
            if prediction["status"] not in ("succeeded", "failed", "canceled"):
                prediction["status"] = "canceled"
                prediction["completed_at"] = _now()
            snapshot = dict(prediction)
        return Response.json(200, snapshot)

    # Outputs.

    def _make_output(self, prediction: dict[str, Any], outcome: Outcome) -> Any:
        width, height = output_size(prediction["model"], prediction["input"])
        data, content_type = render_image(width, height, int(prediction["input"].get("seed", 0)), outcome.image_format)
        extension = {"image/png": "png", "image/webp": "webp", "image/jpeg": "jpg"}.get(content_type, "bin")
        name = f"{prediction['id']}/out-0.{extension}"
        self.files[name] = (data, content_type)
        url = f"{self.url}/files/{name}"
        data_uri = f"data:{content_type};base64,{base64.b64encode(data).decode()}"
        shapes = {
            "url": url,
            "url_list": [url],
            "data_uri": data_uri,
            "data_uri_list": [data_uri],
            "empty_list": [],
            "object": {"images": [url]},
        }
        return shapes[outcome.output_shape]

    def _serve_file(self, name: str) -> Response:
        stored = self.files.get(name)
        if stored is None:
            return Response(404, b"not found", {"Content-Type": "text/plain"})
        data, content_type = stored
        return Response(200, data, {"Content-Type": content_type})


def output_size(model: str, model_input: dict[str, Any]) -> tuple[int, int]:
    """Return the image size the model would produce for `model_input`."""
    if model_input.get("aspect_ratio") == "custom":
        return int(model_input["width"]), int(model_input["height"])
    ratio_w, ratio_h = (int(part) for part in model_input.get("aspect_ratio", "1:1").split(":"))
    pixels = float(model_input.get("megapixels", "1")) * 1024 * 1024
    width = math.sqrt(pixels * ratio_w / ratio_h)
    return int(round(width / 16) * 16), int(round(width * ratio_h / ratio_w / 16) * 16)


def render_image(width: int, height: int, seed: int, image_format: str) -> tuple[bytes, str]:
    """Draw a flat image whose color depends on `seed`; "garbage" returns bytes that are no image."""
    if image_format == "garbage":
        return b"<html>not an image</html>", "image/png"
    color = (seed % 251, (seed // 251) % 241, 200)
    image = Image.new("RGB", (width, height), color)
    buffer = io.BytesIO()
    pil_format = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[image_format]
    image.save(buffer, format=pil_format)
    return buffer.getvalue(), f"image/{image_format}"


def _validate(schema: dict[str, Field], model_input: dict[str, Any]) -> list[str]:
    problems = []
    if "prompt" not in model_input:
        problems.append("prompt: prompt is required")
    for name, value in model_input.items():
        spec = schema.get(name)
        if spec is None:
            problems.append(f"{name}: Additional property {name} is not allowed")
            continue
        if isinstance(value, bool) and spec.type is not bool:
            problems.append(f"{name}: Invalid type. Expected: {spec.type}, given: boolean")
            continue
        if not isinstance(value, spec.type):
            problems.append(f"{name}: Invalid type. Expected: {spec.type}, given: {type(value).__name__}")
            continue
        if spec.choices is not None and value not in spec.choices:
            problems.append(f"{name}: {name} must be one of the following: {', '.join(map(str, spec.choices))}")
        if spec.minimum is not None and value < spec.minimum:
            problems.append(f"{name}: Must be greater than or equal to {spec.minimum}")
        if spec.maximum is not None and value > spec.maximum:
            problems.append(f"{name}: Must be less than or equal to {spec.maximum}")
    return problems


def _problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    return Response.json(status, {"title": title, "detail": detail, "status": status}, headers)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")
