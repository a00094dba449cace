"""Load a FLUX pipeline and turn batches of `GenerationRequest`s into PNG images.

This module does not import Ray, so the pipeline can be used and tested on its
own; `serve_app.deployment` wraps it in a Ray Serve replica.

`FluxGenerator.generate_batch` checks every request before any model work.
It groups the valid ones by (width, height, steps, guidance), because one
FluxPipeline call takes one size, and runs one pipeline call per group with
one seeded `torch.Generator` per request. It returns one result or one
exception per request, in request order.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imagen.errors import (
    BackendError,
    BackendUnavailableError,
    InvalidImageError,
    InvalidJobError,
    JobError,
    SettingsError,
)
from serve_app.options import ServeOptions
from serve_app.requests import GenerationProgress, GenerationRequest, GenerationResult
from serve_app.tiny import ensure_tiny_model, is_tiny_model

if TYPE_CHECKING:
    import torch
    from diffusers import FluxPipeline

logger = logging.getLogger(__name__)

# Image sides must be multiples of 16: the VAE downsamples by 8 and FLUX packs
# latents into 2x2 patches. FluxPipeline would round other values down
# silently, so they are rejected here instead.
SIZE_MULTIPLE = 16
MIN_SIZE = 64
MAX_SIZE = 2048

# Longer prompts are rejected before tokenizing, so a huge string costs nothing.
MAX_PROMPT_CHARS = 4000

# torch.manual_seed accepts any value in this range.
MIN_SEED = -(2**63)
MAX_SEED = 2**64 - 1

WARMUP_PROMPT = "a photo of a cat sitting on a red chair"

# Called with the request's index in the batch and its progress.
ProgressCallback = Callable[[int, GenerationProgress], None]


@dataclass(frozen=True)
class ModelLimits:
    """Limits of a loaded model's inputs, and the defaults for values a request leaves unset."""

    default_steps: int
    max_steps: int
    uses_guidance: bool
    default_guidance: float | None
    max_guidance: float
    max_sequence_length: int


@dataclass(frozen=True)
class CheckedRequest:
    """A request after `check_request`: every value resolved to what the pipeline will use."""

    request: GenerationRequest
    steps: int
    guidance: float | None
    warnings: tuple[str, ...] = ()

    @property
    def group_key(self) -> tuple[int, int, int, float | None]:
        return (self.request.width, self.request.height, self.steps, self.guidance)


# ---------------------------------------------------------------------------
# Loading


def resolve_device(device: str) -> str:
    """Map `auto` to `cuda` where a GPU exists and to `cpu` otherwise."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise SettingsError(f"IMAGEN_DEVICE must be auto, cpu or cuda, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SettingsError("IMAGEN_DEVICE is cuda but torch sees no CUDA device; set IMAGEN_DEVICE=cpu or auto")
    return device


def configure_cache_dirs(data_dir: Path) -> dict[str, str]:
    """Point the Hugging Face and TorchInductor caches into `data_dir`, unless already set.

    Returns the variables, so Ray can pass the same values to its replicas.
    huggingface_hub reads HF_HOME when it is first imported, so this must run
    before diffusers is imported in the process.
    """
    cache_dirs = {
        "HF_HOME": str(Path(data_dir) / "hf"),
        "TORCHINDUCTOR_CACHE_DIR": str(Path(data_dir) / "torchinductor"),
    }
    for name, value in cache_dirs.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in cache_dirs}


def load_pipeline(
    model_ref: str,
    device: str = "auto",
    options: ServeOptions | None = None,
    *,
    data_dir: Path | None = None,
) -> FluxPipeline:
    """Load a FluxPipeline and apply the fast-path `options`.

    `model_ref` is a Hugging Face Hub id, a local directory written by
    `save_pretrained`, or `tiny`/`tiny-dev` (built into `data_dir/models` on
    first use). On CUDA the weights are bfloat16, on CPU float32.
    """
    options = options or ServeOptions()
    if data_dir is None:
        from imagen.settings import Settings

        data_dir = Settings().data_dir
    configure_cache_dirs(data_dir)

    import torch
    from diffusers import FluxPipeline

    device = resolve_device(device)
    _check_options_for_device(options, device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    source = _model_source(model_ref, data_dir)
    logger.info(
        "loading pipeline",
        extra={"event": "pipeline_load_started", "model": model_ref, "device": device, "options": options.enabled()},
    )
    started_s = time.perf_counter()
    pipeline = FluxPipeline.from_pretrained(source, dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)

    apply_options(pipeline, options, device)

    logger.info(
        "loaded pipeline",
        extra={
            "event": "pipeline_load_finished",
            "model": model_ref,
            "device": device,
            "load_s": round(time.perf_counter() - started_s, 3),
        },
    )
    return pipeline


def _model_source(model_ref: str, data_dir: Path) -> str:
    if is_tiny_model(model_ref):
        return str(ensure_tiny_model(data_dir, model_ref))
    if Path(model_ref).expanduser().is_dir():
        return str(Path(model_ref).expanduser())
    return model_ref


def _check_options_for_device(options: ServeOptions, device: str) -> None:
    import torch

    # NOTE: the CUDA-only options (fp8, model and sequential offload) are
    # checked here, but this project's tests run on CPU and never apply them.
    if options.cpu_offload != "none" and device != "cuda":
        raise SettingsError(
            f"IMAGEN_CPU_OFFLOAD={options.cpu_offload} needs a CUDA device, got device {device}; "
            "set IMAGEN_CPU_OFFLOAD=none"
        )
    if options.fp8:
        if device != "cuda":
            raise SettingsError(f"IMAGEN_FP8 needs a CUDA device, got device {device}; unset IMAGEN_FP8")
        capability = torch.cuda.get_device_capability()
        if capability < (8, 9):
            raise SettingsError(
                f"IMAGEN_FP8 needs a GPU with compute capability 8.9 or newer (Ada, Hopper), "
                f"got {capability[0]}.{capability[1]}; unset IMAGEN_FP8"
            )


def apply_options(pipeline: FluxPipeline, options: ServeOptions, device: str) -> None:
    """Apply the fast-path options to a freshly loaded pipeline and move it to `device`.

    The order matters: QKV fusion replaces linear layers, so it comes before
    fp8 quantization, which must see the final layers. Offload hooks replace
    the move to the device. Compilation is last and lazy, and the first
    pipeline call (the warm-up) compiles.
    """
    import torch

    if options.fuse_qkv:
        pipeline.transformer.fuse_qkv_projections()

    if options.fp8:
        quantize_fp8(pipeline.transformer)

    if options.cpu_offload == "model":
        pipeline.enable_model_cpu_offload(device=device)
    elif options.cpu_offload == "sequential":
        pipeline.enable_sequential_cpu_offload(device=device)
    else:
        pipeline.to(device)

    if options.attention_backend is not None:
        pipeline.transformer.set_attention_backend(options.attention_backend)

    if options.vae_tiling:
        pipeline.vae.enable_tiling()
    if options.vae_slicing:
        pipeline.vae.enable_slicing()

    if options.channels_last:
        # Only the VAE has convolutions; the transformer works on token sequences.
        pipeline.vae.to(memory_format=torch.channels_last)

    if options.compile:
        pipeline.transformer.compile_repeated_blocks(fullgraph=True, mode=options.compile_mode)


def quantize_fp8(transformer: torch.nn.Module) -> None:
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as exc:
        raise SettingsError(
            f"IMAGEN_FP8 needs the torchao package, which failed to import ({exc}); "
            "install torchao or unset IMAGEN_FP8"
        ) from None

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


def model_limits(pipeline: FluxPipeline) -> ModelLimits:
    """Derive request limits from the loaded model.

    A transformer with a guidance embedding is a FLUX.1-dev style model with
    28 steps, guidance 3.5 and 512 T5 tokens. One without is FLUX.1-schnell
    style with 4 steps, no guidance and 256 T5 tokens, the length schnell was trained on.
    """
    uses_guidance = bool(pipeline.transformer.config.guidance_embeds)

    # The T5 tokenizer's model_max_length is 512 for FLUX.1 and lower for the tiny model.
    max_sequence_length = min(512 if uses_guidance else 256, pipeline.tokenizer_2.model_max_length)

    # NOTE: max_steps and max_guidance are cost and sanity caps chosen here,
    # not limits of the models; a caller needing more must raise them.
    if uses_guidance:
        return ModelLimits(default_steps=28, max_steps=100, uses_guidance=True, default_guidance=3.5,
                           max_guidance=20.0, max_sequence_length=max_sequence_length)
    return ModelLimits(default_steps=4, max_steps=50, uses_guidance=False, default_guidance=None,
                       max_guidance=20.0, max_sequence_length=max_sequence_length)


# ---------------------------------------------------------------------------
# Generation


class FluxGenerator:
    """Check requests and run them through a loaded FluxPipeline in shape groups."""

    def __init__(self, pipeline: FluxPipeline, model_name: str, limits: ModelLimits | None = None) -> None:
        self.pipeline = pipeline
        self.model_name = model_name
        self.limits = limits or model_limits(pipeline)

        # Set when a device error leaves the CUDA context unusable; the
        # deployment's health check reports it so Ray replaces the replica.
        self.fatal_error: str | None = None

    @classmethod
    def load(
        cls,
        model_ref: str,
        device: str = "auto",
        options: ServeOptions | None = None,
        *,
        data_dir: Path | None = None,
    ) -> FluxGenerator:
        return cls(load_pipeline(model_ref, device, options, data_dir=data_dir), model_ref)

    # -- input checks -------------------------------------------------------

    def check_request(self, request: GenerationRequest) -> CheckedRequest:
        """Validate one request and resolve its defaults, raising `InvalidJobError` on bad input.

        Nothing here touches the GPU. A value the pipeline would change is
        rejected. A value the model ignores (guidance on a schnell model) is
        dropped with a warning recorded in the result.
        """
        if not isinstance(request, GenerationRequest):
            raise InvalidJobError(f"request must be a GenerationRequest, got {type(request).__name__}")

        _check_side("width", request.width)
        _check_side("height", request.height)
        _check_seed(request.seed)
        steps = self._resolve_steps(request.steps)

        warnings: list[str] = []
        guidance = self._resolve_guidance(request, warnings)
        self._check_prompt(request, warnings)

        return CheckedRequest(request=request, steps=steps, guidance=guidance, warnings=tuple(warnings))

    def _resolve_steps(self, steps: int | None) -> int:
        if steps is None:
            return self.limits.default_steps
        if not _is_int(steps):
            raise InvalidJobError(f"steps must be an integer, got {steps!r}")
        if not 1 <= steps <= self.limits.max_steps:
            raise InvalidJobError(
                f"steps must be within [1, {self.limits.max_steps}] for model {self.model_name}, got {steps}"
            )
        return int(steps)

    def _resolve_guidance(self, request: GenerationRequest, warnings: list[str]) -> float | None:
        guidance = request.guidance
        if guidance is None:
            return self.limits.default_guidance

        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
            raise InvalidJobError(f"guidance must be a finite number, got {guidance!r}")

        if not self.limits.uses_guidance:
            message = (
                f"guidance {guidance} was not applied: model {self.model_name} has no guidance embedding "
                "(FLUX.1-schnell style), so the result reports guidance as None"
            )
            warnings.append(message)
            logger.warning(message, extra={"event": "guidance_ignored", "job_id": request.job_id})
            return None

        if not 0.0 <= guidance <= self.limits.max_guidance:
            raise InvalidJobError(f"guidance must be within [0, {self.limits.max_guidance}], got {guidance}")
        return float(guidance)

    def _check_prompt(self, request: GenerationRequest, warnings: list[str]) -> None:
        """Reject prompts the T5 encoder cannot take in full; note CLIP truncation.

        T5 carries the prompt's content in FLUX, so a prompt longer than its
        max_sequence_length is rejected rather than cut. CLIP contributes only
        a pooled vector and takes 77 tokens. A longer prompt is truncated for
        CLIP, as diffusers does, and the result carries a warning.
        """
        prompt = request.prompt
        if not isinstance(prompt, str):
            raise InvalidJobError(f"prompt must be a string, got {type(prompt).__name__}")
        if prompt.strip() == "":
            raise InvalidJobError("prompt is empty; send a non-empty description of the image")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidJobError(
                f"prompt is {len(prompt)} characters long, the maximum is {MAX_PROMPT_CHARS}; shorten it"
            )
        if "\x00" in prompt:
            raise InvalidJobError("prompt contains a NUL character; remove it")

        t5_tokens = len(self.pipeline.tokenizer_2(prompt).input_ids)
        if t5_tokens > self.limits.max_sequence_length:
            raise InvalidJobError(
                f"prompt is {t5_tokens} T5 tokens long, model {self.model_name} takes at most "
                f"{self.limits.max_sequence_length}; shorten it"
            )

        clip_max_tokens = self.pipeline.tokenizer.model_max_length
        clip_tokens = len(self.pipeline.tokenizer(prompt).input_ids)
        if clip_tokens > clip_max_tokens:
            message = (
                f"prompt is {clip_tokens} CLIP tokens long; CLIP saw only the first {clip_max_tokens} "
                "(the T5 encoder saw the whole prompt)"
            )
            warnings.append(message)
            logger.info(message, extra={"event": "prompt_truncated_for_clip", "job_id": request.job_id})

    # -- generation ---------------------------------------------------------

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        progress_callback: ProgressCallback | None = None,
    ) -> list[GenerationResult | JobError]:
        """Generate one image per request and return a result or an exception for each, in order.

        An invalid request fails before any model work without touching the
        others. When a group's pipeline call raises, that group's requests run
        again one at a time, so only the request that also fails alone fails.
        """
        outcomes: list[GenerationResult | JobError | None] = [None] * len(requests)

        groups: dict[tuple[int, int, int, float | None], list[tuple[int, CheckedRequest]]] = {}
        for index, request in enumerate(requests):
            try:
                checked = self.check_request(request)
            except InvalidJobError as exc:
                logger.warning(
                    "rejected request: %s", exc,
                    extra={"event": "request_rejected", "job_id": getattr(request, "job_id", None)},
                )
                outcomes[index] = exc
                continue
            groups.setdefault(checked.group_key, []).append((index, checked))

        for members in groups.values():
            for index, outcome in self._run_group(members, progress_callback):
                outcomes[index] = outcome

        missing = [index for index, outcome in enumerate(outcomes) if outcome is None]
        if missing:
            raise BackendError(f"generate_batch produced no outcome for requests at positions {missing}")
        return outcomes

    def _run_group(
        self,
        members: list[tuple[int, CheckedRequest]],
        progress_callback: ProgressCallback | None,
    ) -> list[tuple[int, GenerationResult | JobError]]:
        job_ids = [checked.request.job_id for _, checked in members]
        try:
            return self._generate_group(members, progress_callback)
        except Exception as exc:  # noqa: BLE001 - every pipeline failure is turned into a per-request error
            if len(members) == 1:
                index, checked = members[0]
                return [(index, self._backend_error(exc, checked.request.job_id))]
            logger.warning(
                "group of %d failed, retrying one by one: %s", len(members), exc,
                extra={"event": "group_failed", "job_ids": job_ids},
            )

        outcomes = []
        for member in members:
            index, checked = member
            try:
                outcomes.extend(self._generate_group([member], progress_callback))
            except Exception as exc:  # noqa: BLE001 - see above
                outcomes.append((index, self._backend_error(exc, checked.request.job_id)))
        return outcomes

    def _generate_group(
        self,
        members: list[tuple[int, CheckedRequest]],
        progress_callback: ProgressCallback | None,
    ) -> list[tuple[int, GenerationResult | JobError]]:
        """Run one pipeline call for requests that share width, height, steps and guidance."""
        import torch

        first = members[0][1]
        width, height, steps, guidance = first.group_key
        prompts = [checked.request.prompt for _, checked in members]

        # CPU generators make the initial noise depend only on the seed, not on
        # the device or on which other requests share the batch: diffusers draws
        # each image's latents from its own generator.
        generators = [torch.Generator(device="cpu").manual_seed(checked.request.seed) for _, checked in members]

        def on_step_end(pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict) -> dict:
            if progress_callback is not None:
                progress = GenerationProgress(step=step_index + 1, total=steps)
                for index, _ in members:
                    progress_callback(index, progress)
            return callback_kwargs

        started_s = time.perf_counter()
        with torch.inference_mode():
            output = self.pipeline(
                prompt=prompts,
                width=width,
                height=height,
                num_inference_steps=steps,
                # The pipeline ignores guidance_scale when the transformer has no
                # guidance embedding; 0.0 only fills the argument.
                guidance_scale=guidance if guidance is not None else 0.0,
                generator=generators,
                max_sequence_length=self.limits.max_sequence_length,
                output_type="np",
                callback_on_step_end=on_step_end,
            )
        elapsed_s = time.perf_counter() - started_s
        gpu_s = elapsed_s / len(members)

        images = output.images
        if images.shape[0] != len(members):
            raise BackendError(f"pipeline returned {images.shape[0]} images for {len(members)} prompts")

        outcomes: list[tuple[int, GenerationResult | JobError]] = []
        for position, (index, checked) in enumerate(members):
            try:
                png = encode_png(images[position])
            except InvalidImageError as exc:
                logger.warning(
                    "invalid image: %s", exc,
                    extra={"event": "invalid_image", "job_id": checked.request.job_id},
                )
                outcomes.append((index, exc))
                continue
            outcomes.append((index, self._result(checked, png, gpu_s, len(members))))
        return outcomes

    def _result(self, checked: CheckedRequest, png: bytes, gpu_s: float, batch_size: int) -> GenerationResult:
        return GenerationResult(
            png=png,
            width=checked.request.width,
            height=checked.request.height,
            seed=checked.request.seed,
            steps=checked.steps,
            guidance=checked.guidance,
            model=self.model_name,
            gpu_s=gpu_s,
            batch_size=batch_size,
            warnings=checked.warnings,
        )

    def _backend_error(self, exc: Exception, job_id: str | None) -> BackendError:
        """Turn a pipeline exception into a `BackendError`, flagging errors that break the device."""
        if isinstance(exc, BackendError):
            error = exc
        elif _is_out_of_memory(exc):
            error = BackendError(f"the GPU ran out of memory: {exc}", transient=True)
        else:
            error = BackendError(f"pipeline failed: {type(exc).__name__}: {exc}")

        if _is_fatal_device_error(exc):
            # BackendUnavailableError is transient by class: an instance-level
            # `transient` does not survive Ray's exception wrapping (Ray 2.60).
            self.fatal_error = f"{type(exc).__name__}: {exc}"
            error = BackendUnavailableError(f"pipeline failed with a device error, replica will restart: {exc}")

        logger.error(
            "generation failed: %s", error,
            exc_info=exc,
            extra={"event": "generation_failed", "job_id": job_id},
        )
        return error

    # -- warm-up ------------------------------------------------------------

    def warm_up(self, shapes: Sequence[tuple[int, int, int]], *, batch_sizes: Sequence[int] = (1,)) -> float:
        """Run each (width, height, steps) shape once per batch size so the first job is not slow.

        With compilation on, this is when torch.compile traces and compiles.
        Raises `SettingsError` for an invalid shape and `BackendError` when a
        warm-up generation fails. Returns the total warm-up time in seconds.
        """
        started_s = time.perf_counter()
        for width, height, steps in shapes:
            for batch_size in batch_sizes:
                requests = [
                    GenerationRequest(prompt=WARMUP_PROMPT, width=width, height=height, seed=seed,
                                      steps=steps, job_id=f"warmup-{width}x{height}x{steps}")
                    for seed in range(batch_size)
                ]
                shape_started_s = time.perf_counter()
                outcomes = self.generate_batch(requests)
                for outcome in outcomes:
                    if isinstance(outcome, InvalidJobError):
                        raise SettingsError(f"IMAGEN_WARMUP_SHAPES has an invalid shape {width}x{height}x{steps}: "
                                            f"{outcome}")
                    if isinstance(outcome, Exception):
                        raise BackendError(f"warm-up of {width}x{height}x{steps} failed: {outcome}")
                logger.info(
                    "warmed up shape",
                    extra={"event": "warmup_shape_finished", "width": width, "height": height, "steps": steps,
                           "batch_size": batch_size, "elapsed_s": round(time.perf_counter() - shape_started_s, 3)},
                )
        return time.perf_counter() - started_s


# ---------------------------------------------------------------------------
# Checks and encoding


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_side(name: str, value: object) -> None:
    if not _is_int(value):
        raise InvalidJobError(f"{name} must be an integer number of pixels, got {value!r}")
    if not MIN_SIZE <= value <= MAX_SIZE:
        raise InvalidJobError(f"{name} must be within [{MIN_SIZE}, {MAX_SIZE}] pixels, got {value}")
    if value % SIZE_MULTIPLE != 0:
        lower = value - value % SIZE_MULTIPLE
        upper = lower + SIZE_MULTIPLE
        choices = " or ".join(str(side) for side in (lower, upper) if MIN_SIZE <= side <= MAX_SIZE)
        raise InvalidJobError(f"{name} must be a multiple of {SIZE_MULTIPLE}, got {value}; use {choices}")


def _check_seed(seed: object) -> None:
    if not _is_int(seed):
        raise InvalidJobError(f"seed must be an integer, got {seed!r}")
    if not MIN_SEED <= seed <= MAX_SEED:
        raise InvalidJobError(f"seed must be within [-2**63, 2**64 - 1], got {seed}")


def encode_png(image: np.ndarray) -> bytes:
    """Encode a float HxWx3 image in [0, 1] as PNG, raising `InvalidImageError` for unusable pixels."""
    from PIL import Image

    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidImageError(f"image must have shape (height, width, 3), got {image.shape}")

    finite = np.isfinite(image)
    if not finite.all():
        bad_fraction = 1.0 - float(finite.mean())
        raise InvalidImageError(f"image has non-finite pixel values ({bad_fraction:.1%} of values are NaN or inf)")

    pixels = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if pixels.max() == 0:
        raise InvalidImageError("image is entirely black")

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _is_fatal_device_error(exc: BaseException) -> bool:
    # After an illegal memory access or a device-side assert, every later CUDA
    # call in the process fails, so the replica must be replaced. Running out
    # of memory leaves the context usable.
    if _is_out_of_memory(exc):
        return False
    text = str(exc)
    return "CUDA error" in text or "illegal memory access" in text or "device-side assert" in text
