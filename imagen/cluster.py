"""Start Ray, deploy the model server on it and hand out a handle to it.

`start_ray` starts a local head node with its temp dir under `data_dir`, or
connects to an existing cluster when `RAY_ADDRESS` is set. `deploy` runs the
`imagen` Serve application, whose only deployment is `FluxDeployment`, and
returns its handle. The app has no HTTP route: callers use the handle.

This module imports neither torch nor diffusers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagen.errors import SettingsError
from imagen.settings import PROJECT_ROOT, Settings

if TYPE_CHECKING:
    from ray.serve import Application
    from ray.serve.handle import DeploymentHandle

    from serve_app.options import ServeOptions

logger = logging.getLogger(__name__)

NAMESPACE = "imagen"

# Ray 2.60 puts sockets at <temp_dir>/session_<date>_<time>_<micros>_<pid>/sockets/plasma_store,
# which adds up to 64 characters, and a unix socket path must fit in 107 bytes.
MAX_RAY_TEMP_DIR_CHARS = 43

# True while this process runs the Ray head node it started, so shutdown()
# never stops Serve on a shared cluster reached through RAY_ADDRESS.
_owns_local_head = False


def replica_env_vars(settings: Settings) -> dict[str, str]:
    """Environment of each replica: caches inside data_dir, no usage reporting, imagen importable.

    The project root goes on PYTHONPATH so that a source checkout that is not
    pip-installed still imports `serve_app` and `imagen` in the replica.
    Without it, Ray would pickle the deployment class by value and the
    replica's exception classes would not be the caller's.
    """
    # NOTE: HF_TOKEN (for gated weights such as FLUX.1-dev) is not passed here,
    # so it stays out of Ray's runtime env. A local head's replicas inherit it
    # from this process, but nodes of a RAY_ADDRESS cluster need it set themselves.
    data_dir = Path(settings.data_dir)
    python_path = [str(PROJECT_ROOT)]
    if os.environ.get("PYTHONPATH"):
        python_path.append(os.environ["PYTHONPATH"])
    from imagen.telemetry import otel_env_vars

    return {
        "HF_HOME": os.environ.get("HF_HOME", str(data_dir / "hf")),
        "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(data_dir / "torchinductor")),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": os.pathsep.join(python_path),
        # The replica's spans go wherever this process's OTEL_* variables send spans.
        **otel_env_vars(),
    }


def start_ray(settings: Settings, *, dashboard: bool = False) -> None:
    """Start a local Ray head node, or connect to the cluster at `RAY_ADDRESS` when it is set.

    The local head keeps its temp dir (sockets, logs, spilled objects) in
    `data_dir/ray`; a path too long for Ray's unix sockets raises
    `SettingsError`. Does nothing when Ray is already initialised in this process.
    """
    import ray

    global _owns_local_head
    if ray.is_initialized():
        return

    # Read by the head node when it starts, so it must be set before ray.init.
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        logger.info("connecting to ray", extra={"event": "ray_connect", "address": address})
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=True)
        return

    temp_dir = Path(settings.data_dir).resolve() / "ray"
    if len(str(temp_dir)) > MAX_RAY_TEMP_DIR_CHARS:
        raise SettingsError(
            f"Ray's temp dir {temp_dir} is {len(str(temp_dir))} characters long, the maximum is "
            f"{MAX_RAY_TEMP_DIR_CHARS} because Ray's unix socket paths inside it must fit in 107 bytes; "
            "set IMAGEN_DATA_DIR to a shorter path"
        )
    temp_dir.mkdir(parents=True, exist_ok=True)
    logger.info(
        "starting ray", extra={"event": "ray_start", "temp_dir": str(temp_dir), "dashboard": dashboard}
    )
    ray.init(
        namespace=NAMESPACE,
        _temp_dir=str(temp_dir),
        include_dashboard=dashboard,
        dashboard_host=settings.ray_dashboard_host,
        log_to_driver=True,
    )
    _owns_local_head = True

    # Another process on this host (e.g. `imagen consume --serve`) joins this
    # cluster with RAY_ADDRESS set to this address.
    logger.info(
        "started ray",
        extra={"event": "ray_started", "address": ray.get_runtime_context().gcs_address},
    )


def deploy(settings: Settings, options: ServeOptions | None = None) -> DeploymentHandle:
    """Deploy (or update) the `imagen` app and return the `FluxDeployment` handle.

    Starts Ray first when needed. `options` defaults to the `IMAGEN_*`
    fast-path variables of this process (see serve_app.options).
    """
    import ray
    from ray import serve

    from serve_app.deployment import APP_NAME
    from serve_app.options import ServeOptions

    _check_batching(settings)
    start_ray(settings)
    options = options if options is not None else ServeOptions.from_env()
    device, num_gpus = _placement(settings, ray.cluster_resources().get("GPU", 0.0))
    app = build_application(settings, options, device=device, num_gpus=num_gpus)

    # The consumers reach the app through handles; the HTTP proxy serves
    # Serve's own health routes (/-/healthz, /-/routes) on the head node.
    serve.start(proxy_location="HeadOnly",
                http_options={"host": settings.serve_http_host, "port": settings.serve_http_port})
    logger.info(
        "deploying",
        extra={"event": "deploy_started", "model": settings.model, "device": device,
               "replicas": settings.serve_replicas, "options": options.enabled()},
    )
    handle = serve.run(app, name=APP_NAME, route_prefix=None)
    logger.info("deployed", extra={"event": "deploy_finished", "model": settings.model})
    return handle


def build_application(settings: Settings, options: ServeOptions, *, device: str, num_gpus: int) -> Application:
    """Build the bound `FluxDeployment` from settings, without deploying it.

    `deploy` and Serve config builders (which cannot ask the cluster for GPUs
    up front) share this, so both configure replicas the same way.
    """
    from serve_app.deployment import FluxDeployment, ReplicaConfig

    _check_batching(settings)
    config = ReplicaConfig(
        model=settings.model,
        device=device,
        data_dir=str(Path(settings.data_dir).resolve()),
        warmup_shapes=settings.warmup_shapes,
        options=options,
        log_level=settings.log_level,
        log_format=settings.log_format,
    )
    if settings.serve_max_replicas > settings.serve_min_replicas:
        scaling: dict[str, Any] = {"autoscaling_config": {
            "min_replicas": settings.serve_min_replicas,
            "max_replicas": settings.serve_max_replicas,
            "target_ongoing_requests": settings.serve_target_ongoing_requests,
        }}
    else:
        scaling = {"num_replicas": settings.serve_replicas}
    from ray.serve.schema import LoggingConfig

    return FluxDeployment.options(
        **scaling,
        # Serve's access log writes a line per request in the replica. The
        # replica's batch records already cover it, and dropping it saves time
        # on every request.
        logging_config=LoggingConfig(enable_access_log=False, log_level=settings.log_level),
        # Serve counts a request waiting in the batch queue as ongoing, so
        # this must be at least max_batch_size for a batch to fill.
        max_ongoing_requests=settings.serve_max_ongoing_requests,
        ray_actor_options={
            "num_cpus": settings.serve_num_cpus,
            "num_gpus": num_gpus,
            "runtime_env": {"env_vars": replica_env_vars(settings)},
        },
        user_config={
            "max_batch_size": settings.serve_max_batch_size,
            "batch_wait_timeout_s": settings.serve_batch_wait_timeout_s,
        },
    ).bind(config)


def _check_batching(settings: Settings) -> None:
    if settings.serve_max_ongoing_requests < settings.serve_max_batch_size:
        raise SettingsError(
            f"IMAGEN_SERVE_MAX_ONGOING_REQUESTS must be >= IMAGEN_SERVE_MAX_BATCH_SIZE "
            f"({settings.serve_max_batch_size}) or batches can never fill, "
            f"got {settings.serve_max_ongoing_requests}"
        )


def _placement(settings: Settings, cluster_gpus: float) -> tuple[str, int]:
    """Return the replica's device and GPU count: one GPU where the cluster has one, else the CPU."""
    if settings.device == "cpu":
        return "cpu", 0
    if cluster_gpus >= 1:
        return "cuda", 1
    if settings.device == "cuda":
        raise SettingsError("IMAGEN_DEVICE is cuda but the Ray cluster has no GPU; set IMAGEN_DEVICE=cpu or auto")
    return "cpu", 0


def get_handle() -> DeploymentHandle:
    """Return the handle of the running `FluxDeployment`, raising when the app is not deployed."""
    from ray import serve

    from serve_app.deployment import APP_NAME, DEPLOYMENT_NAME

    try:
        return serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
    except Exception as exc:  # noqa: BLE001 - Serve raises several types for a missing app
        raise SettingsError(
            f"the {APP_NAME} Serve app is not running ({exc}); deploy it with imagen.cluster.deploy"
        ) from exc


def shutdown() -> None:
    """Disconnect from Ray; stop Serve and the head node too when `start_ray` started them here.

    On a cluster reached through RAY_ADDRESS the `imagen` app keeps running.
    """
    import ray
    from ray import serve

    global _owns_local_head
    if not ray.is_initialized():
        return
    logger.info("shutting down ray", extra={"event": "ray_shutdown", "local_head": _owns_local_head})
    if _owns_local_head:
        serve.shutdown()
    ray.shutdown()
    _owns_local_head = False
