"""Property test: any job row is rejected at INSERT or ends done or failed with a clear error."""

from __future__ import annotations

import asyncio
import io

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from consumer.backends import build_backends
from consumer.storage import LocalStore
from consumer.worker import Consumer
from tests.consumer_fixtures import fast_settings

SIZES = st.one_of(st.sampled_from([64, 80, 128, 256]), st.integers(min_value=-100, max_value=5000))
PROMPTS = st.one_of(
    st.text(min_size=0, max_size=300),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=60),
    st.sampled_from(["../../etc/passwd", "🦊🔥", "東京の夜景", "a" * 2000, "a" * 2001, " ", "%s%n{0}"]),
)
BACKENDS = st.sampled_from(["mock", "mock", "mock", "flux-schnell-local", "no-such-backend", "Mock", ""])


@st.composite
def job_rows(draw) -> dict:
    return {
        "prompt": draw(PROMPTS),
        "backend": draw(BACKENDS),
        "width": draw(SIZES),
        "height": draw(SIZES),
        "seed": draw(st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1))),
        "steps": draw(st.one_of(st.none(), st.integers(min_value=-5, max_value=200))),
        "guidance": draw(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32))),
    }


INSERT_REJECTIONS = (asyncpg.PostgresError, asyncpg.DataError, UnicodeError, OverflowError, ValueError)


async def _run_one(connection: asyncpg.Connection, consumer: Consumer, job: dict, outcomes: dict) -> None:
    try:
        job_id = await connection.fetchval(
            "INSERT INTO imagen.jobs (prompt, backend, width, height, seed, steps, guidance) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id", *job.values())
    except INSERT_REJECTIONS:
        outcomes["rejected"] += 1
        return

    deadline = asyncio.get_running_loop().time() + 20
    while True:
        row = await connection.fetchrow("SELECT * FROM imagen.jobs WHERE id = $1", job_id)
        if row["status"] in ("done", "failed"):
            break
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"job {job} still {row['status']}")
        await asyncio.sleep(0.01)

    outcomes[row["status"]] += 1
    if row["status"] == "failed":
        assert row["error"], f"failed without an error: {job}"
        return
    image = await connection.fetchrow("SELECT * FROM imagen.images WHERE id = $1", row["image_id"])
    assert image["prompt"] == job["prompt"]
    data = consumer.store.path_for(image["storage_key"]).read_bytes()
    with Image.open(io.BytesIO(data)) as png:
        assert png.size == (job["width"], job["height"])


def test_any_job_row_ends_rejected_done_or_failed(dsn, tmp_path):
    loop = asyncio.new_event_loop()
    config = fast_settings(tmp_path)
    consumer = Consumer(config, dsn, build_backends(config), LocalStore(config.local_output_dir))

    async def setup() -> asyncpg.Connection:
        await consumer.start()
        return await asyncpg.connect(dsn)

    connection = loop.run_until_complete(setup())
    outcomes = {"rejected": 0, "done": 0, "failed": 0}
    try:
        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(job=job_rows())
        def check(job: dict) -> None:
            loop.run_until_complete(_run_one(connection, consumer, job, outcomes))

        check()

        # The consumer outlived every example.
        assert all(not task.done() for task in consumer._tasks)
        done_before = outcomes["done"]
        loop.run_until_complete(_run_one(connection, consumer, {
            "prompt": "after", "backend": "mock", "width": 64, "height": 64, "seed": None, "steps": None,
            "guidance": None}, outcomes))
        assert outcomes["done"] == done_before + 1
        # Every path was exercised, not only rejections at INSERT.
        assert outcomes["rejected"] > 0
        assert outcomes["failed"] > 0
        assert outcomes["done"] > 1
    finally:
        loop.run_until_complete(connection.close())
        loop.run_until_complete(consumer.stop(grace_s=1.0))
        loop.close()
