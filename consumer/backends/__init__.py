"""The backends a job can name, built from the settings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from consumer.backends.base import Backend, BackendOutput, BackendSpec, JobContext
from consumer.backends.mock import MockBackend
from consumer.backends.serve import ServeBackend, local_spec
from imagen.errors import InvalidJobError
from imagen.settings import Settings

__all__ = ["Backend", "BackendOutput", "BackendRegistry", "BackendSpec", "JobContext", "build_backends"]


class BackendRegistry:
    """Backends by the name jobs use in their `backend` column."""

    def __init__(self, backends: dict[str, Backend]) -> None:
        self._backends = dict(backends)

    def get(self, name: str) -> Backend:
        try:
            return self._backends[name]
        except KeyError:
            known = ", ".join(sorted(self._backends))
            raise InvalidJobError(f"backend {name!r} is unknown: use one of {known}") from None

    def names(self) -> list[str]:
        return sorted(self._backends)

    async def close(self) -> None:
        for backend in self._backends.values():
            await backend.close()


def build_backends(settings: Settings, get_serve_handle: Callable[[], Any] | None = None) -> BackendRegistry:
    """Build every backend the settings allow.

    `get_serve_handle` returns the FLUX deployment's handle; without it the
    local backend is left out. Replicate backends need REPLICATE_API_TOKEN.
    """
    backends: dict[str, Backend] = {"mock": MockBackend(step_s=settings.mock_step_s)}
    if get_serve_handle is not None:
        spec = local_spec(settings.model)
        backends[spec.name] = ServeBackend(spec, get_serve_handle)
    if settings.replicate_api_token:
        from consumer.backends.replicate import build_replicate_backends

        backends.update(build_replicate_backends(settings))
    return BackendRegistry(backends)
