-- The audit log's statements: PostgresSink's session bookkeeping and the
-- operator command (python -m tenantstore.audit). The events themselves go in
-- by COPY (asyncpg's copy_records_to_table), which needs no statement here.
-- Tables: sql/migrations/0006_create_audit_table.up.sql.

-- name: record_session
-- Create or update a sink session's row ($1 process) with its counts:
-- $2 issued, $3 written, $4 dropped (absolute, never lowered); $5 true marks
-- a flush (last_flush_at), $6 true the close (closed_at). An upsert, so a row
-- pruned while its process ran comes back.
INSERT INTO tenantstore_audit_sessions AS s
    (process, issued, written, dropped, last_flush_at, closed_at)
VALUES ($1, $2, $3, $4, CASE WHEN $5::boolean THEN now() END, CASE WHEN $6::boolean THEN now() END)
ON CONFLICT (process) DO UPDATE
SET issued = greatest(s.issued, excluded.issued),
    written = greatest(s.written, excluded.written),
    dropped = greatest(s.dropped, excluded.dropped),
    last_flush_at = coalesce(excluded.last_flush_at, s.last_flush_at),
    closed_at = coalesce(excluded.closed_at, s.closed_at);

-- name: session_written
-- How many events the session $1 has written, as committed with them: after
-- a write whose outcome is unknown (the connection died at COMMIT), this
-- says whether that batch is in.
SELECT written FROM tenantstore_audit_sessions WHERE process = $1;

-- name: tail
-- The latest $1 events, newest first.
SELECT id, at, actor, operation, table_name, column_name, row_key, key_id, outcome, count,
       process, seq
FROM tenantstore_audit
ORDER BY id DESC
LIMIT $1;

-- name: after
-- Up to $2 events with an id above $1, in id order (tail --follow).
SELECT id, at, actor, operation, table_name, column_name, row_key, key_id, outcome, count,
       process, seq
FROM tenantstore_audit
WHERE id > $1
ORDER BY id
LIMIT $2;

-- name: between
-- The events with ids from $1 to $2, in id order (tail --follow: a batch
-- that committed after a later one).
SELECT id, at, actor, operation, table_name, column_name, row_key, key_id, outcome, count,
       process, seq
FROM tenantstore_audit
WHERE id BETWEEN $1 AND $2
ORDER BY id;

-- name: query
-- Events in time order, each filter applying when its parameter is not NULL:
-- $1 the row's key (tenant id), $2 at or after, $3 before, $4 actor,
-- $5 operation; $6 at most this many rows (NULL: all).
SELECT id, at, actor, operation, table_name, column_name, row_key, key_id, outcome, count,
       process, seq
FROM tenantstore_audit
WHERE ($1::text IS NULL OR row_key = $1)
  AND ($2::timestamptz IS NULL OR at >= $2)
  AND ($3::timestamptz IS NULL OR at < $3)
  AND ($4::text IS NULL OR actor = $4)
  AND ($5::text IS NULL OR operation = $5)
ORDER BY at, id
LIMIT $6;

-- name: sessions
-- Sink sessions with their counts and what is unaccounted for (issued, not
-- written, not dropped): all of them when $1 is true, else those not closed
-- or with a loss. Oldest first.
SELECT process, started_at, last_flush_at, closed_at, issued, written, dropped,
       issued - written - dropped AS unaccounted
FROM tenantstore_audit_sessions
WHERE $1::boolean OR closed_at IS NULL OR dropped > 0 OR issued > written + dropped
ORDER BY started_at, process;

-- name: count_before
-- How many events are older than $1 (what prune would delete).
SELECT count(*) FROM tenantstore_audit WHERE at < $1;

-- name: prune
-- Delete the events older than $1 (and the sessions ended before it) through
-- the one path the append-only guard lets through; returns how many events.
SELECT tenantstore_audit_prune($1);

-- name: audit_table_exists
-- Whether tenantstore_audit exists on the search path (migration 0006 applied).
SELECT to_regclass('tenantstore_audit') IS NOT NULL;
