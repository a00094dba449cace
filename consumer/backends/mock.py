"""The `mock` backend: a solid-colour PNG of the requested size, without a model.

Used by tests and queue benchmarks, where the model would only add noise to
what is measured. The colour follows the seed, so the same job renders the
same bytes on every attempt.
"""

from __future__ import annotations

import io
import time
from functools import lru_cache

from PIL import Image

from consumer.backends.base import BackendOutput, BackendSpec, JobContext
from serve_app.requests import GenerationRequest, GenerationResult

MOCK_SPEC = BackendSpec(name="mock", kind="mock", model="mock-solid-colour", default_steps=1, max_steps=100,
                        supports_guidance=True)


class MockBackend:
    """Return a PNG at once; report one progress step per requested step."""

    spec = MOCK_SPEC

    async def generate(self, request: GenerationRequest, context: JobContext) -> BackendOutput:
        started = time.perf_counter()
        steps = request.steps or self.spec.default_steps
        if context.report_progress is not None:
            context.report_progress(steps, steps)
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
