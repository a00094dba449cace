"""The interface every model backend offers the consumer.

A backend turns a `GenerationRequest` into a `GenerationResult`. It declares
what it supports in a `BackendSpec`, so the consumer rejects a job the backend
cannot take before any model work starts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from imagen.errors import InvalidJobError
from serve_app.requests import GenerationRequest, GenerationResult

# Characters that take no space but that str.isspace() does not count as white space.
ZERO_WIDTH_CHARACTERS = frozenset("\u200b\u200c\u200d\u2060\ufeff")


def is_blank(text: str) -> bool:
    """True when `text` has nothing but white space and zero-width characters."""
    return all(character.isspace() or character in ZERO_WIDTH_CHARACTERS for character in text)


@dataclass(frozen=True)
class BackendSpec:
    """Limits of a backend; a job outside them fails before generation."""

    name: str
    kind: str  # "local", "replicate" or "mock"
    model: str
    default_steps: int
    min_steps: int = 1
    max_steps: int = 50
    supports_guidance: bool = False
    default_guidance: float | None = None
    min_size: int = 64
    max_size: int = 2048
    size_multiple: int = 16
    max_prompt_chars: int = 2000
    extra: dict[str, str] = field(default_factory=dict)

    def check(self, *, prompt: str, width: int, height: int, steps: int | None, guidance: float | None) -> None:
        """Raise InvalidJobError naming the first value this backend cannot take."""
        if is_blank(prompt):
            raise InvalidJobError("prompt is empty or only white space: write a description of the image")
        if len(prompt) > self.max_prompt_chars:
            raise InvalidJobError(
                f"prompt has {len(prompt)} characters, backend {self.name} takes at most "
                f"{self.max_prompt_chars}: shorten it"
            )
        for label, value in (("width", width), ("height", height)):
            if not self.min_size <= value <= self.max_size or value % self.size_multiple:
                raise InvalidJobError(
                    f"{label} {value} is not supported by backend {self.name}: use a multiple of "
                    f"{self.size_multiple} between {self.min_size} and {self.max_size}"
                )
        if steps is not None and not self.min_steps <= steps <= self.max_steps:
            raise InvalidJobError(
                f"steps {steps} is out of range for backend {self.name}: use {self.min_steps} to "
                f"{self.max_steps} (default {self.default_steps})"
            )
        if guidance is not None and not self.supports_guidance:
            raise InvalidJobError(
                f"guidance {guidance} is not supported by backend {self.name} ({self.model} ignores it): "
                "leave guidance empty"
            )


@dataclass
class JobContext:
    """What a backend may know and do about the job it serves.

    `prediction_id` is set when an earlier attempt already started a hosted
    prediction. `save_prediction_id` stores a new one on the job row at once,
    so a retry resumes it instead of paying for a second prediction.
    """

    job_id: str
    attempt: int
    owner_user_id: str | None = None
    prediction_id: str | None = None
    save_prediction_id: Callable[[str], Awaitable[None]] | None = None
    report_progress: Callable[[int, int], None] | None = None
    trace_context: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendOutput:
    """A generated image plus what the usage record needs."""

    result: GenerationResult
    prediction_id: str | None = None
    predict_time_s: float | None = None


class Backend(Protocol):
    """A model backend the consumer can send requests to."""

    spec: BackendSpec

    async def generate(self, request: GenerationRequest, context: JobContext) -> BackendOutput: ...

    async def close(self) -> None: ...
