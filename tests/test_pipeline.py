"""FluxGenerator and load_pipeline on the tiny model, without Ray."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from imagen.errors import BackendError, InvalidImageError, InvalidJobError, JobError, SettingsError
from serve_app.options import ServeOptions
from serve_app.pipeline import MAX_PROMPT_CHARS, FluxGenerator, encode_png
from serve_app.requests import GenerationProgress, GenerationRequest, GenerationResult

# Batched output may differ from a single call by one 8-bit level.
PIXEL_TOLERANCE = 1


def make_request(prompt: str = "a photo of a cat", width: int = 64, height: int = 64, seed: int = 1,
                 **kwargs) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, width=width, height=height, seed=seed, **kwargs)


def make_result(batch_size: int = 1) -> GenerationResult:
    return GenerationResult(png=b"", width=64, height=64, seed=1, steps=4, guidance=None, model="tiny", gpu_s=0.01,
                            batch_size=batch_size)


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("imagen-pipeline")


@pytest.fixture(scope="module")
def generator(data_dir) -> FluxGenerator:
    return FluxGenerator.load("tiny", "cpu", data_dir=data_dir)


@pytest.fixture(scope="module")
def dev_generator(data_dir) -> FluxGenerator:
    return FluxGenerator.load("tiny-dev", "cpu", data_dir=data_dir)


# ---------------------------------------------------------------------------
# check_request


@pytest.mark.parametrize(("width", "height", "expected"), [
    (100, 64, "width must be a multiple of 16, got 100; use 96 or 112"),
    (64, 1000, "height must be a multiple of 16, got 1000; use 992 or 1008"),
    (48, 64, "width must be within [64, 2048] pixels, got 48"),
    (64, 2064, "height must be within [64, 2048] pixels, got 2064"),
    (64.0, 64, "width must be an integer number of pixels, got 64.0"),
    (True, 64, "width must be an integer number of pixels, got True"),
])
def test_check_request_rejects_bad_size(generator, width, height, expected):
    with pytest.raises(InvalidJobError) as caught:
        generator.check_request(make_request(width=width, height=height))
    assert str(caught.value) == expected
    assert caught.value.transient is False


@pytest.mark.parametrize("steps", [0, -1, 51, 2.5])
def test_check_request_rejects_bad_steps(generator, steps):
    with pytest.raises(InvalidJobError, match="steps must be"):
        generator.check_request(make_request(steps=steps))


def test_check_request_defaults_steps_per_model(generator, dev_generator):
    assert generator.check_request(make_request()).steps == 4
    assert dev_generator.check_request(make_request()).steps == 28


@pytest.mark.parametrize(("prompt", "expected"), [
    ("", "prompt is empty"),
    ("   \n", "prompt is empty"),
    ("x" * (MAX_PROMPT_CHARS + 1), f"prompt is {MAX_PROMPT_CHARS + 1} characters long"),
    ("a cat\x00", "NUL character"),
    (" ".join(["cat"] * 100), "T5 tokens long, model tiny takes at most 128"),
])
def test_check_request_rejects_bad_prompt(generator, prompt, expected):
    with pytest.raises(InvalidJobError, match=expected):
        generator.check_request(make_request(prompt=prompt))


def test_check_request_rejects_non_string_prompt(generator):
    with pytest.raises(InvalidJobError, match="prompt must be a string, got int"):
        generator.check_request(make_request(prompt=5))


@pytest.mark.parametrize("seed", [-(2**63) - 1, 2**64, 1.5, None])
def test_check_request_rejects_bad_seed(generator, seed):
    with pytest.raises(InvalidJobError, match="seed must be"):
        generator.check_request(make_request(seed=seed))


def test_check_request_rejects_non_request(generator):
    with pytest.raises(InvalidJobError, match="request must be a GenerationRequest, got dict"):
        generator.check_request({"prompt": "a cat"})


def test_check_request_guidance_not_applied_on_schnell_model(generator):
    checked = generator.check_request(make_request(guidance=3.5))

    assert checked.guidance is None
    assert len(checked.warnings) == 1
    assert "guidance 3.5 was not applied" in checked.warnings[0]


def test_check_request_guidance_applied_on_dev_model(dev_generator):
    assert dev_generator.check_request(make_request(guidance=5.0)).guidance == 5.0
    assert dev_generator.check_request(make_request()).guidance == 3.5
    assert dev_generator.check_request(make_request(guidance=5.0)).warnings == ()


@pytest.mark.parametrize("guidance", [-0.5, 20.5, float("nan"), float("inf"), "3"])
def test_check_request_rejects_bad_guidance(dev_generator, guidance):
    with pytest.raises(InvalidJobError, match="guidance must be"):
        dev_generator.check_request(make_request(guidance=guidance))


def test_check_request_notes_clip_truncation(generator):
    # 90 CLIP tokens, more than CLIP's 77, but 106 T5 tokens, within the tiny model's 128.
    prompt = " ".join(["a photo of a cat"] * 15)
    checked = generator.check_request(make_request(prompt=prompt))

    assert any("CLIP saw only the first 77" in warning for warning in checked.warnings)


# ---------------------------------------------------------------------------
# generate_batch


def test_generate_batch_returns_requested_sizes(generator):
    sizes = [(64, 64), (128, 64), (64, 96), (80, 112)]
    requests = [make_request(width=width, height=height, seed=index) for index, (width, height) in enumerate(sizes)]

    outcomes = generator.generate_batch(requests)

    for (width, height), outcome in zip(sizes, outcomes, strict=True):
        assert isinstance(outcome, GenerationResult)
        assert (outcome.width, outcome.height) == (width, height)
        assert decode(outcome.png).shape == (height, width, 3)


def test_generate_batch_mixed_sizes(generator):
    requests = [
        make_request(width=64, height=64, seed=1, job_id="a"),
        make_request(width=96, height=64, seed=2, job_id="b"),
        make_request(width=64, height=64, seed=3, job_id="c"),
        make_request(width=64, height=64, seed=4, steps=2, job_id="d"),
    ]

    outcomes = generator.generate_batch(requests)

    assert [outcome.seed for outcome in outcomes] == [1, 2, 3, 4]
    assert [outcome.batch_size for outcome in outcomes] == [2, 1, 2, 1]
    assert [outcome.steps for outcome in outcomes] == [4, 4, 4, 2]
    assert outcomes[0].gpu_s == outcomes[2].gpu_s
    assert all(outcome.gpu_s > 0 for outcome in outcomes)
    assert all(outcome.model == "tiny" for outcome in outcomes)


def test_generate_batch_same_seed_same_image(generator):
    alone = generator.generate_batch([make_request(seed=7)])[0]
    again = generator.generate_batch([make_request(seed=7)])[0]
    in_batch = generator.generate_batch([make_request(seed=3), make_request(seed=7), make_request(seed=5)])[1]

    assert again.png == alone.png
    assert np.abs(decode(in_batch.png) - decode(alone.png)).max() <= PIXEL_TOLERANCE


def test_generate_batch_different_seed_different_image(generator):
    first, second = generator.generate_batch([make_request(seed=1), make_request(seed=2)])

    assert np.abs(decode(first.png) - decode(second.png)).mean() > 5


def test_generate_batch_bad_request_fails_alone(generator):
    requests = [make_request(seed=1), make_request(width=100), make_request(seed=2), make_request(prompt="")]

    outcomes = generator.generate_batch(requests)

    assert isinstance(outcomes[0], GenerationResult)
    assert isinstance(outcomes[1], InvalidJobError)
    assert isinstance(outcomes[2], GenerationResult)
    assert isinstance(outcomes[3], InvalidJobError)
    assert outcomes[0].batch_size == 2


def test_generate_batch_group_failure_retries_one_by_one(generator):
    poison_ids = generator.pipeline.tokenizer_2("a poisoned prompt", return_tensors="pt").input_ids[0]

    def fail_on_poison(module, args):
        input_ids = args[0]
        for row in input_ids:
            if torch.equal(row[: len(poison_ids)], poison_ids):
                raise RuntimeError("encoder failed on the poisoned prompt")

    hook = generator.pipeline.text_encoder_2.register_forward_pre_hook(fail_on_poison)
    try:
        outcomes = generator.generate_batch([
            make_request(seed=1, job_id="good-1"),
            make_request(prompt="a poisoned prompt", seed=2, job_id="poisoned"),
            make_request(seed=3, job_id="good-2"),
        ])
    finally:
        hook.remove()

    assert isinstance(outcomes[0], GenerationResult)
    assert isinstance(outcomes[1], BackendError)
    assert "encoder failed on the poisoned prompt" in str(outcomes[1])
    assert isinstance(outcomes[2], GenerationResult)
    assert outcomes[0].batch_size == 1
    assert generator.fatal_error is None


def _corrupt_decoder_output(generator, position: int, value: float):
    def corrupt(module, args, output):
        output = output.clone()
        output[position] = value
        return output

    return generator.pipeline.vae.decoder.register_forward_hook(corrupt)


def test_generate_batch_nan_output_is_invalid_image(generator):
    hook = _corrupt_decoder_output(generator, position=1, value=float("nan"))
    try:
        outcomes = generator.generate_batch([make_request(seed=1), make_request(seed=2), make_request(seed=3)])
    finally:
        hook.remove()

    assert isinstance(outcomes[0], GenerationResult)
    assert isinstance(outcomes[1], InvalidImageError)
    assert "non-finite" in str(outcomes[1])
    assert isinstance(outcomes[2], GenerationResult)


def test_generate_batch_black_output_is_invalid_image(generator):
    # The decoder works in [-1, 1]; -1 everywhere becomes an all-zero image.
    hook = _corrupt_decoder_output(generator, position=0, value=-1.0)
    try:
        outcomes = generator.generate_batch([make_request(seed=1), make_request(seed=2)])
    finally:
        hook.remove()

    assert isinstance(outcomes[0], InvalidImageError)
    assert "entirely black" in str(outcomes[0])
    assert isinstance(outcomes[1], GenerationResult)


def test_generate_batch_reports_progress_per_request(generator):
    events: list[tuple[int, GenerationProgress]] = []
    requests = [make_request(seed=1, steps=3), make_request(seed=2, width=96, steps=2), make_request(width=100)]

    generator.generate_batch(requests, progress_callback=lambda index, progress: events.append((index, progress)))

    assert [progress for index, progress in events if index == 0] == [GenerationProgress(step, 3) for step in (1, 2, 3)]
    assert [progress for index, progress in events if index == 1] == [GenerationProgress(step, 2) for step in (1, 2)]
    assert [progress for index, progress in events if index == 2] == []


def test_generate_batch_empty(generator):
    assert generator.generate_batch([]) == []


def test_generate_batch_dev_model_uses_guidance(dev_generator):
    low, high = dev_generator.generate_batch([
        make_request(seed=1, guidance=1.0, steps=2),
        make_request(seed=1, guidance=10.0, steps=2),
    ])

    assert (low.guidance, high.guidance) == (1.0, 10.0)
    assert low.batch_size == 1
    assert low.png != high.png


# ---------------------------------------------------------------------------
# warm-up, encoding, errors


def test_warm_up_runs_each_shape(generator):
    assert generator.warm_up([(64, 64, 1), (96, 64, 1)]) > 0


def test_warm_up_rejects_invalid_shape(generator):
    with pytest.raises(SettingsError, match="invalid shape 65x64x4"):
        generator.warm_up([(65, 64, 4)])


def test_encode_png_rejects_wrong_shape():
    with pytest.raises(InvalidImageError, match="shape"):
        encode_png(np.zeros((8, 8), dtype=np.float32))


def test_encode_png_round_trip():
    image = np.linspace(0.0, 1.0, 16 * 16 * 3, dtype=np.float32).reshape(16, 16, 3)
    pixels = decode(encode_png(image))

    assert pixels.shape == (16, 16, 3)
    assert np.abs(pixels - np.round(image * 255)).max() == 0


@pytest.mark.parametrize("error", [
    InvalidJobError("width must be a multiple of 16, got 100"),
    BackendError("the GPU ran out of memory", transient=True),
    InvalidImageError("image is entirely black"),
])
def test_job_errors_pickle(error: JobError):
    restored = pickle.loads(pickle.dumps(error))

    assert type(restored) is type(error)
    assert str(restored) == str(error)
    assert restored.transient == error.transient


def test_job_errors_survive_ray_task_error_wrapping():
    from ray.exceptions import RayTaskError

    # Ray sends the RayTaskError and builds the dual-class exception on the caller's side.
    cause = BackendError("the GPU ran out of memory", transient=True)
    sent = pickle.loads(pickle.dumps(RayTaskError("generate", "traceback", cause)))
    raised = sent.as_instanceof_cause()

    assert isinstance(raised, BackendError)
    assert str(raised.cause) == "the GPU ran out of memory"
    assert raised.cause.transient is True
    # Ray 2.60's dual class finds the class attribute before delegating to the
    # cause, so an instance-level `transient` is only correct on `.cause`.
    assert raised.transient is False


# ---------------------------------------------------------------------------
# Options


@pytest.fixture(scope="module")
def baseline_images(generator) -> list[np.ndarray]:
    outcomes = generator.generate_batch([make_request(seed=1), make_request(seed=2)])
    return [decode(outcome.png) for outcome in outcomes]


@pytest.mark.parametrize("options", [
    ServeOptions(fuse_qkv=True),
    ServeOptions(attention_backend="native"),
    ServeOptions(attention_backend="_native_math"),
    ServeOptions(vae_slicing=True),
    ServeOptions(channels_last=True),
], ids=["fuse_qkv", "attention_native", "attention_math", "vae_slicing", "channels_last"])
def test_options_keep_output(data_dir, baseline_images, options):
    generator = FluxGenerator.load("tiny", "cpu", options, data_dir=data_dir)

    outcomes = generator.generate_batch([make_request(seed=1), make_request(seed=2)])

    for outcome, expected in zip(outcomes, baseline_images, strict=True):
        assert isinstance(outcome, GenerationResult)
        assert np.abs(decode(outcome.png) - expected).max() <= PIXEL_TOLERANCE


def test_options_vae_tiling_decodes_in_tiles(data_dir):
    generator = FluxGenerator.load("tiny", "cpu", ServeOptions(vae_tiling=True), data_dir=data_dir)
    vae = generator.pipeline.vae
    decoded_tiles = []
    hook = vae.decoder.register_forward_hook(lambda module, args, output: decoded_tiles.append(output.shape))

    # The tiny VAE's tile is 64 pixels, so a 128-pixel image takes several tiles.
    try:
        outcome = generator.generate_batch([make_request(width=128, height=128)])[0]
    finally:
        hook.remove()

    assert vae.use_tiling is True
    assert len(decoded_tiles) > 1
    assert decode(outcome.png).shape == (128, 128, 3)


@pytest.mark.slow
def test_options_compile_keeps_output(data_dir, baseline_images):
    # Regional compilation of the tiny transformer takes about 30 s on 2 CPU
    # cores with a cold inductor cache. One shape with one batch size keeps it to one compile.
    generator = FluxGenerator.load("tiny", "cpu", ServeOptions(compile=True), data_dir=data_dir)
    generator.warm_up([(64, 64, 4)], batch_sizes=(2,))

    outcomes = generator.generate_batch([make_request(seed=1), make_request(seed=2)])

    for outcome, expected in zip(outcomes, baseline_images, strict=True):
        assert isinstance(outcome, GenerationResult)
        assert np.abs(decode(outcome.png) - expected).max() <= PIXEL_TOLERANCE


@pytest.mark.parametrize(("options", "expected"), [
    (ServeOptions(cpu_offload="model"), "IMAGEN_CPU_OFFLOAD=model needs a CUDA device"),
    (ServeOptions(cpu_offload="sequential"), "IMAGEN_CPU_OFFLOAD=sequential needs a CUDA device"),
    (ServeOptions(fp8=True), "IMAGEN_FP8 needs a CUDA device"),
])
def test_options_rejected_on_cpu(data_dir, options, expected):
    with pytest.raises(SettingsError, match=expected):
        FluxGenerator.load("tiny", "cpu", options, data_dir=data_dir)


def test_options_fp8_without_torchao_names_package(monkeypatch):
    import sys

    from serve_app.pipeline import quantize_fp8

    # None in sys.modules makes the import fail even where torchao is installed.
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(SettingsError, match="IMAGEN_FP8 needs the torchao package"):
        quantize_fp8(torch.nn.Linear(4, 4))


def test_options_from_env():
    options = ServeOptions.from_env({
        "IMAGEN_COMPILE": "true",
        "IMAGEN_COMPILE_MODE": "max-autotune-no-cudagraphs",
        "IMAGEN_ATTENTION_BACKEND": "_native_cudnn",
        "IMAGEN_VAE_TILING": "1",
        "IMAGEN_CPU_OFFLOAD": "Model",
        "IMAGEN_FUSE_QKV": "off",
        "IMAGEN_CHANNELS_LAST": "",
    })

    assert options == ServeOptions(compile=True, compile_mode="max-autotune-no-cudagraphs",
                                   attention_backend="_native_cudnn", vae_tiling=True, cpu_offload="model")
    assert options.enabled() == {"compile": True, "compile_mode": "max-autotune-no-cudagraphs",
                                 "attention_backend": "_native_cudnn", "vae_tiling": True, "cpu_offload": "model"}


@pytest.mark.parametrize(("environ", "expected"), [
    ({"IMAGEN_COMPILE": "maybe"}, "IMAGEN_COMPILE must be one of 1/0"),
    ({"IMAGEN_CPU_OFFLOAD": "disk"}, "IMAGEN_CPU_OFFLOAD must be one of none, model, sequential, got 'disk'"),
    ({"IMAGEN_COMPILE_MODE": "fast"}, "IMAGEN_COMPILE_MODE must be one of"),
    ({"IMAGEN_ATTENTION_BACKEND": "flash9"}, "IMAGEN_ATTENTION_BACKEND must be one of"),
    ({"IMAGEN_CPU_OFFLOAD": "sequential", "IMAGEN_COMPILE": "1"}, "cannot be combined with IMAGEN_COMPILE"),
    ({"IMAGEN_CPU_OFFLOAD": "sequential", "IMAGEN_FP8": "1"}, "cannot be combined with IMAGEN_FP8"),
])
def test_options_from_env_rejects_invalid(environ, expected):
    with pytest.raises(SettingsError, match=expected):
        ServeOptions.from_env(environ)


# ---------------------------------------------------------------------------
# Tracing


def test_tracing_generation_span_joins_job_trace():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    from serve_app import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traced = make_request(job_id="job-7", trace_context={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    untraced = make_request(job_id="job-8")

    batch_span = tracing.start_batch_span([traced, untraced], tracer)
    spans = [tracing.start_generation_span(request, batch_span, tracer) for request in (traced, untraced)]
    batch_span.end()
    tracing.end_generation_span(spans[0], InvalidJobError("width must be a multiple of 16, got 100"))
    tracing.end_generation_span(spans[1], make_result(batch_size=2))

    finished = {span.attributes.get("imagen.job_id"): span for span in exporter.get_finished_spans()}
    batch_context = batch_span.get_span_context()
    assert format(finished["job-7"].context.trace_id, "032x") == trace_id
    assert format(finished["job-7"].parent.span_id, "016x") == "00f067aa0ba902b7"
    assert finished["job-7"].status.status_code == StatusCode.ERROR
    assert finished["job-7"].links[0].context.span_id == batch_context.span_id
    assert finished["job-8"].parent is None
    assert finished["job-8"].attributes["imagen.batch_size"] == 2
