-- Every statement the consumer and the CLI run against imagen's tables.
--
-- Format: a `-- name: <query_name>` line, then a one-line purpose comment,
-- then the statement up to the next name line. consumer/queries.py parses it.
-- A job is "held" by a consumer while status = 'running', lease_owner is that
-- consumer's id and attempt is the attempt it claimed; every write of a
-- running job's outcome checks all three, so a consumer whose lease was taken
-- over can never overwrite the newer attempt.

-- name: claim_jobs
-- Claim up to $2 due pending jobs for consumer $1 with a lease of $3 seconds, taking turns between owners.
WITH due AS (
    SELECT id, created_at,
           -- Jobs without an owner form one group of their own; a plain value
           -- (not NULL) lets the joins below hash instead of comparing every pair.
           coalesce(owner_user_id, '00000000-0000-0000-0000-000000000000'::uuid) AS owner_key,
           -- Position within the owner's own queue, which stays first-in first-out.
           -- NOTE: this ranks every due job, so a claim's cost grows with the backlog
           -- (about 7 ms at 5,000 pending jobs on 2 cores, see docs/benchmarks.md).
           row_number() OVER (PARTITION BY owner_user_id ORDER BY created_at, id) AS owner_rank
    FROM imagen.jobs
    WHERE status = 'pending'
      -- Retried jobs wait out their backoff.
      AND run_after <= now()
),
candidates AS (
    -- No claim takes more than $2 jobs of one owner, so later ranks never matter.
    SELECT id, created_at, owner_key, owner_rank
    FROM due
    WHERE owner_rank <= $2
),
owners AS (
    -- When each waiting owner last had a job started. The owner served longest
    -- ago goes first, so one owner's burst cannot starve another owner's single job.
    SELECT waiting.owner_key,
           (SELECT max(started_at) FROM imagen.jobs
            -- Matches the expression of jobs_owner_started_idx, so this is one index probe.
            WHERE coalesce(owner_user_id, '00000000-0000-0000-0000-000000000000'::uuid) = waiting.owner_key
           ) AS last_started_at
    FROM (SELECT DISTINCT owner_key FROM candidates WHERE owner_rank = 1) AS waiting
),
picked AS (
    SELECT jobs.id
    FROM candidates
    JOIN owners ON owners.owner_key = candidates.owner_key
    JOIN imagen.jobs ON jobs.id = candidates.id
    -- Checked again on the locked row version: another consumer may have claimed
    -- the job, or its owner cancelled it, after `due` was read.
    WHERE jobs.status = 'pending'
    ORDER BY candidates.owner_rank, owners.last_started_at NULLS FIRST, candidates.created_at, candidates.id
    LIMIT $2
    -- Rows another consumer is claiming right now are skipped, not waited for.
    FOR UPDATE OF jobs SKIP LOCKED
)
UPDATE imagen.jobs AS j
SET status = 'running',
    attempt = j.attempt + 1,
    lease_owner = $1,
    lease_expires_at = now() + make_interval(secs => $3),
    started_at = now(),
    -- The seed is fixed at the first claim, so every attempt renders the same image.
    seed = coalesce(j.seed, floor(random() * 4294967296)::bigint),
    progress_step = NULL,
    progress_total = NULL
FROM picked
WHERE j.id = picked.id
RETURNING j.id, j.owner_user_id, j.prompt, j.style, j.backend, j.width, j.height, j.steps, j.guidance,
          j.seed, j.attempt, j.max_attempts, j.prediction_id, j.traceparent, j.tracestate, j.created_at,
          extract(epoch FROM now() - greatest(j.created_at, j.run_after))::float8 AS queued_s;

-- name: renew_leases
-- Extend the leases of the jobs consumer $1 still holds among ids $2 with attempts $3; returns those ids.
UPDATE imagen.jobs AS j
SET lease_expires_at = now() + make_interval(secs => $4)
FROM unnest($2::uuid[], $3::int[]) AS held(id, attempt)
WHERE j.id = held.id
  AND j.attempt = held.attempt
  AND j.lease_owner = $1
  AND j.status = 'running'
RETURNING j.id;

-- name: rescue_expired_leases
-- Return jobs whose consumer stopped renewing its lease to the queue, or fail them once attempts are used up.
WITH expired AS (
    SELECT id, lease_owner
    FROM imagen.jobs
    WHERE status = 'running' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT 100
    -- Another consumer may be rescuing the same rows; it keeps them.
    FOR UPDATE SKIP LOCKED
)
UPDATE imagen.jobs AS j
SET status = CASE WHEN j.attempt >= j.max_attempts THEN 'failed' ELSE 'pending' END,
    error = CASE
        WHEN j.attempt >= j.max_attempts THEN format(
            'failed after %s attempts: the consumer running attempt %s (%s) was lost and its lease expired',
            j.attempt, j.attempt, j.lease_owner)
        ELSE format(
            'attempt %s of %s: the consumer running it (%s) was lost and its lease expired; retrying',
            j.attempt, j.max_attempts, j.lease_owner)
        END,
    finished_at = CASE WHEN j.attempt >= j.max_attempts THEN now() END,
    -- Jittered exponential backoff: base $1 seconds doubled per attempt, at most $2 seconds.
    run_after = now() + make_interval(secs => least($2::float8, $1::float8 * power(2, j.attempt - 1)) * (0.75 + random() * 0.5)),
    lease_owner = NULL,
    lease_expires_at = NULL,
    progress_step = NULL,
    progress_total = NULL
FROM expired
WHERE j.id = expired.id
RETURNING j.id, j.backend, j.status, j.attempt, j.max_attempts, expired.lease_owner AS lost_consumer;

-- name: complete_job
-- Record the image, the usage row, status 'done' and $23 of $23 steps for job $1 if consumer $2 still has the lease of attempt $3; returns the image id.
WITH held AS (
    SELECT id, owner_user_id
    FROM imagen.jobs
    WHERE id = $1 AND lease_owner = $2 AND attempt = $3 AND status = 'running'
    -- The row lock is kept until commit, so the lease cannot be rescued while the image is uploaded.
    FOR UPDATE
),
image AS (
    INSERT INTO imagen.images (owner_user_id, job_id, prompt, backend, model, width, height, seed, steps,
                               guidance, storage_bucket, storage_key, content_type, byte_size)
    SELECT coalesce(held.owner_user_id, $4::uuid), held.id, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16
    FROM held
    RETURNING id, job_id, owner_user_id
),
usage AS (
    INSERT INTO imagen.usage (job_id, owner_user_id, backend, model, wall_s, gpu_s, predict_time_s,
                              estimated_cost_usd, prediction_id, batch_size)
    SELECT image.job_id, image.owner_user_id, $6, $7, $17, $18, $19, $20, $21, $22
    FROM image
)
UPDATE imagen.jobs AS j
SET status = 'done',
    image_id = image.id,
    finished_at = now(),
    lease_expires_at = NULL,
    progress_step = $23,
    progress_total = $23
FROM image
WHERE j.id = image.job_id
RETURNING j.image_id;

-- name: fail_job
-- Mark job $1 failed with error $4 if consumer $2 still has the lease of attempt $3.
UPDATE imagen.jobs
SET status = 'failed', error = $4, finished_at = now(), lease_expires_at = NULL
WHERE id = $1 AND lease_owner = $2 AND attempt = $3 AND status = 'running'
RETURNING id;

-- name: retry_job
-- Send job $1 back to the queue after $5 seconds with error $4 if consumer $2 still has the lease of attempt $3.
UPDATE imagen.jobs
SET status = 'pending',
    error = $4,
    run_after = now() + make_interval(secs => $5),
    lease_owner = NULL,
    lease_expires_at = NULL,
    progress_step = NULL,
    progress_total = NULL
WHERE id = $1 AND lease_owner = $2 AND attempt = $3 AND status = 'running'
RETURNING id;

-- name: release_jobs
-- Hand consumer $1's unfinished jobs among ids $2 back to the queue at once, without using up an attempt.
UPDATE imagen.jobs
SET status = 'pending',
    attempt = greatest(attempt - 1, 0),
    run_after = now(),
    lease_owner = NULL,
    lease_expires_at = NULL,
    progress_step = NULL,
    progress_total = NULL
WHERE lease_owner = $1 AND status = 'running' AND id = ANY($2::uuid[])
RETURNING id;

-- name: save_prediction_id
-- Store hosted prediction id $4 on job $1 while consumer $2 holds attempt $3.
UPDATE imagen.jobs
SET prediction_id = $4
WHERE id = $1 AND lease_owner = $2 AND attempt = $3 AND status = 'running'
RETURNING id;

-- name: update_progress
-- Store denoising progress $4 of $5 on job $1 while consumer $2 holds attempt $3.
UPDATE imagen.jobs
SET progress_step = $4, progress_total = $5
WHERE id = $1 AND lease_owner = $2 AND attempt = $3 AND status = 'running'
  -- Progress never moves backwards when updates arrive out of order.
  AND (progress_step IS NULL OR progress_step <= $4);

-- name: job_state
-- Read the status, lease and attempt of job $1.
SELECT id, status, lease_owner, attempt, error, image_id
FROM imagen.jobs
WHERE id = $1;

-- name: insert_job
-- Queue a job; NULL arguments take the column defaults.
INSERT INTO imagen.jobs (owner_user_id, prompt, style, backend, width, height, steps, guidance, seed,
                         max_attempts, traceparent)
VALUES ($1, $2, $3, coalesce($4, 'flux-schnell-local'), coalesce($5, 1024), coalesce($6, 1024), $7, $8, $9,
        coalesce($10, 3), $11)
RETURNING id;

-- name: cancel_job
-- Cancel job $1 if it has not finished; returns its new status.
UPDATE imagen.jobs
SET status = 'cancelled'
WHERE id = $1 AND status IN ('pending', 'running')
RETURNING status;

-- name: get_job
-- Read one job with its image.
SELECT j.*, i.storage_bucket, i.storage_key, i.model, i.byte_size
FROM imagen.jobs AS j
LEFT JOIN imagen.images AS i ON i.id = j.image_id
WHERE j.id = $1;

-- name: count_jobs_by_status
-- Count jobs per status and backend.
SELECT status, backend, count(*) AS jobs
FROM imagen.jobs
GROUP BY status, backend
ORDER BY status, backend;

-- name: oldest_pending
-- Find the oldest due pending job and its age in seconds.
SELECT id, backend, created_at, extract(epoch FROM now() - created_at)::float8 AS age_s
FROM imagen.jobs
WHERE status = 'pending'
ORDER BY created_at
LIMIT 1;

-- name: queue_depth
-- Count pending jobs and the age in seconds of the oldest one.
SELECT count(*) AS pending,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_age_s
FROM imagen.jobs
WHERE status = 'pending';

-- name: recent_failures
-- List the $1 most recent failed jobs with their errors.
SELECT id, backend, error, finished_at
FROM imagen.jobs
WHERE status = 'failed'
ORDER BY finished_at DESC NULLS LAST
LIMIT $1;

-- name: lease_holders
-- List consumers holding leases, with how many jobs each runs and when its soonest lease expires.
SELECT lease_owner, count(*) AS jobs, min(lease_expires_at) AS next_expiry
FROM imagen.jobs
WHERE status = 'running'
GROUP BY lease_owner
ORDER BY lease_owner;
