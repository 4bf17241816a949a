-- name: create_migrations_table
-- The schema tracking table: one row per applied migration.
CREATE TABLE IF NOT EXISTS tenantstore_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: create_runs_table
-- One row per batch run of encrypt/decrypt/rotate/verify, so `status` can tell an interrupted one.
CREATE TABLE IF NOT EXISTS tenantstore_secret_runs (
    run_id bigserial PRIMARY KEY,
    operation text NOT NULL,
    status text NOT NULL DEFAULT 'running',
    backend_pid integer,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    rows_done bigint NOT NULL DEFAULT 0,
    report jsonb
);

-- name: add_runs_target
-- Which table a run was over (runs recorded before tenantstore handled any table have NULL: tenants).
ALTER TABLE tenantstore_secret_runs ADD COLUMN IF NOT EXISTS target text;

-- name: try_lock
-- Take the migration runner's session-level advisory lock without waiting.
SELECT pg_try_advisory_lock($1::bigint);

-- name: unlock
-- Release the migration runner's advisory lock.
SELECT pg_advisory_unlock($1::bigint);

-- name: applied_migrations
-- Every applied migration, oldest first.
SELECT version, name, checksum, applied_at
FROM tenantstore_migrations
ORDER BY version;

-- name: record_migration
-- Mark a migration applied.
INSERT INTO tenantstore_migrations (version, name, checksum)
VALUES ($1, $2, $3);

-- name: forget_migration
-- Mark a migration reverted.
DELETE FROM tenantstore_migrations
WHERE version = $1;

-- name: table_exists
-- Whether a table of this name is visible on the search path.
SELECT to_regclass($1) IS NOT NULL;

-- name: create_row_counter
-- A session-local helper that counts the rows of a table given by name; the
-- name is resolved and quoted by regclass, so callers pass it as a parameter.
CREATE OR REPLACE FUNCTION pg_temp.tenantstore_row_count(target regclass)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    EXECUTE format('SELECT count(*) FROM %s', target) INTO n;
    RETURN n;
END
$$;

-- name: table_row_count
-- How many rows the table named $1 holds (0 when it does not exist); checked before a drop.
SELECT CASE
    WHEN to_regclass($1) IS NULL THEN 0
    ELSE pg_temp.tenantstore_row_count(to_regclass($1))
END;

-- name: start_run
-- Record the start of a secrets batch run of operation $1 over table $2.
INSERT INTO tenantstore_secret_runs (operation, target, backend_pid)
VALUES ($1, $2, pg_backend_pid())
RETURNING run_id;

-- name: touch_run
-- Record progress and the current backend of a run (it changes after a reconnect).
UPDATE tenantstore_secret_runs
SET rows_done = $2, backend_pid = pg_backend_pid()
WHERE run_id = $1;

-- name: finish_run
-- Record the end of a run: completed or failed.
UPDATE tenantstore_secret_runs
SET status = $2, rows_done = $3, report = $4::jsonb, finished_at = now()
WHERE run_id = $1;

-- name: last_runs
-- The latest run of each operation over each table, and whether a 'running'
-- one has lost its backend.
SELECT DISTINCT ON (operation, coalesce(target, 'tenants'))
    operation, coalesce(target, 'tenants') AS target, status, started_at, finished_at,
    rows_done, report::text AS report,
    status = 'running' AND NOT EXISTS (
        SELECT 1 FROM pg_stat_activity AS a WHERE a.pid = r.backend_pid
    ) AS interrupted
FROM tenantstore_secret_runs AS r
ORDER BY operation, coalesce(target, 'tenants'), run_id DESC;

-- name: tracking_tables_exist
-- Whether the runner's tracking tables exist (status reads, never creates them).
SELECT to_regclass('tenantstore_migrations') IS NOT NULL,
       to_regclass('tenantstore_secret_runs') IS NOT NULL;

-- name: create_value_counter
-- A session-local helper that counts the non-empty values of a column given
-- by name; the table is resolved by regclass and the column quoted by %I.
CREATE OR REPLACE FUNCTION pg_temp.tenantstore_value_count(target regclass, col text)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_attribute
        WHERE attrelid = target AND attname = col AND attnum > 0 AND NOT attisdropped
    ) THEN
        RETURN 0;
    END IF;
    EXECUTE format('SELECT count(*) FROM %s WHERE %I IS NOT NULL AND %I::text <> %L',
                   target, col, col, '') INTO n;
    RETURN n;
END
$$;

-- name: column_value_count
-- How many non-empty values column $2 of table $1 holds (0 when either does not exist).
SELECT CASE
    WHEN to_regclass($1) IS NULL THEN 0
    ELSE pg_temp.tenantstore_value_count(to_regclass($1), $2)
END;
