-- The imagen queue: jobs the owner's UI inserts, images the worker produces,
-- and a usage record per finished job.
--
-- Applied by `imagen migrate` and by Supabase's migration tooling alike, so
-- every statement is idempotent. On plain PostgreSQL, `imagen migrate` first
-- applies compat/supabase_compat.sql for the roles and auth.uid().

CREATE SCHEMA IF NOT EXISTS imagen;

CREATE TABLE IF NOT EXISTS imagen.jobs (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- NULL for rows inserted without a JWT; the worker then uses IMAGEN_OWNER_USER_ID.
    owner_user_id     uuid DEFAULT auth.uid(),
    prompt            text NOT NULL,
    style             text,
    backend           text NOT NULL DEFAULT 'flux-schnell-local',
    width             integer NOT NULL DEFAULT 1024,
    height            integer NOT NULL DEFAULT 1024,
    -- NULL steps/guidance take the backend's default; the images row records what was used.
    steps             integer,
    guidance          real,
    -- NULL until the claim picks one, so every attempt of a job uses the same seed.
    seed              bigint,
    status            text NOT NULL DEFAULT 'pending',
    error             text,
    image_id          uuid,
    attempt           integer NOT NULL DEFAULT 0,
    max_attempts      integer NOT NULL DEFAULT 3,
    -- The claim skips a job until run_after; retries push it into the future.
    run_after         timestamptz NOT NULL DEFAULT now(),
    -- The consumer holding the job and until when; renewed while the job runs.
    lease_owner       text,
    lease_expires_at  timestamptz,
    prediction_id     text,
    progress_step     integer,
    progress_total    integer,
    -- W3C trace context of whoever inserted the job; the job's trace continues it.
    traceparent       text,
    tracestate        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz,

    CONSTRAINT jobs_status_is_known
        CHECK (status IN ('pending', 'running', 'done', 'failed', 'cancelled')),
    CONSTRAINT jobs_prompt_length_from_1_to_2000
        CHECK (char_length(prompt) BETWEEN 1 AND 2000),
    -- Blank means only white space or zero-width characters, in any script.
    CONSTRAINT jobs_prompt_not_blank
        CHECK (prompt ~ '[^[:space:]\u00A0\u1680\u2000-\u200D\u2028\u2029\u202F\u205F\u2060\u3000\uFEFF]'),
    CONSTRAINT jobs_backend_name_is_lowercase_slug
        CHECK (backend ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
    CONSTRAINT jobs_style_name_is_lowercase_slug
        CHECK (style IS NULL OR style ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
    CONSTRAINT jobs_width_multiple_of_16_from_64_to_2048
        CHECK (width BETWEEN 64 AND 2048 AND width % 16 = 0),
    CONSTRAINT jobs_height_multiple_of_16_from_64_to_2048
        CHECK (height BETWEEN 64 AND 2048 AND height % 16 = 0),
    CONSTRAINT jobs_steps_from_1_to_100
        CHECK (steps IS NULL OR steps BETWEEN 1 AND 100),
    -- BETWEEN is false for NaN, so NaN is rejected too.
    CONSTRAINT jobs_guidance_from_0_to_30
        CHECK (guidance IS NULL OR guidance BETWEEN 0 AND 30),
    CONSTRAINT jobs_seed_not_negative
        CHECK (seed IS NULL OR seed >= 0),
    CONSTRAINT jobs_max_attempts_from_1_to_10
        CHECK (max_attempts BETWEEN 1 AND 10),
    CONSTRAINT jobs_attempt_within_max_attempts
        CHECK (attempt BETWEEN 0 AND max_attempts),
    -- An infinite lease would never expire, so its job could never be rescued.
    CONSTRAINT jobs_lease_expires_at_finite
        CHECK (lease_expires_at IS NULL OR isfinite(lease_expires_at)),
    CONSTRAINT jobs_run_after_finite
        CHECK (isfinite(run_after)),
    CONSTRAINT jobs_running_has_lease
        CHECK (status <> 'running' OR (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CONSTRAINT jobs_done_has_image
        CHECK (status <> 'done' OR image_id IS NOT NULL),
    CONSTRAINT jobs_failed_has_error
        CHECK (status <> 'failed' OR error IS NOT NULL),
    CONSTRAINT jobs_progress_within_total
        CHECK (progress_step IS NULL OR (progress_step BETWEEN 0 AND progress_total))
);

CREATE TABLE IF NOT EXISTS imagen.images (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    owner_user_id   uuid,
    -- UNIQUE: a retried job can never create a second images row.
    job_id          uuid NOT NULL UNIQUE REFERENCES imagen.jobs (id) ON DELETE CASCADE,
    prompt          text NOT NULL,
    backend         text NOT NULL,
    model           text NOT NULL,
    width           integer NOT NULL,
    height          integer NOT NULL,
    seed            bigint NOT NULL,
    steps           integer NOT NULL,
    guidance        real,
    storage_bucket  text NOT NULL,
    storage_key     text NOT NULL,
    content_type    text NOT NULL DEFAULT 'image/png',
    byte_size       bigint NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),

    -- Two jobs never share an object: the second one to finish picks another key.
    CONSTRAINT images_object_is_unique UNIQUE (storage_bucket, storage_key),
    CONSTRAINT images_byte_size_positive CHECK (byte_size > 0)
);

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'jobs_image_id_fkey') THEN
    ALTER TABLE imagen.jobs
      ADD CONSTRAINT jobs_image_id_fkey FOREIGN KEY (image_id) REFERENCES imagen.images (id);
  END IF;
END
$$;

CREATE TABLE IF NOT EXISTS imagen.usage (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id              uuid NOT NULL UNIQUE REFERENCES imagen.jobs (id) ON DELETE CASCADE,
    owner_user_id       uuid,
    backend             text NOT NULL,
    model               text NOT NULL,
    wall_s              double precision NOT NULL,
    gpu_s               double precision,
    -- How many requests shared the pipeline call that made this image.
    batch_size          integer,
    predict_time_s      double precision,
    estimated_cost_usd  numeric(12, 6),
    prediction_id       text,
    created_at          timestamptz NOT NULL DEFAULT now()
);

-- The claim reads pending rows per owner in created_at order.
CREATE INDEX IF NOT EXISTS jobs_pending_claim_idx
    ON imagen.jobs (owner_user_id, created_at, id) WHERE status = 'pending';
-- The claim looks up when each waiting owner last had a job started; jobs
-- without an owner share the nil UUID as their key.
CREATE INDEX IF NOT EXISTS jobs_owner_started_idx
    ON imagen.jobs ((coalesce(owner_user_id, '00000000-0000-0000-0000-000000000000'::uuid)), started_at);
-- The lease rescue reads running rows whose lease has expired.
CREATE INDEX IF NOT EXISTS jobs_running_lease_idx
    ON imagen.jobs (lease_expires_at) WHERE status = 'running';
-- An owner's listing, newest first.
CREATE INDEX IF NOT EXISTS jobs_owner_created_idx
    ON imagen.jobs (owner_user_id, created_at DESC);
CREATE INDEX IF NOT EXISTS images_owner_created_idx
    ON imagen.images (owner_user_id, created_at DESC);
CREATE INDEX IF NOT EXISTS usage_owner_created_idx
    ON imagen.usage (owner_user_id, created_at DESC);

-- Publish each new job's id, and nothing else, to the consumers.
CREATE OR REPLACE FUNCTION imagen.notify_job_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('imagen_jobs', NEW.id::text);
  RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS jobs_notify_inserted ON imagen.jobs;
CREATE TRIGGER jobs_notify_inserted
    AFTER INSERT ON imagen.jobs
    FOR EACH ROW WHEN (NEW.status = 'pending')
    EXECUTE FUNCTION imagen.notify_job_inserted();

-- A cancelled job is finished at once; a running one is also announced so the
-- consumer holding it stops without waiting for its next lease renewal.
CREATE OR REPLACE FUNCTION imagen.finish_cancelled_job() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  NEW.finished_at := now();
  NEW.lease_expires_at := NULL;
  IF OLD.status = 'running' THEN
    PERFORM pg_notify('imagen_job_cancels', NEW.id::text);
  END IF;
  RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS jobs_finish_cancelled ON imagen.jobs;
CREATE TRIGGER jobs_finish_cancelled
    BEFORE UPDATE OF status ON imagen.jobs
    FOR EACH ROW WHEN (NEW.status = 'cancelled' AND OLD.status IS DISTINCT FROM 'cancelled')
    EXECUTE FUNCTION imagen.finish_cancelled_job();

-- Row level security: an authenticated owner sees and inserts only their own
-- rows. service_role bypasses RLS, and the worker connects as a role that
-- owns the tables or has service_role's rights.
ALTER TABLE imagen.jobs ENABLE ROW LEVEL SECURITY;
ALTER TABLE imagen.images ENABLE ROW LEVEL SECURITY;
ALTER TABLE imagen.usage ENABLE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS jobs_owner_select ON imagen.jobs;
CREATE POLICY jobs_owner_select ON imagen.jobs
    FOR SELECT TO authenticated
    USING (owner_user_id = auth.uid());

-- Insert only as yourself and only as a new job; the column grants below keep
-- status, error, image_id and the worker's bookkeeping out of reach.
DROP POLICY IF EXISTS jobs_owner_insert ON imagen.jobs;
CREATE POLICY jobs_owner_insert ON imagen.jobs
    FOR INSERT TO authenticated
    WITH CHECK (owner_user_id = auth.uid() AND status = 'pending');

-- The one change an owner may make: cancel a job that has not finished.
DROP POLICY IF EXISTS jobs_owner_cancel ON imagen.jobs;
CREATE POLICY jobs_owner_cancel ON imagen.jobs
    FOR UPDATE TO authenticated
    USING (owner_user_id = auth.uid() AND status IN ('pending', 'running'))
    WITH CHECK (owner_user_id = auth.uid() AND status = 'cancelled');

DROP POLICY IF EXISTS images_owner_select ON imagen.images;
CREATE POLICY images_owner_select ON imagen.images
    FOR SELECT TO authenticated
    USING (owner_user_id = auth.uid());

DROP POLICY IF EXISTS usage_owner_select ON imagen.usage;
CREATE POLICY usage_owner_select ON imagen.usage
    FOR SELECT TO authenticated
    USING (owner_user_id = auth.uid());

GRANT USAGE ON SCHEMA imagen TO authenticated, service_role;
REVOKE ALL ON imagen.jobs, imagen.images, imagen.usage FROM anon, authenticated;
GRANT SELECT ON imagen.jobs, imagen.images, imagen.usage TO authenticated;
GRANT INSERT (id, owner_user_id, prompt, style, backend, width, height, steps, guidance, seed,
              max_attempts, traceparent, tracestate)
    ON imagen.jobs TO authenticated;
GRANT UPDATE (status) ON imagen.jobs TO authenticated;
GRANT ALL ON imagen.jobs, imagen.images, imagen.usage TO service_role;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA imagen TO service_role;

-- On Supabase, publish job rows to Realtime so the UI can follow status and
-- progress without polling. Plain PostgreSQL has no such publication.
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'supabase_realtime')
     AND NOT EXISTS (SELECT 1 FROM pg_publication_tables
                     WHERE pubname = 'supabase_realtime' AND schemaname = 'imagen' AND tablename = 'jobs') THEN
    ALTER PUBLICATION supabase_realtime ADD TABLE imagen.jobs;
  END IF;
END
$$;
