-- The audit log written by tenantstore.audit.pg.PostgresSink (batched COPY):
-- one row per event, never a secret or a token, and one row per sink session
-- with its counts (issued, written, dropped), so events lost to a kill are
-- counted, never silent: issued - written - dropped as of the last flush, and
-- no closed_at.
--
-- Append-only: statement triggers refuse UPDATE, DELETE and TRUNCATE of
-- tenantstore_audit. The one maintenance path is tenantstore_audit_prune(before)
-- (`python -m tenantstore.audit prune --before 90d`), which deletes the rows
-- older than `before`, and the sessions that ended before it, in one
-- transaction. The guard stops mistakes and application bugs, not a role that
-- may run any SQL: for that, let another role own these tables and grant the
-- application only INSERT and SELECT on tenantstore_audit and INSERT, SELECT
-- and UPDATE on tenantstore_audit_sessions.
CREATE TABLE tenantstore_audit (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL,
    actor text,
    operation text NOT NULL,
    table_name text NOT NULL,
    column_name text,
    row_key text,
    key_id text,
    outcome text NOT NULL,
    count integer NOT NULL DEFAULT 1,
    process text NOT NULL,
    seq bigint NOT NULL
);

-- `query --tenant ID [--since ...]`: a hash index finds a tenant's rows (a
-- tenant has few next to the table, and ordering them is cheap); it costs
-- COPY about a third less server CPU per event than a btree on (row_key, at).
-- Rows arrive in time order, so a BRIN index serves `--since` alone at
-- almost no cost to COPY.
CREATE INDEX tenantstore_audit_row_key ON tenantstore_audit USING hash (row_key);
CREATE INDEX tenantstore_audit_at ON tenantstore_audit USING brin (at);

-- One row per PostgresSink: process is host:pid:random; the counts are
-- updated at every flush, in the transaction that writes the events.
CREATE TABLE tenantstore_audit_sessions (
    process text PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now(),
    last_flush_at timestamptz,
    issued bigint NOT NULL DEFAULT 0,
    written bigint NOT NULL DEFAULT 0,
    dropped bigint NOT NULL DEFAULT 0,
    closed_at timestamptz
);

CREATE FUNCTION tenantstore_audit_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('tenantstore.audit_prune', true) = 'on' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION '% is append-only: % refused (prune with tenantstore_audit_prune)',
        TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$;

CREATE TRIGGER tenantstore_audit_append_only
BEFORE UPDATE OR DELETE OR TRUNCATE ON tenantstore_audit
FOR EACH STATEMENT EXECUTE FUNCTION tenantstore_audit_guard();

-- Sessions are updated at every flush, but only pruned.
CREATE TRIGGER tenantstore_audit_sessions_kept
BEFORE DELETE OR TRUNCATE ON tenantstore_audit_sessions
FOR EACH STATEMENT EXECUTE FUNCTION tenantstore_audit_guard();

-- Delete the events older than `before` and the sessions that ended (or last
-- flushed) before it; return how many events went. The guard lets a DELETE
-- through only while this function's transaction-local setting is on.
CREATE FUNCTION tenantstore_audit_prune(before timestamptz) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    pruned bigint;
BEGIN
    PERFORM set_config('tenantstore.audit_prune', 'on', true);
    DELETE FROM tenantstore_audit WHERE at < before;
    GET DIAGNOSTICS pruned = ROW_COUNT;
    DELETE FROM tenantstore_audit_sessions
    WHERE coalesce(closed_at, last_flush_at, started_at) < before;
    PERFORM set_config('tenantstore.audit_prune', 'off', true);
    RETURN pruned;
END
$$;
