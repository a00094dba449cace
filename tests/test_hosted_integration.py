"""The consumer wired from settings to Supabase Storage and Replicate, against local fakes."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from consumer.backends import build_backends
from consumer.storage import build_store
from consumer.worker import Consumer
from imagen.errors import SettingsError
from tests.consumer_fixtures import fast_settings
from tests.db_fixtures import insert_job, wait_for_status

OWNER = str(uuid.uuid4())


@pytest.fixture
async def hosted_consumer(dsn, tmp_path, fake_supabase, fake_replicate):
    """Start consumers whose settings name the fakes, as the Go worker's env file would."""
    started: list[Consumer] = []

    async def start(**overrides) -> Consumer:
        values = dict(supabase_url=fake_supabase.url, supabase_service_key=fake_supabase.service_key,
                      replicate_api_token=fake_replicate.api_token, replicate_base_url=fake_replicate.url,
                      owner_user_id=OWNER)
        values.update(overrides)
        settings = fast_settings(tmp_path, **values)
        consumer = Consumer(settings, dsn, build_backends(settings), build_store(settings))
        await consumer.start()
        started.append(consumer)
        return consumer

    yield start
    for consumer in started:
        await consumer.stop(grace_s=1.0)


async def test_replicate_job_uploads_to_storage_and_records_usage(hosted_consumer, db, fake_supabase,
                                                                  fake_replicate):
    fake_replicate.queue_outcome(output_shape="url_list", image_format="webp", predict_time_s=1.5)
    await hosted_consumer()
    job_id = await insert_job(db, prompt="a watercolor harbour", backend="flux-schnell-replicate", width=1024,
                              height=1024, seed=11, style="watercolor")

    row = await wait_for_status(db, job_id)

    assert row["status"] == "done", row["error"]
    assert row["prediction_id"] is not None
    image = await db.fetchrow("SELECT * FROM imagen.images WHERE id = $1", row["image_id"])
    assert image["storage_bucket"] == "imagen-generated"
    assert image["storage_key"].endswith("/a-watercolor-harbour-11.png")
    # The images row records the prompt as generated, with the style applied.
    assert image["prompt"] != "a watercolor harbour"
    assert "a watercolor harbour" in image["prompt"]
    # Jobs without an owner take IMAGEN_OWNER_USER_ID.
    assert str(image["owner_user_id"]) == OWNER
    stored = fake_supabase.objects[("imagen-generated", image["storage_key"])]
    assert stored.content_type == "image/png"
    assert stored.data.startswith(b"\x89PNG")
    assert len(stored.data) == image["byte_size"]
    usage = await db.fetchrow("SELECT * FROM imagen.usage WHERE job_id = $1", uuid.UUID(job_id))
    assert usage["predict_time_s"] == pytest.approx(1.5)
    assert usage["prediction_id"] == row["prediction_id"]
    assert usage["estimated_cost_usd"] is not None


async def test_job_owner_wins_over_fallback_owner(hosted_consumer, db):
    await hosted_consumer()
    owner = uuid.uuid4()
    job_id = await insert_job(db, owner_user_id=owner)
    row = await wait_for_status(db, job_id)
    assert await db.fetchval("SELECT owner_user_id FROM imagen.images WHERE id = $1", row["image_id"]) == owner


async def test_anon_key_refuses_to_start(hosted_consumer, fake_supabase):
    with pytest.raises(SettingsError, match="SUPABASE_SERVICE_KEY"):
        await hosted_consumer(supabase_service_key=fake_supabase.anon_key)


async def test_upload_failure_retries_without_second_object(hosted_consumer, db, fake_supabase):
    await hosted_consumer()
    # The first upload fails after the images row was written in the same
    # transaction: the row is rolled back and the retry writes the same key.
    fake_supabase.fail_next("503", path_prefix="/storage/v1/object/imagen-generated/")
    job_id = await insert_job(db, prompt="retry me", seed=3)

    row = await wait_for_status(db, job_id)

    assert row["status"] == "done"
    assert row["attempt"] == 2
    keys = [key for (_bucket, key) in fake_supabase.objects if not key.startswith("_imagen-probe")]
    assert len(keys) == 1
    assert await db.fetchval("SELECT count(*) FROM imagen.images") == 1


async def test_storage_rejection_fails_job_with_clear_error(hosted_consumer, db, fake_supabase):
    await hosted_consumer()
    fake_supabase.fail_next("413", path_prefix="/storage/v1/object/imagen-generated/")
    job_id = await insert_job(db)
    row = await wait_for_status(db, job_id)
    assert row["status"] == "failed"
    assert "file size limit" in row["error"]
    assert await db.fetchval("SELECT count(*) FROM imagen.images") == 0


async def test_retry_resumes_saved_prediction(hosted_consumer, db, fake_replicate):
    fake_replicate.queue_outcome(status="hang")
    await hosted_consumer(backend_timeout_s=1.0)
    job_id = await insert_job(db, backend="flux-schnell-replicate", width=1024, height=1024)

    # The first attempt times out while the prediction hangs; the retry must resume it.
    async def prediction_saved() -> str | None:
        return await db.fetchval("SELECT prediction_id FROM imagen.jobs WHERE id = $1", uuid.UUID(job_id))

    while (prediction_id := await prediction_saved()) is None:
        await asyncio.sleep(0.02)
    fake_replicate.change_outcome(prediction_id, status="succeeded", polls_until_done=1)
    row = await wait_for_status(db, job_id)

    assert row["status"] == "done", row["error"]
    assert fake_replicate.create_count == 1
    assert row["prediction_id"] == prediction_id


async def test_failed_prediction_fails_job_with_model_message(hosted_consumer, db, fake_replicate):
    fake_replicate.queue_outcome(status="failed", error="NSFW content detected")
    await hosted_consumer()
    job_id = await insert_job(db, backend="flux-dev-replicate", width=1024, height=1024)
    row = await wait_for_status(db, job_id)
    assert row["status"] == "failed"
    assert "NSFW content detected" in row["error"]
    assert row["prediction_id"] in row["error"]


async def test_replicate_backend_without_token_names_setting(start_consumer, db):
    await start_consumer()
    job_id = await insert_job(db, backend="flux-dev-replicate")
    row = await wait_for_status(db, job_id)
    assert row["status"] == "failed"
    assert "REPLICATE_API_TOKEN" in row["error"]


async def test_unknown_style_lists_known_styles(start_consumer, db):
    await start_consumer()
    job_id = await insert_job(db, style="vaporwave")
    row = await wait_for_status(db, job_id)
    assert row["status"] == "failed"
    assert "vaporwave" in row["error"]
    assert "watercolor" in row["error"]
