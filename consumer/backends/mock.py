"""The `mock` backend: a solid-colour PNG of the requested size, without a model.

Used by tests and queue benchmarks, where the model would only add noise to
what is measured. The colour follows the seed, so the same job renders the
same bytes on every attempt. With `step_s` > 0 each step takes that long,
which gives tests a job that is still running when they crash its consumer.
"""

from __future__ import annotations

import asyncio
import io
import time
from functools import lru_cache

from PIL import Image

from consumer.backends.base import BackendOutput, BackendSpec, JobContext
from serve_app.requests import GenerationRequest, GenerationResult

MOCK_SPEC = BackendSpec(name="mock", kind="mock", model="mock-solid-colour", default_steps=1, max_steps=100,
                        supports_guidance=True)


class MockBackend:
    """Return a PNG after `step_s` seconds per step, reporting progress after each step."""

    spec = MOCK_SPEC

    def __init__(self, step_s: float = 0.0) -> None:
        self.step_s = step_s

    async def generate(self, request: GenerationRequest, context: JobContext) -> BackendOutput:
        started = time.perf_counter()
        steps = request.steps or self.spec.default_steps
        for step in range(1, steps + 1):
            if self.step_s > 0:
                await asyncio.sleep(self.step_s)
            elif step < steps:
                continue
            if context.report_progress is not None:
                context.report_progress(step, steps)
        png = solid_png(request.width, request.height, _colour(request.seed))
        result = GenerationResult(
            png=png, width=request.width, height=request.height, seed=request.seed, steps=steps,
            guidance=request.guidance, model=self.spec.model, gpu_s=time.perf_counter() - started,
        )
        return BackendOutput(result=result)

    async def close(self) -> None:
        return None


def _colour(seed: int) -> tuple[int, int, int]:
    # 64 distinct colours keep the PNG cache small; none is black.
    index = seed % 64
    return (64 + (index & 3) * 60, 64 + ((index >> 2) & 3) * 60, 64 + ((index >> 4) & 3) * 60)


@lru_cache(maxsize=256)
def solid_png(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
