"""The Serve application builder for KubeRay's RayService.

`imagen up` deploys the FLUX app itself through `imagen.cluster.deploy`. A
RayService deploys Serve applications from an import path in its
`serveConfigV2` instead, and `build_app` is that import path
(`imagen.container:build_app`, see docker/kuberay/rayservice.yaml). It builds
the same `FluxDeployment` from the same `IMAGEN_*` settings, read from the
environment of the pod that builds the app (the Ray head), with the
application's `args` taking precedence.

The builder cannot ask the cluster for GPUs the way `imagen.cluster.deploy`
does: with an autoscaling worker group there may be none yet when the app is
built. A replica therefore requests one GPU unless IMAGEN_DEVICE=cpu.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from imagen.errors import SettingsError
from imagen.settings import Settings

if TYPE_CHECKING:
    from ray.serve import Application


def build_app(args: dict) -> Application:
    """Build the `imagen` Serve application from the environment and `args`.

    `args` are the application's `args` in the Serve config: environment
    variable names (IMAGEN_MODEL, IMAGEN_SERVE_REPLICAS, ...) mapped to values
    that override the pod's environment. Serve requires a builder to take
    exactly one parameter.
    """
    from imagen.cluster import build_application
    from serve_app.options import ServeOptions

    environ = _environment_with_args(os.environ, args)
    settings = Settings.from_env(environ)
    options = ServeOptions.from_env(environ)
    # A RayService builds the app before its GPU workers join, so the GPU is
    # requested from the settings instead of from the cluster's resources.
    device = "cpu" if settings.device == "cpu" else "cuda"
    return build_application(settings, options, device=device, num_gpus=0 if device == "cpu" else 1)


def _environment_with_args(environ: Mapping[str, str], args: Mapping[str, Any]) -> dict[str, str]:
    """Return `environ` with the builder's `args` applied, rejecting names that are not settings."""
    merged = dict(environ)
    for name, value in args.items():
        if not isinstance(name, str) or not name.startswith("IMAGEN_"):
            raise SettingsError(
                f"application args must be IMAGEN_* setting names, got {name!r}; "
                "put other variables in the pod's environment"
            )
        merged[name] = str(value)
    return merged
