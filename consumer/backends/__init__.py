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
    """Backends by the name jobs use in their `backend` column.

    `unavailable` maps backends this consumer knows but cannot run to the
    reason, so a job naming one fails with the setting to change.
    """

    def __init__(self, backends: dict[str, Backend], unavailable: dict[str, str] | None = None) -> None:
        self._backends = dict(backends)
        self.unavailable = dict(unavailable or {})

    def get(self, name: str) -> Backend:
        try:
            return self._backends[name]
        except KeyError:
            pass
        if name in self.unavailable:
            raise InvalidJobError(f"backend {name!r} is not available on this consumer: {self.unavailable[name]}")
        known = ", ".join(sorted(self._backends))
        raise InvalidJobError(f"backend {name!r} is unknown: use one of {known}")

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
    from consumer.backends.replicate import REPLICATE_MODELS, build_replicate_backends

    backends: dict[str, Backend] = {"mock": MockBackend(step_s=settings.mock_step_s)}
    unavailable: dict[str, str] = {}
    spec = local_spec(settings.model)
    if get_serve_handle is not None:
        backends[spec.name] = ServeBackend(spec, get_serve_handle)
    else:
        unavailable[spec.name] = ("this consumer runs without the FLUX deployment; start it with `imagen up`, "
                                  "or `imagen consume` without --no-serve")
    if settings.replicate_api_token:
        backends.update(build_replicate_backends(settings))
    else:
        for name in REPLICATE_MODELS:
            unavailable[name] = "set REPLICATE_API_TOKEN to use Replicate backends"
    return BackendRegistry(backends, unavailable)
