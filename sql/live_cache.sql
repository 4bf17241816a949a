-- The live cache's listener statements (tenantstore.live_cache). Every value
-- is a $n parameter; LISTEN itself is issued by asyncpg's add_listener.

-- name: backend_pid
-- The server process behind this connection: it differs from the pid the
-- connection was given at startup when a pooler (PgBouncer) stands between.
SELECT pg_backend_pid();

-- name: triggers_enabled
-- How many of the triggers named in $2 exist on table $1 and are enabled
-- (tgenabled 'D' is disabled; a missing table counts none).
SELECT count(*)
FROM pg_trigger
WHERE tgrelid = to_regclass($1)
  AND tgname = ANY ($2::text[])
  AND tgenabled <> 'D';

-- name: probe
-- Send a test notification (payload $2) on channel $1, which this listener
-- also listens on: its return proves notifications reach the connection.
SELECT pg_notify($1, $2);
