-- The operator command's statements (python -m tenantstore.tenants) over the
-- tenants table. Templates: {table} is the table as resolve_table found it
-- (schema-qualified, quoted), {key}, {column} and {secrets} are quoted
-- identifiers from tenantstore.models.TENANTS; every value is a $n parameter.

-- name: show_tenant
-- One tenant's name, timestamps and stored secret values (tokens or
-- plaintext, as stored), for `show`: the values never leave the process.
SELECT {key}, name, created_at, updated_at, {secrets}
FROM {table}
WHERE {key} = $1;

-- name: stored_secret
-- One secret column of one tenant as stored: no row means no such tenant.
SELECT {column}
FROM {table}
WHERE {key} = $1;

-- name: swap_secret
-- Compare-and-swap one secret: store $2 (a token, or NULL to clear) only
-- while the column still holds $3, the value read before (NULL matches
-- NULL). UPDATE 0 means the tenant is gone or another writer changed the
-- value meanwhile; tenant_exists tells which.
UPDATE {table}
SET {column} = $2, updated_at = now()
WHERE {key} = $1
  AND {column} IS NOT DISTINCT FROM $3;

-- name: tenant_exists
-- Whether a tenant with key $1 exists.
SELECT EXISTS (SELECT 1 FROM {table} WHERE {key} = $1);
