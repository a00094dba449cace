"""Request and result types exchanged between the consumer and the deployment.

This module imports neither torch nor diffusers, so a consumer on a host
without a GPU can build requests for a deployment that runs elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GenerationRequest:
    """One image to generate.

    `steps` and `guidance` are None when the job left them to the model's
    defaults. `trace_context` carries W3C trace headers (`traceparent`,
    `tracestate`) across the Ray boundary.
    """

    prompt: str
    width: int
    height: int
    seed: int
    steps: int | None = None
    guidance: float | None = None
    job_id: str | None = None
    trace_context: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationResult:
    """A generated image, PNG-encoded, with what was actually used to make it."""

    png: bytes
    width: int
    height: int
    seed: int
    steps: int
    guidance: float | None
    model: str
    gpu_s: float
    # Number of images in the pipeline call that produced this one; gpu_s is
    # that call's wall time divided by it.
    batch_size: int = 1
    # Changes the server made to the request, e.g. guidance the model ignores
    # or a prompt truncated for the CLIP encoder.
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationProgress:
    """Progress of one generation: `step` of `total` denoising steps are done."""

    step: int
    total: int
