-- Tell listeners (tenantstore's LiveCache) which tenants a statement changed,
-- on the channel tenantstore_tenants, so in-process caches drop them.
--
-- Statement-level triggers with transition tables: a statement touching
-- many rows (a runner page is one UPDATE) sends one notification for the
-- batch, never one per row. The payload is a JSON array of tenant ids, never
-- a secret or a token; an UPDATE names the ids before and after. Ids that do
-- not fit NOTIFY's 8000-byte payload go in up to 8 notifications; beyond that
-- (or an id too long for one), and on TRUNCATE, the payload is '*': forget
-- every tenant. PostgreSQL sends notifications at commit, none on rollback.
--
-- The function pins its search_path, so a session's own search_path can
-- never make the trigger (and with it every write to tenants) fail.
CREATE OR REPLACE FUNCTION tenantstore_notify_tenant_changes() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ids text[];
    payloads text[];
    payload text;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('tenantstore_tenants', '*');
        RETURN NULL;
    ELSIF TG_OP = 'INSERT' THEN
        ids := ARRAY(SELECT tenant_id::text FROM new_rows);
    ELSIF TG_OP = 'UPDATE' THEN
        ids := ARRAY(SELECT tenant_id::text FROM new_rows
                     UNION SELECT tenant_id::text FROM old_rows);
    ELSE
        ids := ARRAY(SELECT tenant_id::text FROM old_rows);
    END IF;
    IF cardinality(ids) = 0 THEN
        RETURN NULL;  -- a statement that matched no row changed nothing
    ELSIF cardinality(ids) = 1 THEN
        -- The common case, a single-row write: no sizing and chunking (half the cost).
        payload := json_build_array(ids[1])::text;
        PERFORM pg_notify('tenantstore_tenants',
                          CASE WHEN octet_length(payload) < 8000 THEN payload ELSE '*' END);
        RETURN NULL;
    END IF;
    -- Each id counts as json_agg writes it: quoted, escaped, and ", ".
    -- Consecutive ids go in chunks of about 6000 bytes, so a chunk holds
    -- at most 6000 bytes plus one id.
    IF (SELECT sum(octet_length(to_json(id)::text) + 2) FROM unnest(ids) AS id) <= 8 * 6000 THEN
        payloads := ARRAY(
            SELECT json_agg(id ORDER BY id)::text
            FROM (
                SELECT id, sum(octet_length(to_json(id)::text) + 2) OVER (ORDER BY id) / 6000 AS chunk
                FROM unnest(ids) AS id
            ) AS sized
            GROUP BY chunk
            ORDER BY chunk
        );
    END IF;
    IF payloads IS NULL OR EXISTS (SELECT 1 FROM unnest(payloads) AS p WHERE octet_length(p) >= 8000) THEN
        PERFORM pg_notify('tenantstore_tenants', '*');
        RETURN NULL;
    END IF;
    FOREACH payload IN ARRAY payloads LOOP
        PERFORM pg_notify('tenantstore_tenants', payload);
    END LOOP;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS tenantstore_notify_insert ON tenants;
DROP TRIGGER IF EXISTS tenantstore_notify_update ON tenants;
DROP TRIGGER IF EXISTS tenantstore_notify_delete ON tenants;
DROP TRIGGER IF EXISTS tenantstore_notify_truncate ON tenants;

CREATE TRIGGER tenantstore_notify_insert AFTER INSERT ON tenants
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tenantstore_notify_tenant_changes();
CREATE TRIGGER tenantstore_notify_update AFTER UPDATE ON tenants
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tenantstore_notify_tenant_changes();
CREATE TRIGGER tenantstore_notify_delete AFTER DELETE ON tenants
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tenantstore_notify_tenant_changes();
CREATE TRIGGER tenantstore_notify_truncate AFTER TRUNCATE ON tenants
    FOR EACH STATEMENT EXECUTE FUNCTION tenantstore_notify_tenant_changes();
