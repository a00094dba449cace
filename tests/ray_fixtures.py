"""Ray Serve fixtures: one local Ray cluster with the tiny model deployed, shared by the whole session.

Starting Ray and Serve takes about 10 s, so `serve_handle` is session-scoped.
Batching settings are chosen so tests can rely on them: a batch waits up to
`SERVE_BATCH_WAIT_TIMEOUT_S` for `SERVE_MAX_BATCH_SIZE` requests, and four
concurrent requests therefore form one batch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagen.settings import Settings

SERVE_MAX_BATCH_SIZE = 4
SERVE_BATCH_WAIT_TIMEOUT_S = 0.5


@pytest.fixture(scope="session")
def serve_data_dir() -> Iterator[Path]:
    """A data dir directly under the system temp dir.

    pytest's own temp dirs are too deep for Ray, whose unix socket paths
    inside `data_dir/ray` must fit in 107 bytes.
    """
    path = Path(tempfile.mkdtemp(prefix="imagen-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def serve_settings(serve_data_dir: Path) -> Settings:
    return Settings(
        model="tiny",
        device="cpu",
        data_dir=serve_data_dir,
        serve_replicas=1,
        serve_max_batch_size=SERVE_MAX_BATCH_SIZE,
        serve_batch_wait_timeout_s=SERVE_BATCH_WAIT_TIMEOUT_S,
        serve_max_ongoing_requests=32,
        serve_num_cpus=1,
        serve_http_port=free_port(),
        warmup_shapes=((64, 64, 4),),
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def serve_trace_collector() -> Iterator:
    """Receives the spans of every Ray worker and replica of the session's cluster."""
    from imagen.trace_collector import TraceCollector

    collector = TraceCollector().start()
    yield collector
    collector.stop()


@pytest.fixture(scope="session")
def serve_handle(serve_settings: Settings, serve_trace_collector) -> Iterator:
    """Handle of the `FluxDeployment` running the tiny model on a local Ray cluster."""
    from imagen import cluster
    from serve_app.options import ServeOptions

    # Ray's processes inherit this environment when the head starts, and the
    # replicas get the OTEL_* variables from their runtime env: their spans go
    # to the session's collector, and metrics are reported every second
    # instead of every ten.
    cluster_env = {**serve_trace_collector.env_vars(), "RAY_metrics_report_interval_ms": "1000"}
    saved = {key: os.environ.get(key) for key in cluster_env}
    os.environ.update(cluster_env)
    try:
        # Default options, whatever IMAGEN_* fast-path variables the shell has.
        handle = cluster.deploy(serve_settings, ServeOptions())
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        yield handle
    finally:
        cluster.shutdown()
