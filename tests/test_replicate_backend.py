"""ReplicateBackend against the fake Replicate API, through the real replicate client."""

from __future__ import annotations

import io
import logging
import time
from email.utils import formatdate

import pytest
from PIL import Image
from replicate.client import Client
from replicate.helpers import FileOutput

from consumer.backends.base import JobContext
from consumer.backends.replicate import (
    FLUX_ASPECT_RATIOS,
    REPLICATE_MODELS,
    ReplicateBackend,
    build_replicate_backends,
    first_output,
    nearest_aspect_ratio,
    parse_retry_after,
    to_png,
)
from imagen.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    InvalidImageError,
    InvalidJobError,
    SettingsError,
)
from imagen.settings import Settings
from serve_app.requests import GenerationRequest
from tests.fakes.fixtures import make_replicate_backend
from tests.fakes.replicate_server import FakeReplicate, output_size, render_image

REQUEST = GenerationRequest(prompt="a red fox in snow", width=1024, height=1024, seed=42)



class Recorder:
    """A JobContext whose callbacks record what the backend stored and reported."""

    def __init__(self, fake: FakeReplicate | None = None, prediction_id: str | None = None) -> None:
        self.fake = fake
        self.saved_ids: list[str] = []
        self.status_when_saved: list[str] = []
        self.progress: list[tuple[int, int]] = []
        self.context = JobContext(
            job_id="job-1", attempt=1, prediction_id=prediction_id,
            save_prediction_id=self.save, report_progress=self.report,
        )

    async def save(self, prediction_id: str) -> None:
        self.saved_ids.append(prediction_id)
        if self.fake is not None:
            self.status_when_saved.append(self.fake.predictions[prediction_id]["status"])

    def report(self, current: int, total: int) -> None:
        self.progress.append((current, total))


def _decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


# Outputs


@pytest.mark.asyncio
@pytest.mark.parametrize("shape", ["url", "url_list", "data_uri", "data_uri_list", "object"])
@pytest.mark.parametrize("image_format", ["png", "webp", "jpeg"])
async def test_generate_every_output_shape_gives_png(
    fake_replicate: FakeReplicate, shape: str, image_format: str
) -> None:
    backend = make_replicate_backend(fake_replicate, "flux-schnell-replicate")
    fake_replicate.queue_outcome(output_shape=shape, image_format=image_format)
    try:
        output = await backend.generate(REQUEST, Recorder().context)
    finally:
        await backend.close()

    image = _decode(output.result.png)
    assert image.format == "PNG"
    assert image.size == (1024, 1024)
    assert (output.result.width, output.result.height) == (1024, 1024)
    assert output.result.model == "black-forest-labs/flux-schnell"


def test_first_output_accepts_file_outputs() -> None:
    client = Client("unused-token", base_url="http://127.0.0.1:9")
    files = [FileOutput("http://127.0.0.1:9/files/a.webp", client), FileOutput("http://127.0.0.1:9/files/b.webp", client)]

    assert first_output(files) == "http://127.0.0.1:9/files/a.webp"
    assert first_output(files[1]) == "http://127.0.0.1:9/files/b.webp"
    assert first_output(("", "data:image/png;base64,AAAA")) == "data:image/png;base64,AAAA"
    assert first_output({"images": ["http://127.0.0.1:9/x.png"]}) == "http://127.0.0.1:9/x.png"
    assert first_output([]) is None
    assert first_output(None) is None
    assert first_output(12) is None


@pytest.mark.parametrize("image_format", ["webp", "jpeg", "png"])
def test_to_png_converts_formats(image_format: str) -> None:
    data, _ = render_image(320, 200, 7, image_format)

    png, width, height = to_png(data, "p1")

    assert _decode(png).format == "PNG"
    assert (width, height) == (320, 200)


def test_to_png_rejects_non_image() -> None:
    with pytest.raises(InvalidImageError) as caught:
        to_png(b"<html>oops</html>", "p1")

    assert "p1" in str(caught.value)


@pytest.mark.asyncio
async def test_generate_non_image_output_fails(fake_replicate: FakeReplicate) -> None:
    backend = make_replicate_backend(fake_replicate, "flux-schnell-replicate")
    fake_replicate.queue_outcome(image_format="garbage")
    try:
        with pytest.raises(InvalidImageError):
            await backend.generate(REQUEST, Recorder().context)
    finally:
        await backend.close()


@pytest.mark.asyncio
async def test_generate_empty_output_is_permanent(fake_replicate: FakeReplicate) -> None:
    backend = make_replicate_backend(fake_replicate, "flux-schnell-replicate")
    fake_replicate.queue_outcome(output_shape="empty_list")
    try:
        with pytest.raises(BackendError) as caught:
            await backend.generate(REQUEST, Recorder().context)
    finally:
        await backend.close()

    assert caught.value.transient is False
    assert "without an image output" in str(caught.value)


@pytest.mark.asyncio
async def test_generate_never_sends_token_to_file_host(fake_replicate: FakeReplicate) -> None:
    backend = make_replicate_backend(fake_replicate, "flux-dev-replicate")
    fake_replicate.queue_outcome(output_shape="url")
    try:
        await backend.generate(REQUEST, Recorder().context)
    finally:
        await backend.close()

    assert fake_replicate.file_requests_with_auth() == 0
    assert sum(1 for r in fake_replicate.requests if r.path.startswith("/files/")) == 1


# Model inputs


@pytest.mark.asyncio
@pytest.mark.parametrize("backend_name", sorted(REPLICATE_MODELS))
async def test_generate_each_model_accepts_input(fake_replicate: FakeReplicate, backend_name: str) -> None:
    backend = make_replicate_backend(fake_replicate, backend_name)
    request = GenerationRequest(prompt="a lighthouse", width=1344, height=768, seed=7)
    try:
        output = await backend.generate(request, Recorder().context)
    finally:
        await backend.close()

    spec = REPLICATE_MODELS[backend_name]
    prediction = fake_replicate.predictions[output.prediction_id]
    assert prediction["model"] == spec.model
    assert prediction["input"]["seed"] == 7
    assert prediction["input"]["output_format"] == "png"
    assert prediction["input"][spec.steps_input] == spec.default_steps
    assert output.result.steps == spec.default_steps
    assert output.result.guidance == spec.default_guidance
    assert (output.result.width, output.result.height) == output_size(spec.model, prediction["input"])


def test_build_input_flux_pro_uses_custom_size() -> None:
    spec = REPLICATE_MODELS["flux-pro-replicate"]
    request = GenerationRequest(prompt="p", width=1440, height=800, seed=1, steps=30, guidance=4.0)

    model_input = spec.build_input(request, steps=30, guidance=4.0)

    assert model_input["aspect_ratio"] == "custom"
    assert (model_input["width"], model_input["height"]) == (1440, 800)
    assert model_input["steps"] == 30
    assert model_input["guidance"] == 4.0
    assert "num_inference_steps" not in model_input
    assert "megapixels" not in model_input


def test_build_input_flux_schnell_uses_aspect_ratio() -> None:
    spec = REPLICATE_MODELS["flux-schnell-replicate"]

    large = spec.build_input(GenerationRequest("p", 1024, 576, 1), steps=4, guidance=None)
    small = spec.build_input(GenerationRequest("p", 512, 512, 1), steps=4, guidance=None)

    assert large["aspect_ratio"] == "16:9"
    assert large["megapixels"] == "1"
    assert small["megapixels"] == "0.25"
    assert "guidance" not in large
    assert "width" not in large
    assert large["go_fast"] is False


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [(1024, 1024, "1:1"), (1920, 1080, "16:9"), (1080, 1920, "9:16"), (2048, 880, "21:9"), (1200, 1000, "5:4")],
)
def test_nearest_aspect_ratio(width: int, height: int, expected: str) -> None:
    assert nearest_aspect_ratio(width, height, FLUX_ASPECT_RATIOS) == expected


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("backend_name", "request_options", "expected"),
    [
        ("flux-schnell-replicate", {"steps": 5}, "steps 5"),
        ("flux-schnell-replicate", {"guidance": 3.5}, "guidance 3.5"),
        ("flux-pro-replicate", {"guidance": 6.0}, "guidance 6.0"),
        ("flux-pro-replicate", {"width": 1600}, "width 1600"),
        ("flux-pro-replicate", {"width": 1000}, "width 1000"),
    ],
)
async def test_generate_rejects_unsupported_values(
    fake_replicate: FakeReplicate, backend_name: str, request_options: dict, expected: str
) -> None:
    backend = make_replicate_backend(fake_replicate, backend_name)
    options = {"prompt": "p", "width": 1024, "height": 1024, "seed": 1, **request_options}
    try:
        with pytest.raises(InvalidJobError) as caught:
            await backend.generate(GenerationRequest(**options), Recorder().context)
    finally:
        await backend.close()

    assert expected in str(caught.value)
    assert fake_replicate.create_count == 0


# Prediction ids and resume


@pytest.mark.asyncio
async def test_generate_saves_prediction_id_at_once(fake_replicate: FakeReplicate) -> None:
    backend = make_replicate_backend(fake_replicate, "flux-dev-replicate")
    recorder = Recorder(fake_replicate)
    try:
        output = await backend.generate(REQUEST, recorder.context)
    finally:
        await backend.close()

    assert recorder.saved_ids == [output.prediction_id]
    assert recorder.status_when_saved == ["starting"]
    assert output.predict_time_s == 1.25


@pytest.mark.asyncio
async def test_generate_resume_creates_no_prediction(fake_replicate: FakeReplicate) -> None:
    backend = make_replicate_backend(fake_replicate, "flux-dev-replicate", timeout_s=0.3)
    fake_replicate.queue_outcome(status="hang")
    first = Recorder(fake_replicate)
    with pytest.raises(BackendTimeoutError):
        await backend.generate(REQUEST, first.context)
    prediction_id = first.saved_ids[0]

    # The prediction finishes while no attempt watches it; the retry resumes it.
    fake_replicate.change_outcome(prediction_id, polls_until_done=0)
    second = Recorder(fake_replicate, prediction_id=prediction_id)
    backend.timeout_s = 10.0
    try:
        output = await backend.generate(REQUEST, second.context)
    finally:
        await backend.close()

    assert fake_replicate.create_count == 1
    assert output.prediction_id == prediction_id
    assert second.saved_ids == []
    assert _decode(output.result.png).format == "PNG"


@pytest.mark.asyncio
async def test_generate_resume_finished_prediction(fake_replicate: FakeReplicate) -> None:
    backend = make_replicate_backend(fake_replicate, "flux-schnell-replicate")
    try:
        first = await backend.generate(REQUEST, Recorder().context)
        gets_before = fake_replicate.get_count
        second = await backend.generate(REQUEST, Recorder(prediction_id=first.prediction_id).context)
    finally:
        await backend.close()

    assert fake_replicate.create_count == 1
    assert fake_replicate.get_count == gets_before + 1
    assert second.result.png == first.result.png


@pytest.mark.asyncio
async def test_generate_resume_unknown_id_creates_new(fake_replicate: FakeReplicate) -> None:
    backend = make_replicate_backend(fake_replicate, "flux-schnell-replicate")
    recorder = Recorder(prediction_id="doesnotexist0000")
    try:
        output = await backend.generate(REQUEST, recorder.context)
    finally:
        await backend.close()

    assert fake_replicate.create_count == 1
    assert recorder.saved_ids == [output.prediction_id]


@pytest.mark.asyncio
async def test_generate_malformed_stored_id_creates_new(fake_replicate: FakeReplicate) -> None:
    backend = make_replicate_backend(fake_replicate, "flux-schnell-replicate")
    try:
        await backend.generate(REQUEST, Recorder(prediction_id="../../v1/account").context)
    finally:
        await backend.close()

    assert fake_replicate.create_count == 1
    assert not [r for r in fake_replicate.requests if "account" in r.path]


@pytest.mark.asyncio
async def test_generate_continues_when_saving_id_fails(fake_replicate: FakeReplicate) -> None:
    async def broken_save(prediction_id: str) -> None:
        raise ConnectionError("database unreachable")

    backend = make_replicate_backend(fake_replicate, "flux-schnell-replicate")
    context = JobContext(job_id="job-2", attempt=1, save_prediction_id=broken_save)
    try:
        output = await backend.generate(REQUEST, context)
    finally:
        await backend.close()

    assert output.prediction_id is not None


@pytest.mark.asyncio
async def test_generate_reports_progress(fake_replicate: FakeReplicate) -> None:
    backend = make_replicate_backend(fake_replicate, "flux-schnell-replicate")
    recorder = Recorder()
    try:
        await backend.generate(REQUEST, recorder.context)
    finally:
        await backend.close()

    assert (2, 4) in recorder.progress
    assert recorder.progress[-1] == (4, 4)


# Final statuses


@pytest.mark.asyncio
async def test_generate_failed_prediction_is_permanent(fake_replicate: FakeReplicate) -> None:
    backend = make_replicate_backend(fake_replicate, "flux-dev-replicate")
    fake_replicate.queue_outcome(status="failed", error="NSFW content detected")
    recorder = Recorder()
    try:
        with pytest.raises(BackendError) as caught:
            await backend.generate(REQUEST, recorder.context)
    finally:
        await backend.close()

    assert caught.value.transient is False
    assert "NSFW content detected" in str(caught.value)
    assert recorder.saved_ids[0] in str(caught.value)


@pytest.mark.asyncio
async def test_generate_canceled_prediction_is_permanent(fake_replicate: FakeReplicate) -> None:
    backend = make_replicate_backend(fake_replicate, "flux-dev-replicate")
    fake_replicate.queue_outcome(status="canceled")
    recorder = Recorder()
    try:
        with pytest.raises(BackendError) as caught:
            await backend.generate(REQUEST, recorder.context)
    finally:
        await backend.close()

    assert caught.value.transient is False
    assert "canceled" in str(caught.value)
    assert recorder.saved_ids[0] in str(caught.value)


@pytest.mark.asyncio
async def test_generate_unknown_status_is_permanent(fake_replicate: FakeReplicate) -> None:
    backend = make_replicate_backend(fake_replicate, "flux-dev-replicate")
    fake_replicate.queue_outcome(status="evaporated")
    try:
        with pytest.raises(BackendError) as caught:
            await backend.generate(REQUEST, Recorder().context)
    finally:
        await backend.close()

    assert caught.value.transient is False


@pytest.mark.asyncio
async def test_generate_timeout_is_transient(fake_replicate: FakeReplicate) -> None:
    backend = make_replicate_backend(fake_replicate, "flux-dev-replicate", timeout_s=0.3)
    fake_replicate.queue_outcome(status="hang")
    recorder = Recorder()
    try:
        with pytest.raises(BackendTimeoutError) as caught:
            await backend.generate(REQUEST, recorder.context)
    finally:
        await backend.close()

    assert caught.value.transient is True
    assert recorder.saved_ids[0] in str(caught.value)
    assert fake_replicate.cancel_count == 0


@pytest.mark.asyncio
async def test_cancel_stops_prediction(fake_replicate: FakeReplicate) -> None:
    backend = make_replicate_backend(fake_replicate, "flux-dev-replicate", timeout_s=0.2)
    fake_replicate.queue_outcome(status="hang")
    recorder = Recorder()
    with pytest.raises(BackendTimeoutError):
        await backend.generate(REQUEST, recorder.context)
    try:
        await backend.cancel(recorder.saved_ids[0], job_id="job-1")
    finally:
        await backend.close()

    assert fake_replicate.predictions[recorder.saved_ids[0]]["status"] == "canceled"


# HTTP errors


@pytest.mark.asyncio
async def test_create_rate_limited_carries_retry_after(fake_replicate: FakeReplicate) -> None:
    backend = make_replicate_backend(fake_replicate, "flux-schnell-replicate")
    fake_replicate.fail_next(429, method="POST", retry_after="7")
    try:
        with pytest.raises(BackendUnavailableError) as caught:
            await backend.generate(REQUEST, Recorder().context)
    finally:
        await backend.close()

    assert caught.value.transient is True
    assert caught.value.retry_after_s == 7.0
    assert "429" in str(caught.value)
    assert fake_replicate.create_count == 0


@pytest.mark.asyncio
async def test_create_rate_limited_without_header(fake_replicate: FakeReplicate) -> None:
    backend = make_replicate_backend(fake_replicate, "flux-schnell-replicate")
    fake_replicate.fail_next(429, method="POST")
    try:
        with pytest.raises(BackendUnavailableError) as caught:
            await backend.generate(REQUEST, Recorder().context)
    finally:
        await backend.close()

    assert caught.value.retry_after_s is None


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [500, 502, 0])
async def test_create_server_error_is_transient(fake_replicate: FakeReplicate, status: int) -> None:
    backend = make_replicate_backend(fake_replicate, "flux-schnell-replicate")
    fake_replicate.fail_next(status, method="POST")
    try:
        with pytest.raises(BackendUnavailableError) as caught:
            await backend.generate(REQUEST, Recorder().context)
    finally:
        await backend.close()

    assert caught.value.transient is True


@pytest.mark.asyncio
async def test_poll_errors_within_limit_recover(fake_replicate: FakeReplicate) -> None:
    backend = make_replicate_backend(fake_replicate, "flux-schnell-replicate", max_poll_errors=3)
    fake_replicate.fail_next(500, count=2, method="GET", path_prefix="/v1/predictions/")
    try:
        output = await backend.generate(REQUEST, Recorder().context)
    finally:
        await backend.close()

    assert output.prediction_id is not None


@pytest.mark.asyncio
async def test_poll_errors_over_limit_are_transient(fake_replicate: FakeReplicate) -> None:
    backend = make_replicate_backend(fake_replicate, "flux-schnell-replicate", max_poll_errors=2)
    fake_replicate.fail_next(500, count=10, method="GET", path_prefix="/v1/predictions/")
    recorder = Recorder()
    try:
        with pytest.raises(BackendUnavailableError) as caught:
            await backend.generate(REQUEST, recorder.context)
    finally:
        await backend.close()

    assert recorder.saved_ids[0] in str(caught.value)


@pytest.mark.asyncio
async def test_wrong_token_is_permanent(fake_replicate: FakeReplicate, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="consumer")
    wrong_token = "r8_wrong_token_abcdefghijkl"
    backend = ReplicateBackend(REPLICATE_MODELS["flux-dev-replicate"], wrong_token, base_url=fake_replicate.url)
    try:
        with pytest.raises(BackendError) as caught:
            await backend.generate(REQUEST, Recorder().context)
    finally:
        await backend.close()

    assert caught.value.transient is False
    assert "REPLICATE_API_TOKEN" in str(caught.value)
    assert wrong_token not in str(caught.value)
    assert wrong_token not in repr(backend)
    assert not [r for r in caplog.records if wrong_token in r.getMessage() + repr(r.__dict__)]


# Construction and helpers


def test_from_settings_requires_token() -> None:
    with pytest.raises(SettingsError) as caught:
        ReplicateBackend.from_settings(Settings(), "flux-dev-replicate")

    assert "REPLICATE_API_TOKEN" in str(caught.value)


def test_from_settings_rejects_unknown_backend() -> None:
    with pytest.raises(SettingsError) as caught:
        ReplicateBackend.from_settings(Settings(replicate_api_token="t"), "flux-ultra-replicate")

    assert "flux-dev-replicate" in str(caught.value)


def test_from_settings_reads_base_url_and_timeout() -> None:
    settings = Settings(replicate_api_token="t", replicate_base_url="http://127.0.0.1:9", backend_timeout_s=42.0)

    backend = ReplicateBackend.from_settings(settings, "flux-pro-replicate")

    assert backend.base_url == "http://127.0.0.1:9"
    assert backend.timeout_s == 42.0
    assert backend.spec.model == "black-forest-labs/flux-pro"


@pytest.mark.asyncio
async def test_build_replicate_backends_covers_table() -> None:
    backends = build_replicate_backends(Settings(replicate_api_token="t", replicate_base_url="http://127.0.0.1:9"))
    try:
        assert sorted(backends) == sorted(REPLICATE_MODELS)
        assert all(backend.spec is REPLICATE_MODELS[name] for name, backend in backends.items())
    finally:
        for backend in backends.values():
            await backend.close()


def test_parse_retry_after() -> None:
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    in_30_s = parse_retry_after(formatdate(time.time() + 30, usegmt=True))
    assert in_30_s is not None
    assert 25 <= in_30_s <= 31
