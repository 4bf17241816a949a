-- The health check's statements (tenantstore.health). Templates: {table} and
-- {column} are quoted identifiers from tenantstore.models.TENANTS; every value
-- is a $n parameter.

-- name: ping
-- A round trip that touches no table.
SELECT 1;

-- name: sample_secrets
-- Up to $1 stored values of one secret column, for the key canary: the first
-- the scan finds (no ORDER BY, so a probe never sorts a large table).
SELECT {column}
FROM {table}
WHERE {column} IS NOT NULL AND {column} <> ''
LIMIT $1;
