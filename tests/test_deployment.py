"""FluxDeployment through a real local Ray Serve cluster running the tiny model, and imagen.cluster's checks."""

from __future__ import annotations

import asyncio
import io
import os

import numpy as np
import pytest
from PIL import Image

from imagen.errors import BackendError, InvalidJobError, JobError
from serve_app.deployment import FluxDeployment, ReplicaConfig
from serve_app.requests import GenerationProgress, GenerationRequest, GenerationResult
from tests.ray_fixtures import SERVE_MAX_BATCH_SIZE

# A generous bound for one call on a loaded 2-core machine; the tiny model
# itself needs about 30 ms per batch.
CALL_TIMEOUT_S = 60


def make_request(prompt: str = "a photo of a cat", width: int = 64, height: int = 64, seed: int = 1,
                 **kwargs) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, width=width, height=height, seed=seed, **kwargs)


def image_size(png: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(png)).size


async def generate_all(handle, requests: list[GenerationRequest]) -> list[GenerationResult | BaseException]:
    calls = [handle.generate.remote(request) for request in requests]
    return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), CALL_TIMEOUT_S)


async def collect_stream(handle, request: GenerationRequest) -> list:
    stream = handle.options(stream=True).generate_stream.remote(request)

    async def collect() -> list:
        return [event async for event in stream]

    return await asyncio.wait_for(collect(), CALL_TIMEOUT_S)


@pytest.mark.slow
async def test_deployment_generate_returns_result(serve_handle):
    result = await asyncio.wait_for(serve_handle.generate.remote(make_request(job_id="job-1")), CALL_TIMEOUT_S)

    assert isinstance(result, GenerationResult)
    assert image_size(result.png) == (64, 64)
    assert (result.seed, result.steps, result.model) == (1, 4, "tiny")
    assert result.gpu_s > 0


@pytest.mark.slow
async def test_deployment_batches_concurrent_requests(serve_handle):
    requests = [make_request(seed=seed, job_id=f"batch-{seed}") for seed in range(SERVE_MAX_BATCH_SIZE)]

    results = await generate_all(serve_handle, requests)

    assert all(isinstance(result, GenerationResult) for result in results)
    assert [result.seed for result in results] == list(range(SERVE_MAX_BATCH_SIZE))
    assert max(result.batch_size for result in results) > 1


@pytest.mark.slow
async def test_deployment_mixed_sizes_keep_their_size(serve_handle):
    sizes = [(64, 64), (128, 64), (64, 96), (64, 64)]
    requests = [make_request(width=width, height=height, seed=index) for index, (width, height) in enumerate(sizes)]

    results = await generate_all(serve_handle, requests)

    assert [image_size(result.png) for result in results] == sizes
    assert [(result.width, result.height) for result in results] == sizes


@pytest.mark.slow
async def test_deployment_bad_request_fails_alone(serve_handle):
    requests = [make_request(seed=1), make_request(width=100, job_id="bad-size"), make_request(seed=2),
                make_request(seed=3)]

    results = await generate_all(serve_handle, requests)

    assert isinstance(results[0], GenerationResult)
    assert isinstance(results[1], InvalidJobError)
    assert "width must be a multiple of 16, got 100; use 96 or 112" in str(results[1])
    assert results[1].transient is False
    assert isinstance(results[2], GenerationResult)
    assert isinstance(results[3], GenerationResult)


@pytest.mark.slow
async def test_deployment_error_is_job_error(serve_handle):
    with pytest.raises(JobError, match="prompt is empty"):
        await asyncio.wait_for(serve_handle.generate.remote(make_request(prompt="")), CALL_TIMEOUT_S)


@pytest.mark.slow
async def test_deployment_same_seed_same_image(serve_handle):
    first, second = await generate_all(serve_handle, [make_request(seed=42), make_request(seed=42)])

    first_pixels = np.asarray(Image.open(io.BytesIO(first.png)), dtype=np.int16)
    second_pixels = np.asarray(Image.open(io.BytesIO(second.png)), dtype=np.int16)
    assert np.abs(first_pixels - second_pixels).max() <= 1


@pytest.mark.slow
async def test_deployment_stream_yields_progress_then_result(serve_handle):
    events = await collect_stream(serve_handle, make_request(steps=3, job_id="stream-1"))

    assert events[:-1] == [GenerationProgress(step=step, total=3) for step in (1, 2, 3)]
    assert isinstance(events[-1], GenerationResult)
    assert events[-1].steps == 3


@pytest.mark.slow
async def test_deployment_streams_batch_with_plain_calls(serve_handle):
    stream = collect_stream(serve_handle, make_request(seed=5, steps=2))
    plain = generate_all(serve_handle, [make_request(seed=6, steps=2), make_request(seed=7, steps=2)])

    events, results = await asyncio.gather(stream, plain)

    assert events[:-1] == [GenerationProgress(step=1, total=2), GenerationProgress(step=2, total=2)]
    assert events[-1].seed == 5
    assert [result.seed for result in results] == [6, 7]


@pytest.mark.slow
async def test_deployment_stream_bad_request_raises(serve_handle):
    with pytest.raises(InvalidJobError, match="height must be within"):
        await collect_stream(serve_handle, make_request(height=4096))


@pytest.mark.slow
async def test_deployment_check_health(serve_handle):
    assert await asyncio.wait_for(serve_handle.check_health.remote(), CALL_TIMEOUT_S) is None


@pytest.mark.slow
async def test_deployment_get_handle_finds_app(serve_handle):
    from imagen import cluster

    handle = cluster.get_handle()
    result = await asyncio.wait_for(handle.generate.remote(make_request(seed=9)), CALL_TIMEOUT_S)

    assert result.seed == 9


class CrashingFluxDeployment(FluxDeployment.func_or_class):
    """FluxDeployment whose generate_batch raises, as a bug in it would."""

    def __init__(self, config: ReplicaConfig) -> None:
        super().__init__(config)

        def crash(requests, progress_callback=None):
            raise RuntimeError("generate_batch crashed")

        self._generator.generate_batch = crash


@pytest.fixture(scope="module")
def crashing_handle(serve_handle, serve_settings):
    from ray import serve

    from imagen import cluster

    app = serve.deployment(CrashingFluxDeployment, name="CrashingFluxDeployment").options(
        max_ongoing_requests=8,
        ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": cluster.replica_env_vars(serve_settings)}},
        user_config={"max_batch_size": SERVE_MAX_BATCH_SIZE, "batch_wait_timeout_s": 0.5},
    ).bind(ReplicaConfig(model="tiny", device="cpu", data_dir=str(serve_settings.data_dir)))
    handle = serve.run(app, name="imagen-crashing", route_prefix=None)
    try:
        yield handle
    finally:
        serve.delete("imagen-crashing")


@pytest.mark.slow
async def test_deployment_batch_crash_answers_every_caller(crashing_handle):
    requests = [make_request(seed=seed) for seed in range(3)]

    calls = asyncio.gather(
        collect_stream(crashing_handle, make_request(seed=9)),
        *(crashing_handle.generate.remote(request) for request in requests),
        return_exceptions=True,
    )
    stream_outcome, *results = await asyncio.wait_for(calls, CALL_TIMEOUT_S)

    assert isinstance(stream_outcome, BackendError)
    assert "generate_batch crashed" in str(stream_outcome)
    for result in results:
        assert isinstance(result, BackendError)
        assert "generate_batch crashed" in str(result)


# ---------------------------------------------------------------------------
# imagen.cluster checks that need no cluster


def test_cluster_placement_follows_device():
    from imagen import cluster
    from imagen.errors import SettingsError
    from imagen.settings import Settings

    assert cluster._placement(Settings(device="cpu"), cluster_gpus=1.0) == ("cpu", 0)
    assert cluster._placement(Settings(device="auto"), cluster_gpus=1.0) == ("cuda", 1)
    assert cluster._placement(Settings(device="auto"), cluster_gpus=0.0) == ("cpu", 0)
    with pytest.raises(SettingsError, match="IMAGEN_DEVICE is cuda but the Ray cluster has no GPU"):
        cluster._placement(Settings(device="cuda"), cluster_gpus=0.0)


def test_cluster_deploy_rejects_small_max_ongoing():
    from imagen import cluster
    from imagen.errors import SettingsError
    from imagen.settings import Settings

    settings = Settings(serve_max_batch_size=8, serve_max_ongoing_requests=4)
    with pytest.raises(SettingsError, match="IMAGEN_SERVE_MAX_ONGOING_REQUESTS must be >= IMAGEN_SERVE_MAX_BATCH_SIZE"):
        cluster.deploy(settings)


def test_cluster_start_ray_rejects_long_data_dir(monkeypatch, tmp_path):
    import ray

    from imagen import cluster
    from imagen.errors import SettingsError
    from imagen.settings import Settings

    # Another test's cluster may be running in this process; the check comes before ray.init either way.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SettingsError, match="set IMAGEN_DATA_DIR to a shorter path"):
        cluster.start_ray(Settings(data_dir=tmp_path / ("x" * 40)))


def test_cluster_replica_env_inside_data_dir(monkeypatch, tmp_path):
    from imagen import cluster
    from imagen.settings import PROJECT_ROOT, Settings

    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    env = cluster.replica_env_vars(Settings(data_dir=tmp_path))

    assert env["HF_HOME"] == str(tmp_path / "hf")
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torchinductor")
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(PROJECT_ROOT)
